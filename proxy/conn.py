"""One TCP connection of the proxy, on asyncio's transports and protocols.

While a connection is being set up (SOCKS5 negotiation, the first bytes) it is read with
awaitable :meth:`Conn.read`. Once relaying, every received
chunk goes straight to a :class:`Sink`, without the buffering and the two copies per
chunk of asyncio streams: on loopback that halves the event loop's work per byte.

Reading pauses while any *hold* is on: the other side's send buffer is full, or the
capture thread is behind. That is the whole of the relay's backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Final, Protocol, cast

SETUP_BUFFER: Final = 1 << 18
"""Bytes kept while setting up before reading pauses (a peer that talks ahead)."""


class Sink(Protocol):
    """Where a relaying connection's events go."""

    def data(self, data: bytes) -> None: ...

    def eof(self) -> None: ...

    def lost(self, error: BaseException | None) -> None: ...


class Conn(asyncio.Protocol):
    def __init__(self, on_open: Callable[[Conn], object] | None = None) -> None:
        self._on_open = on_open
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost = False
        self._error: BaseException | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._write_paused = False
        self._holds: set[str] = set()
        self._sink: Sink | None = None
        self.feeder: Conn | None = None
        """While relaying: the connection whose data is written to this one (its reading
        pauses while this one's send buffer is full)."""

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        if self._sink is not None:
            self._sink.data(data)
            return
        self._buffer += data
        if len(self._buffer) > SETUP_BUFFER:
            self.hold("setup buffer")
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        if self._sink is not None:
            self._sink.eof()
        self._wake_reader()
        return True  # keep the transport open: the other direction may go on (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._error = exc
        self._wake_reader()
        self._wake_writer()
        if self._sink is not None:
            self._sink.lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.feeder is not None:
            self.feeder.hold("peer send buffer")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.feeder is not None:
            self.feeder.release("peer send buffer")
        self._wake_writer()

    # --- reading while setting up -------------------------------------------------------

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, waiting for some; b"" at end of stream."""
        while not self._buffer and not self._eof and not self._lost:
            await self._wait_readable()
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        if len(self._buffer) <= SETUP_BUFFER:
            self.release("setup buffer")
        return out

    async def _wait_readable(self) -> None:
        self._readable = asyncio.get_running_loop().create_future()
        try:
            await self._readable
        finally:
            self._readable = None

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    # --- relaying -------------------------------------------------------------------------

    def relay(self, sink: Sink) -> None:
        """From now on, hand every event to ``sink`` (first what is already buffered)."""
        self._sink = sink
        self.release("setup buffer")
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            sink.data(data)
        if self._lost:
            sink.lost(self._error)
        elif self._eof:
            sink.eof()

    def hold(self, reason: str) -> None:
        """Pause reading until every hold is released."""
        t = self.transport
        if not self._holds and t is not None and not t.is_closing():
            t.pause_reading()
        self._holds.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        t = self.transport
        if not self._holds and t is not None and not t.is_closing():
            t.resume_reading()

    # --- writing --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the send buffer is below its high-water mark."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None
            if self._lost:
                raise ConnectionResetError("connection lost")

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def can_write_eof(self) -> bool:
        return self.transport is not None and self.transport.can_write_eof()

    def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write_eof()

    # --- closing ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        """Close once what is buffered has been sent."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close now, with a reset."""
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Close now with a TCP reset (RST), whatever was read or sent: a reset from the
        other side is passed on as a reset. (A plain abort sends a FIN when nothing is
        left unread.)"""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def peer_address(self) -> tuple[str, int]:
        addr = self.transport.get_extra_info("peername") if self.transport else None
        if isinstance(addr, tuple) and len(addr) >= 2:
            return str(addr[0]), int(addr[1])
        return "unknown", 0


async def connect(sock: socket.socket) -> Conn:
    """A :class:`Conn` on a connected socket."""
    _transport, conn = await asyncio.get_running_loop().create_connection(Conn, sock=sock)
    return conn


async def accept(sock: socket.socket, on_open: Callable[[Conn], object]) -> None:
    """A :class:`Conn` on an accepted socket, handed to ``on_open`` once it is open."""
    await asyncio.get_running_loop().connect_accepted_socket(lambda: Conn(on_open), sock)
