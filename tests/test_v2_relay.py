"""BIP324 under ``v2 = "decrypt"`` over real loopback sockets: scripted v2 (and v1-only)
peers on both sides of the proxy, and the hostile v2 cases.

Every hostile case runs while an honest v2 connection is open: the expected event is
logged, nothing more is forwarded on the hostile connection, and the honest one keeps
working.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from msgcap.capture.bip324 import V2Session, session_id_hex
from msgcap.capture.framing import encode_frame
from tests.conftest import (
    MAGIC,
    EchoPeer,
    Upstream,
    V2End,
    captured_messages,
    logged,
    read_events,
    route_to,
    running_proxy,
    v2_client,
    wait_until_async,
)

TIMEOUT = 10.0


MESSAGES = [("version", b"\x01" * 100), ("ping", b"12345678"), ("block", os.urandom(300_000)),
            ("xyzzy", b"unknown type"), ("tx", b"")]  # fmt: skip


async def test_v2_on_both_legs(tmp_path: Path) -> None:
    peer = EchoPeer(TIMEOUT)
    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path, v2="decrypt", route=route_to(up.port)) as proxy,
    ):
        client = await v2_client(proxy.addresses[0][1], TIMEOUT)
        for msgtype, payload in MESSAGES:
            client.send(msgtype, payload)
        assert await client.receive(len(MESSAGES)) == MESSAGES  # echoed through both legs
        assert peer.ends[0].got == MESSAGES
        client.w.close()
    cap = captured_messages(tmp_path, up.port)
    # The node is the client: what it sent is "sent", the echo is "recv"; in order.
    assert sorted(cap, key=lambda m: m[0]) == sorted(
        [("sent", t, p) for t, p in MESSAGES] + [("recv", t, p) for t, p in MESSAGES],
        key=lambda m: m[0],
    )
    assert [(t, p) for d, t, p in cap if d == "sent"] == MESSAGES
    assert [(t, p) for d, t, p in cap if d == "recv"] == MESSAGES
    sessions = read_events(tmp_path / "cap", "v2_session")
    by_leg = {e["leg"]: e for e in sessions}
    client_sid = client.session.session_id
    upstream_sid = peer.ends[0].session.session_id
    assert client_sid is not None and upstream_sid is not None and client_sid != upstream_sid
    assert by_leg["client"]["session_id"] == session_id_hex(client_sid)
    assert by_leg["upstream"]["session_id"] == session_id_hex(upstream_sid)
    assert by_leg["client"]["node"] is True and by_leg["upstream"]["node"] is False


async def test_v1_only_upstream_gets_v1(tmp_path: Path) -> None:
    """An upstream that only speaks v1 closes on our key; that leg falls back to v1."""
    got: list[bytes] = []

    async def v1_peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.read(16)
        if first[:4] != MAGIC:  # a v2 key: a v1-only node disconnects
            w.close()
            return
        data = first + await r.read(1 << 20)
        got.append(data)
        w.write(encode_frame(MAGIC, "verack", b""))
        await w.drain()
        await r.read()
        w.close()

    async with (
        Upstream(v1_peer) as up,
        running_proxy(tmp_path, v2="decrypt", route=route_to(up.port)) as proxy,
    ):
        client = await v2_client(proxy.addresses[0][1], TIMEOUT)
        client.send("version", b"\x02" * 50)
        assert await client.receive(1) == [("verack", b"")]
        client.w.close()
    assert got == [encode_frame(MAGIC, "version", b"\x02" * 50)]
    kinds = [e["event"] for e in read_events(tmp_path / "cap")]
    assert "v2_fallback" in kinds and kinds.count("v2_session") == 1
    assert captured_messages(tmp_path, up.port) == [
        ("sent", "version", b"\x02" * 50),
        ("recv", "verack", b""),
    ]


# --- hostile v2 input ---------------------------------------------------------------------


async def no_terminator(w: asyncio.StreamWriter, s: V2Session) -> None:
    w.write(s.data_to_send()[:64] + os.urandom(5000))  # a key, then garbage without end


async def bad_tag(w: asyncio.StreamWriter, s: V2Session) -> None:
    packet = bytearray(s.encrypt_message("ping", b"12345678"))
    packet[-1] ^= 1
    w.write(bytes(packet))


async def oversize(w: asyncio.StreamWriter, s: V2Session) -> None:
    w.write(s.encrypt_contents(bytes(4_000_014)))


async def cut_short(w: asyncio.StreamWriter, s: V2Session) -> None:
    w.write(s.encrypt_message("ping", b"12345678")[:10])
    await w.drain()
    w.write_eof()


async def decoys(w: asyncio.StreamWriter, s: V2Session) -> None:
    w.write(b"".join(s.encrypt_decoy(10) for _ in range(2000)))


async def stall(w: asyncio.StreamWriter, s: V2Session) -> None:
    await asyncio.sleep(0)  # a key and garbage, then nothing


HOSTILE: dict[str, tuple[Callable[[asyncio.StreamWriter, V2Session], Awaitable[None]], str, str]]
HOSTILE = {
    # case: (what the client does after its key, expected event, expected reason/during)
    "no garbage terminator": (no_terminator, "v2_error", "no garbage terminator"),
    "bad AEAD tag": (bad_tag, "v2_error", "bad tag"),
    "length past the limit": (oversize, "v2_error", "oversize packet"),
    "packet cut short": (cut_short, "close", ""),
    "flood of decoys": (decoys, "v2_decoys", ""),
    "stalled handshake": (stall, "timeout", "BIP324 handshake"),
}
PRE_HANDSHAKE = {"no garbage terminator", "stalled handshake"}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_v2(tmp_path: Path, case: str) -> None:
    act, event, detail = HOSTILE[case]
    peer = EchoPeer(TIMEOUT)
    cap = tmp_path / "cap"
    async with (
        Upstream(peer) as up,
        running_proxy(
            tmp_path, v2="decrypt", route=route_to(up.port), limits={"handshake_timeout": 2}
        ) as proxy,
    ):
        listen = proxy.addresses[0][1]
        honest = await v2_client(listen, TIMEOUT)
        honest.send("ping", b"honest-1")
        assert await honest.receive(1) == [("ping", b"honest-1")]
        r, w = await asyncio.open_connection("127.0.0.1", listen)
        hostile = V2End(r, w, initiator=True, timeout=TIMEOUT)
        if case in PRE_HANDSHAKE:
            await act(w, hostile.session)
            if case == "stalled handshake":
                w.write(hostile.session.data_to_send())
        else:
            await hostile.handshake()
            await act(w, hostile.session)
        with contextlib.suppress(ConnectionError):  # the proxy may have closed on it
            await w.drain()

        def seen() -> bool:
            return any(e["event"] == event and (not detail or detail in json.dumps(e))
                       for e in read_events(cap))  # fmt: skip

        with contextlib.suppress(TimeoutError):
            await wait_until_async(seen, TIMEOUT, f"{event} logged")
        assert seen(), read_events(cap)
        honest.send("ping", b"honest-2")  # the honest connection is not disturbed
        assert await honest.receive(2) == [("ping", b"honest-1"), ("ping", b"honest-2")]
        w.close()
        honest.w.close()
    # Nothing of the hostile connection reached the upstream beyond the handshake.
    hostile_ends = [e for e in peer.ends if e is not peer.ends[0]]
    assert all(e.got == [] for e in hostile_ends)


async def test_fifteen_of_sixteen_v1_bytes_is_v2(tmp_path: Path) -> None:
    """A start that matches the v1 prefix in 15 of its 16 bytes is v2, as Core reads it:
    it is never relayed as v1."""
    got: list[bytes] = []

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await r.read())
        w.close()

    prefix = bytearray(MAGIC + b"version\0\0\0\0\0")
    prefix[15] = 1
    async with (
        Upstream(peer) as up,
        running_proxy(
            tmp_path, v2="decrypt", route=route_to(up.port), limits={"handshake_timeout": 1}
        ) as proxy,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", proxy.addresses[0][1])
        w.write(bytes(prefix) + encode_frame(MAGIC, "verack", b""))
        await w.drain()
        assert await asyncio.wait_for(r.read(), TIMEOUT) != b""  # our responder's key
        w.close()
    assert not any(bytes(prefix[:15]) in g for g in got)  # no v1 bytes went upstream
    kinds = {e["event"] for e in read_events(tmp_path / "cap")}
    assert "timeout" in kinds and "open" not in kinds


async def test_client_closing_during_the_handshake_is_a_close(tmp_path: Path) -> None:
    peer = EchoPeer(TIMEOUT)
    cap = tmp_path / "cap"
    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path, v2="decrypt", route=route_to(up.port)) as proxy,
    ):
        _, w = await asyncio.open_connection("127.0.0.1", proxy.addresses[0][1])
        w.write(V2Session(initiator=True, magic=MAGIC).data_to_send()[:40])  # part of a key
        await w.drain()
        w.close()
        with contextlib.suppress(TimeoutError):
            await wait_until_async(logged(cap, "close"), TIMEOUT, "close logged")
    closes = read_events(cap, "close")
    assert closes and "BIP324 handshake" in closes[0]["reason"], read_events(cap)
    assert not read_events(cap, "upstream_error")
