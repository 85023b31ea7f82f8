"""One proxied connection: two pumps that frame, capture and forward the exact bytes.

Each pump reads a chunk, feeds its direction's :class:`~capture.framing.FrameDecoder`,
writes the chunk's complete frames to the capture (one ``write()`` per chunk), then
forwards the chunk unchanged and waits for the other side to drain it. A slow reader on
one side therefore stops reading on the other: per connection, memory is bounded by one
read chunk, one frame being reassembled (at most 4 MB) and the transport's write buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from capture.framing import NEED_DATA, BadMagic, Frame, FrameDecoder, StreamError
from capture.writer import Clock
from proxy.events import EventLog, LiveView
from proxy.store import CaptureStopped, ConnectionCapture

READ_SIZE = 1 << 16


@dataclass(slots=True)
class DirectionStats:
    bytes: int = 0
    messages: int = 0
    captured: int = 0
    invalid: int = 0


@dataclass(slots=True)
class Pipe:
    """What one pump needs to know about its direction."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    recv: bool
    """True when these bytes are received by the node."""
    stats: DirectionStats = field(default_factory=DirectionStats)


class Relay:
    """Relays and captures one connection once both sockets are open."""

    def __init__(
        self,
        conn_id: int,
        peer: str,
        magic: bytes,
        capture: ConnectionCapture,
        events: EventLog,
        live: LiveView | None,
        idle_timeout: float,
        raw: bool = False,
    ) -> None:
        self.conn_id = conn_id
        self.raw = raw
        """Relay without framing or capture (BIP324 under the passthrough policy)."""
        self.peer = peer
        self.magic = magic
        self.capture = capture
        self.events = events
        self.live = live
        self.idle_timeout = idle_timeout
        self.clock = Clock()
        self.last_activity = time.monotonic()
        self.closing = False
        self.close_reason = "eof"

    async def run(self, a: Pipe, b: Pipe, first_bytes: bytes = b"") -> None:
        """Pump ``a.reader -> b.writer`` and ``b.reader -> a.writer`` until both end.

        ``first_bytes`` were already read from ``a`` (the v2 check) and go first.
        """
        pumps = [
            asyncio.create_task(self._pump(a, b.writer, first_bytes)),
            asyncio.create_task(self._pump(b, a.writer, b"")),
        ]
        watchdog = asyncio.create_task(self._watch_idle(pumps))
        try:
            await asyncio.gather(*pumps)
        finally:
            watchdog.cancel()
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, watchdog, return_exceptions=True)

    async def _watch_idle(self, pumps: list[asyncio.Task[None]]) -> None:
        if not self.idle_timeout:
            return
        while True:
            await asyncio.sleep(min(self.idle_timeout / 4, 5.0))
            if time.monotonic() - self.last_activity > self.idle_timeout:
                self.close_reason = "idle timeout"
                self.events.emit(
                    "timeout", conn=self.conn_id, peer=self.peer, after=self.idle_timeout
                )
                for t in pumps:
                    t.cancel()
                return

    async def _pump(self, src: Pipe, dst: asyncio.StreamWriter, first: bytes) -> None:
        decoder = FrameDecoder(self.magic)
        data = first
        try:
            while True:
                if not data:
                    data = await src.reader.read(READ_SIZE)
                    if not data:
                        # Half-close: pass the EOF on and keep the other direction going.
                        if dst.can_write_eof() and not dst.is_closing():
                            with contextlib.suppress(OSError):
                                dst.write_eof()
                        return
                self.last_activity = time.monotonic()
                forward = self._take(src, decoder, data)
                if forward is not None:
                    dst.write(data[:forward])
                    with contextlib.suppress(ConnectionError):
                        await dst.drain()
                    self.close_reason = "framing error"
                    self._abort(src.writer, dst)
                    return
                dst.write(data)
                src.stats.bytes += len(data)
                data = b""
                await dst.drain()
        except CaptureStopped:
            self.close_reason = "capture error"
            self._abort(src.writer, dst)
        except (ConnectionError, OSError) as e:
            # A reset on one side is passed on as a reset on the other.
            self.close_reason = f"{type(e).__name__}"
            self._abort(src.writer, dst)

    def _take(self, src: Pipe, decoder: FrameDecoder, data: bytes) -> int | None:
        """Frame and capture a chunk. Returns None to forward it all, or how many of its
        bytes precede a fatal framing error (forward those, then close)."""
        if self.raw:
            return None
        start = decoder.offset + decoder.buffered
        decoder.receive_data(data)
        frames: list[tuple[int, str, bytes]] = []
        fatal: StreamError | None = None
        stats = src.stats
        try:
            while (ev := decoder.next_event()) is not NEED_DATA:
                if isinstance(ev, Frame):
                    frames.append((self.clock.now(), ev.msgtype, ev.payload))
                else:
                    stats.invalid += 1
                    self.events.emit(
                        "bad_checksum" if ev.reason == "bad checksum" else "invalid_type",
                        conn=self.conn_id,
                        peer=self.peer,
                        direction="recv" if src.recv else "sent",
                        detail=ev.describe(),
                    )
        except StreamError as e:
            fatal = e
        if frames:
            stats.messages += len(frames)
            stats.captured += self.capture.write(src.recv, frames)
            if self.live is not None:
                for t, msgtype, payload in frames:
                    self.live.message(t, self.peer, src.recv, msgtype, len(payload))
        if fatal is None:
            return None
        self.events.emit(
            "bad_magic" if isinstance(fatal, BadMagic) else "oversize",
            conn=self.conn_id,
            peer=self.peer,
            direction="recv" if src.recv else "sent",
            detail=str(fatal),
        )
        forward = max(0, min(len(data), fatal.offset - start))
        stats.bytes += forward
        return forward

    def _abort(self, *writers: asyncio.StreamWriter) -> None:
        self.closing = True
        for w in writers:
            if not w.is_closing():
                w.transport.abort()
