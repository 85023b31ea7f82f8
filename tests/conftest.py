"""Shared test constants and helpers: frames, scripted peers (v1 and BIP324), the proxy
in-process and as a process, event-log readers, and waiting on a condition instead of
sleeping.

Test modules import these as ``from tests.conftest import ...`` (``tests`` is a package);
no test module imports from another test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from msgcap.capture.bip324 import V2Message, V2Session
from msgcap.capture.framing import Network, encode_frame
from msgcap.proxy.config import config_from_dict
from msgcap.proxy.server import Proxy
from tests import bitcoind

T = TypeVar("T")

MAGIC = Network.REGTEST.magic
VERSION = encode_frame(MAGIC, "version", b"\x01" * 100)
"""The node's (scripted) version frame."""
PEER_VERSION = encode_frame(MAGIC, "version", b"\x02" * 100)
"""The peer's (scripted) version frame."""
PING = encode_frame(MAGIC, "ping", b"12345678")


# --- waiting on a condition ------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str = "condition", poll: float = 0.02
) -> T:
    """``tests.bitcoind.wait_until``, polling more often (local conditions are cheap)."""
    return bitcoind.wait_until(predicate, timeout, what, poll)


async def wait_until_async(
    predicate: Callable[[], T | None], timeout: float, what: str = "condition", poll: float = 0.01
) -> T:
    """:func:`wait_until` for coroutines: the event loop runs while it waits."""
    deadline = bitcoind.Deadline(timeout, what)
    while True:
        if value := predicate():
            return value
        deadline.check()
        await asyncio.sleep(poll)


# --- the event log -----------------------------------------------------------------------


read_events = bitcoind.read_events
"""The events of an event log, a line still being written left out (one implementation,
in tests/bitcoind.py, which ``ProxyProcess.events`` uses too)."""


def logged(where: Path, event: str, n: int = 1) -> Callable[[], bool]:
    """A predicate for :func:`wait_until`: at least ``n`` ``event`` events are logged.
    ``close`` is logged once a connection's relay has ended and its capture files are
    closed."""
    return lambda: len(read_events(where, event)) >= n


# --- scripted peers and the proxy in-process ---------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A scripted peer: runs ``handler`` for each connection and remembers them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Upstream:
        async def on(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            finally:
                w.close()

        self.server = await asyncio.start_server(on, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A connection handler that sends back whatever it receives, until EOF."""
    with contextlib.suppress(ConnectionError):
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
    w.close()


async def echo_server() -> asyncio.Server:
    """A loopback server that sends back whatever it receives, until EOF."""
    return await asyncio.start_server(echo, "127.0.0.1", 0)


@contextlib.asynccontextmanager
async def running_proxy(tmp: Path, **overrides: Any) -> AsyncIterator[Proxy]:
    """A proxy in this event loop on regtest, capturing to ``tmp / "cap"`` (events in
    ``tmp / "cap" / "events.jsonl"``); ``overrides`` are config keys."""
    data: dict[str, Any] = {"network": "regtest", "capture_dir": str(tmp / "cap"), **overrides}
    proxy = Proxy(config_from_dict(data))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def route_to(port: int) -> list[dict[str, str]]:
    """An outbound route config: an ephemeral listener forwarding to 127.0.0.1:``port``."""
    return [{"listen": "127.0.0.1:0", "peer": f"127.0.0.1:{port}"}]


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until EOF (raises on a reset)."""
    out = bytearray()
    while chunk := await reader.read(1 << 16):
        out += chunk
    return bytes(out)


async def read_until_end(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything until the connection ends, and how it ended: ``"eof"`` or the name of
    the exception (``"ConnectionResetError"`` for a reset)."""
    out = bytearray()
    try:
        while chunk := await reader.read(1 << 16):
            out += chunk
    except OSError as e:
        return bytes(out), type(e).__name__
    return bytes(out), "eof"


def recv_at_least(sock: socket.socket, n: int) -> bytes:
    """What a blocking socket receives until it has ``n`` bytes or more (fewer only when
    the other end closes first); more than ``n`` is kept, for the caller to see."""
    got = b""
    while len(got) < n:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got += chunk
    return got


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST). ``transport.abort()`` alone closes with a FIN when
    nothing received is left unread; ``SO_LINGER`` 0 makes the close a reset."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


free_port = bitcoind.free_port


class V2End:
    """One scripted BIP324 end (initiator or responder) on a stream pair, with its own
    :class:`V2Session`: the handshake, then messages both ways. Every message received is
    kept in ``got``; each read waits at most ``timeout`` seconds."""

    def __init__(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        initiator: bool,
        timeout: float = 30.0,
    ) -> None:
        self.r, self.w = r, w
        self.session = V2Session(initiator=initiator, magic=MAGIC)
        self.timeout = timeout
        self.got: list[tuple[str, bytes]] = []
        self.eof = False

    def pump(self) -> None:
        """Take the session's events (keeping the messages) and write what it has to send."""
        for ev in self.session.next_events():
            if isinstance(ev, V2Message):
                self.got.append((ev.msgtype, bytes(ev.payload)))
        if out := self.session.data_to_send():
            self.w.write(out)

    async def _read(self) -> bytes:
        data = await asyncio.wait_for(self.r.read(1 << 20), self.timeout)
        if data:
            self.session.receive_data(data)
            self.pump()
        else:
            self.eof = True
        return data

    async def handshake(self) -> None:
        """Until the session is established and the peer's version packet is in."""
        self.pump()
        while not (self.session.established and self.session.peer_version_received):
            if not await self._read():
                raise ConnectionError("closed during the BIP324 handshake")

    def send(self, msgtype: str, payload: bytes) -> None:
        self.w.write(self.session.encrypt_message(msgtype, payload))

    async def send_all(self, msgs: list[tuple[str, bytes]]) -> None:
        for msgtype, payload in msgs:
            self.send(msgtype, payload)
            await self.w.drain()

    async def receive(self, n: int) -> list[tuple[str, bytes]]:
        """Until ``n`` messages in all, or the end of the stream."""
        while len(self.got) < n and not self.eof:
            await self._read()
        return self.got

    async def read_all(self) -> None:
        """Until the end of the stream (a reset ends it too)."""
        with contextlib.suppress(ConnectionError):
            while not self.eof:
                await self._read()

    def close(self) -> None:
        self.w.close()


# --- the proxy as a process ------------------------------------------------------------


ProxyProcess = bitcoind.ProxyProcess
"""``msgcap proxy`` as a process (one implementation, in tests/bitcoind.py)."""


# --- real Bitcoin Core (tests/bitcoind.py) ----------------------------------------------


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[bitcoind.NodeFactory]:
    """Start nodes with ``nodes(name, *args)``; all are stopped when the test ends."""
    with bitcoind.NodeFactory(tmp_path / "nodes") as factory:  # skips (or fails) without bitcoind
        yield factory


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., bitcoind.ProxyProcess]]:
    """Start ``msgcap proxy`` with ``start_proxy(*flags, config=None)``; killed at the end
    if the test did not stop it."""
    started: list[bitcoind.ProxyProcess] = []

    def start(*flags: str, config: str | None = None) -> bitcoind.ProxyProcess:
        proxy = bitcoind.ProxyProcess(tmp_path / f"proxy{len(started)}", *flags, config=config)
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.kill()
