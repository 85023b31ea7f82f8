"""Shared test constants and helpers: frames, the recorded Core pair (and a copy of it),
hypothesis inputs for the decoder and native batch tests, a chain of our own and the
requests for it, scripted peers (v1 and BIP324, an echoing BIP324 upstream, and a node
facing the replayer), the proxy in-process and as a process, event-log and capture
readers, and waiting on a condition instead of sleeping.

Test modules import these as ``from tests.conftest import ...`` (``tests`` is a package);
no test module imports from another test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st

from msgcap.capture.bip324 import V2Session
from msgcap.capture.bip324_events import V2Error, V2Message
from msgcap.capture.conversation import folder_conversation
from msgcap.capture.framing import Message, Network, encode_frame
from msgcap.parser.messages import BlockMsg, GetData, GetHeaders
from msgcap.parser.structures import (
    MSG_WITNESS_FLAG,
    Block,
    BlockHeader,
    BlockLocator,
    Inventory,
    InvType,
)
from msgcap.parser.wire import Reader
from msgcap.proxy.config import config_from_dict
from msgcap.proxy.replay import StreamIO
from msgcap.proxy.server import Proxy
from msgcap.proxy.v2 import Leg, V1Leg, V2Leg, handshake
from tests import bitcoind
from tests.vectors import VECTORS

T = TypeVar("T")

MAGIC = Network.REGTEST.magic
VERSION = encode_frame(MAGIC, "version", b"\x01" * 100)
"""The node's (scripted) version frame."""
PEER_VERSION = encode_frame(MAGIC, "version", b"\x02" * 100)
"""The peer's (scripted) version frame."""
PING = encode_frame(MAGIC, "ping", b"12345678")

PAIR = Path(__file__).parent / "data" / "core-v30-pair"
"""Two Bitcoin Core v30 nodes' own captures of their one connection (a mined 102 blocks,
b mined two; both reached block 104)."""
PAIR_A = PAIR / "a" / "127.0.0.1_39912"
"""Node a's capture of its inbound peer b."""
PAIR_B = PAIR / "b" / "127.0.0.1_28444"
"""Node b's capture of its outbound peer a."""


def pair_tree(tmp: Path) -> Path:
    """A copy of the recorded Core pair's captures (its notes left out) at
    ``tmp / "captures"``: a capture root with node folders a and b, to export or add to."""
    root = tmp / "captures"
    shutil.copytree(PAIR, root, ignore=shutil.ignore_patterns("*.json", "*.md"))
    return root


VERSION_PAYLOAD = bytes.fromhex(VECTORS["version"])
"""A real ``version`` payload (tests/vectors.py), as scripted nodes of replay tests say it."""


# --- mutated payloads -------------------------------------------------------------------


MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "flips": st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=3),
    "cut": st.integers(0, 100_000),
    "extra": st.binary(max_size=3),
}
"""Hypothesis strategies for :func:`mutated`'s arguments: ``@given(..., **MUTATIONS)``."""


def mutated(payload: bytes, flips: Sequence[tuple[int, int]], cut: int, extra: bytes) -> bytes:
    """``payload`` (not empty) with byte ``pos`` set to ``value`` for each of ``flips``,
    cut to ``cut`` bytes and ``extra`` appended (positions and the cut wrap around): a
    real payload damaged a little, as the tests that compare two decoders feed them."""
    out = bytearray(payload)
    for pos, value in flips:
        out[pos % len(out)] = value
    return bytes(out[: cut % (len(out) + 1)]) + extra


BATCH_ARGUMENTS: dict[str, st.SearchStrategy[Any]] = {
    "chunks": st.lists(st.binary(max_size=120), min_size=1, max_size=3),
    "plan": st.lists(st.integers(-3, 130), max_size=9),
    "pos": st.integers(-1, 130),
}
"""Hypothesis strategies for the native batch functions' common arguments (chunks of
bytes, a plan of offsets, a position), mostly not describing whole records: those
functions must raise ValueError on them, nothing else."""


def packed_plan(plan: Sequence[int]) -> bytes:
    """A plan of offsets as the native batch functions take it: little-endian int64s."""
    return struct.pack(f"<{len(plan)}q", *plan)


# --- a chain of our own (no proof of work checked) -----------------------------------------


GENESIS = bytes.fromhex("0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206")[::-1]
"""Regtest's genesis block hash (internal byte order)."""
TXS = BlockMsg.read(Reader(bytes.fromhex(VECTORS["block"]))).block.transactions
"""The transactions of the ``block`` vector (one of them segwit): every block of
:func:`make_chain` holds them."""


def make_chain(n: int, base: bytes = GENESIS) -> list[Block]:
    """``n`` blocks on top of ``base``, block ``i`` with nonce ``i``, each holding TXS."""
    blocks, prev = [], base
    for i in range(1, n + 1):
        header = BlockHeader(0x20000000, prev, bytes([i]) * 32, 1_700_000_000 + i, 0x207FFFFF, i)
        blocks.append(Block(header, TXS))
        prev = header.hash
    return blocks


def getheaders(*locator: bytes, stop: bytes = bytes(32)) -> bytes:
    """A ``getheaders`` payload (protocol version 70016)."""
    return GetHeaders(BlockLocator(70016, locator), stop).encode()


def getdata(*hashes: bytes, kind: int = InvType.MSG_BLOCK | MSG_WITNESS_FLAG) -> bytes:
    """A ``getdata`` payload asking for ``hashes``, witness blocks by default."""
    return GetData(tuple(Inventory(kind, h) for h in hashes)).encode()


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


class EchoPeer:
    """A scripted BIP324 responder (a handler for :class:`Upstream`) that answers every
    message with the same type and payload. Its ends are kept in ``ends``, in the order
    the connections came, so a test can see what each received."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.ends: list[V2End] = []

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        end = V2End(r, w, initiator=False, timeout=self.timeout)
        self.ends.append(end)
        try:
            await end.handshake()
            sent = 0
            while True:
                await end.receive(sent + 1)
                if end.eof:
                    return
                for msgtype, payload in end.got[sent:]:
                    end.send(msgtype, payload)
                sent = len(end.got)
                await w.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            w.close()


async def v2_client(port: int, timeout: float = 30.0) -> V2End:
    """A BIP324 initiator connected to 127.0.0.1:``port``, its handshake done."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    end = V2End(r, w, initiator=True, timeout=timeout)
    await end.handshake()
    return end


def captured_messages(tmp: Path, port: int) -> list[tuple[str, str, bytes]]:
    """The conversation :func:`running_proxy` captured with the peer at 127.0.0.1:``port``,
    as (direction, message type, payload), in order."""
    folder = tmp / "cap" / f"127.0.0.1_{port}"
    return [
        (i.direction.value, i.record.msgtype.label, bytes(i.record.payload))
        for i in folder_conversation(folder)
    ]


async def live_node(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    transport: str = "v1",
    dial: bool = False,
    requests: Sequence[Message] = (),
    pong: bool = True,
    close_after_verack: bool = False,
) -> list[str]:
    """A scripted node facing the replayer, over v1 or BIP324 (``transport``): its
    handshake (its ``version`` first if it dialed), pongs (unless not ``pong``), then
    ``requests`` after ``verack`` (or, with ``close_after_verack``, it hangs up there).
    Returns the types it received, in order; gives up quietly when the other side goes
    away or breaks the BIP324 handshake."""
    got: list[str] = []
    try:
        leg: Leg
        early: list[Message] = []
        if transport == "v2":
            session = V2Session(initiator=dial, magic=MAGIC)
            early = await handshake(StreamIO(reader, writer), session)
            leg = V2Leg(session)
        else:
            leg = V1Leg(MAGIC)

        def send(msgtype: str, payload: bytes | memoryview) -> None:
            writer.write(leg.encode([(msgtype, bytes(payload))]))

        def on(messages: list[Message]) -> bool:
            """Answer ``messages``; False once the node hangs up."""
            for msgtype, payload in messages:
                got.append(msgtype)
                if msgtype == "version":
                    if not dial:
                        send("version", VERSION_PAYLOAD)
                    send("verack", b"")
                elif msgtype == "verack":
                    if close_after_verack:
                        return False
                    for request in requests:
                        send(*request)
                elif msgtype == "ping" and pong:
                    send("pong", payload)
            return True

        if dial:
            send("version", VERSION_PAYLOAD)
        going = on(early)
        while going and (data := await reader.read(1 << 16)):
            messages, _, fatal = leg.receive(data)
            going = on(messages) and fatal is None
    except (OSError, V2Error):
        pass
    finally:
        writer.close()
    return got


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
