"""Real-size traffic through every route, v1 and v2, both directions, over loopback.

The mainnet block 413567 (999,887 bytes) and messages around BIP324's 64 KiB boundary, of
1 MB and of Core's 4,000,000-byte maximum, cross the proxy from the node to the peer and
from the peer to the node on the forward, inbound and SOCKS5 routes: in v1, in v2 under
``decrypt`` (each leg its own BIP324 session) and in v2 under ``passthrough`` (one session
end to end). The receiver must get every message unchanged and, where the proxy captures
(v1 and ``decrypt``), the capture must equal what was sent, byte for byte, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from msgcap.capture.conversation import folder_conversation
from msgcap.capture.framing import Frame, FrameDecoder, encode_frame
from tests.conftest import (
    MAGIC,
    Upstream,
    V2End,
    logged,
    read_events,
    route_to,
    running_proxy,
    wait_until_async,
)

TIMEOUT = 60.0
BLOCK_FILE = Path(__file__).parent / "data" / "mainnet" / "block413567.raw"
MAINNET_BLOCK = BLOCK_FILE.read_bytes()

Message = tuple[str, bytes]


def messages(seed: int) -> list[Message]:
    """A version, the real block, then payloads around 64 KiB (so that a v2 packet's contents, the
    short id and the payload, are 65,535, 65,536 and 65,537 bytes too), 1 MB, and the
    4,000,000-byte maximum with a short id and with a 12-byte type (v2 contents of
    4,000,013 bytes, Core's largest)."""
    rng = random.Random(seed)
    sizes = [("tx", n) for n in (65_534, 65_535, 65_536, 65_537)]
    sizes += [("block", 1_000_000), ("block", 4_000_000), ("bigmessage", 4_000_000)]
    version = ("version", rng.randbytes(100))  # a v1 connection starts with it (Core)
    return [version, ("block", MAINNET_BLOCK)] + [(t, rng.randbytes(n)) for t, n in sizes]


NODE_SENDS = messages(1)
PEER_SENDS = messages(2)
assert len(MAINNET_BLOCK) == 999_887


class End(Protocol):
    """One scripted end of a connection: the node or the peer."""

    async def handshake(self) -> None: ...
    async def send_all(self, msgs: list[Message]) -> None: ...
    async def receive(self, n: int) -> list[Message]: ...
    def close(self) -> None: ...


class V1End:
    """Speaks v1 frames; keeps every byte it received to compare with what was sent."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.raw = bytearray()

    async def handshake(self) -> None:
        return None

    async def send_all(self, msgs: list[Message]) -> None:
        for msgtype, payload in msgs:
            self.w.write(encode_frame(MAGIC, msgtype, payload))
            await self.w.drain()

    async def receive(self, n: int) -> list[Message]:
        decoder = FrameDecoder(MAGIC)
        got: list[Message] = []
        while len(got) < n:
            data = await asyncio.wait_for(self.r.read(1 << 20), TIMEOUT)
            if not data:
                break
            self.raw += data
            decoder.receive_data(data)
            while isinstance(ev := decoder.next_event(), Frame):
                got.append((ev.msgtype, bytes(ev.payload)))
        return got

    def close(self) -> None:
        self.w.close()


def make_end(
    transport: str, r: asyncio.StreamReader, w: asyncio.StreamWriter, initiator: bool
) -> End:
    return V1End(r, w) if transport == "v1" else V2End(r, w, initiator, TIMEOUT)


async def socks5_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int) -> None:
    """What Bitcoin Core sends: NOAUTH offered, CONNECT with ATYP DOMAINNAME."""
    host = b"127.0.0.1"
    w.write(b"\x05\x01\x00")
    assert await asyncio.wait_for(r.readexactly(2), TIMEOUT) == b"\x05\x00"
    w.write(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + port.to_bytes(2, "big"))
    reply = await asyncio.wait_for(r.readexactly(10), TIMEOUT)
    assert reply[:2] == b"\x05\x00", reply


@contextlib.asynccontextmanager
async def connected(
    tmp: Path, route: str, transport: str, policy: str
) -> AsyncIterator[tuple[End, asyncio.Future[End]]]:
    """The proxy on ``route`` with a scripted server behind it; yields the client end and
    a future for the server end. Forward and SOCKS5: the node dials; inbound: the peer."""
    loop = asyncio.get_running_loop()
    server_end: asyncio.Future[End] = loop.create_future()
    done = asyncio.Event()

    async def on_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        server_end.set_result(make_end(transport, r, w, initiator=False))
        await done.wait()

    async with Upstream(on_server) as up:
        target = f"127.0.0.1:{up.port}"
        extra: dict[str, Any]
        if route == "forward":
            extra = {"route": route_to(up.port)}
        elif route == "inbound":
            extra = {"route": [{"listen": "127.0.0.1:0", "node": target}]}
        else:
            extra = {"socks5": {"listen": "127.0.0.1:0"}}
        async with running_proxy(tmp, v2=policy, **extra) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
            if route == "socks5":
                await socks5_connect(r, w, up.port)
            client = make_end(transport, r, w, initiator=True)
            try:
                yield client, server_end
            finally:
                client.close()
                done.set()
            await wait_until_async(logged(tmp / "cap", "close"), TIMEOUT, "close logged")


def captured(tmp: Path) -> dict[str, list[Message]]:
    """The single peer folder's capture, by direction."""
    folders = [p for p in (tmp / "cap").iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    out: dict[str, list[Message]] = {"sent": [], "recv": []}
    for item in folder_conversation(folders[0]):
        out[item.direction.value].append((item.record.msgtype.label, bytes(item.record.payload)))
    return out


ROUTES = ["forward", "inbound", "socks5"]
MODES = [("v1", "decrypt"), ("v2", "decrypt"), ("v2", "passthrough")]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("transport", "policy"), MODES, ids=["v1", "v2-decrypt", "v2-passthrough"])
async def test_real_size_messages_both_ways(
    tmp_path: Path, route: str, transport: str, policy: str
) -> None:
    inbound = route == "inbound"  # the node is the server inbound, the client otherwise
    received: dict[str, list[Message]] = {}
    ends: dict[str, End] = {}

    async def play(who: str, end: End, sends: list[Message], expect: int) -> None:
        ends[who] = end
        await end.handshake()
        received[who], _ = await asyncio.gather(end.receive(expect), end.send_all(sends))

    async with connected(tmp_path, route, transport, policy) as (client, server_future):

        async def serve() -> None:
            server = await asyncio.wait_for(server_future, TIMEOUT)
            who = "node" if inbound else "peer"
            await play(who, server, NODE_SENDS if inbound else PEER_SENDS, len(NODE_SENDS))

        client_who = "peer" if inbound else "node"
        client_sends = PEER_SENDS if inbound else NODE_SENDS
        await asyncio.gather(play(client_who, client, client_sends, len(NODE_SENDS)), serve())
        assert received["peer"] == NODE_SENDS
        assert received["node"] == PEER_SENDS
        node, peer = ends["node"], ends["peer"]
        if transport == "v1":  # the exact bytes, not just the same messages
            assert isinstance(node, V1End) and isinstance(peer, V1End)
            assert bytes(peer.raw) == b"".join(encode_frame(MAGIC, t, p) for t, p in NODE_SENDS)
            assert bytes(node.raw) == b"".join(encode_frame(MAGIC, t, p) for t, p in PEER_SENDS)
        ends["peer" if inbound else "node"].close()
        (node if inbound else peer).close()
    closes = read_events(tmp_path / "cap", "close")
    assert len(closes) == 1 and closes[0].get("reason") in (None, "eof", "closed"), closes
    if policy == "passthrough":
        assert read_events(tmp_path / "cap", "v2_passthrough")
        assert not [p for p in (tmp_path / "cap").iterdir() if p.is_dir()]  # nothing captured
        return
    cap = captured(tmp_path)
    assert cap["sent"] == NODE_SENDS
    assert cap["recv"] == PEER_SENDS
    if transport == "v2":
        legs = {e["leg"] for e in read_events(tmp_path / "cap", "v2_session")}
        assert legs == {"client", "upstream"}


def test_messages_cover_the_boundaries() -> None:
    sizes = sorted({len(p) for _, p in NODE_SENDS})
    assert sizes == [100, 65_534, 65_535, 65_536, 65_537, 999_887, 1_000_000, 4_000_000]
    assert os.path.getsize(BLOCK_FILE) == 999_887
