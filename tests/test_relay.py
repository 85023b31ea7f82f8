"""The proxy over real loopback sockets, with scripted peers on both sides."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture import batch
from msgcap.capture.framing import checksum, encode_frame
from msgcap.capture.records import Record, read_records
from tests.conftest import (
    MAGIC,
    PEER_VERSION,
    PING,
    VERSION,
    Upstream,
    logged,
    read_all,
    read_events,
    read_until_end,
    reset,
    route_to,
    running_proxy,
    wait_until_async,
)


def capture(tmp: Path, port: int, name: str) -> list[tuple[str, bytes]]:
    path = tmp / "cap" / f"127.0.0.1_{port}" / name
    if not path.exists():
        return []
    with open(path, "rb") as f:
        recs = [r for r in read_records(f) if isinstance(r, Record)]
    return [(r.msgtype.name.decode(), r.payload) for r in recs]


def events(tmp: Path) -> list[dict[str, Any]]:
    return read_events(tmp / "cap")


async def connection_closed(tmp: Path, n: int = 1) -> None:
    """Wait until the proxy of ``running_proxy(tmp)`` has logged ``n`` closed connections
    (relay ended, capture files closed)."""
    await wait_until_async(logged(tmp / "cap", "close", n), 10, f"{n} close event(s)")


def random_frames(rng: random.Random, n: int) -> list[tuple[str, bytes]]:
    sizes = [rng.choice((0, 8, 36, 100, 300, 1000)) for _ in range(n)]
    sizes[rng.randrange(n)] = 1_000_000  # one big message
    return [(rng.choice(("inv", "tx", "ping", "block", "xyz")), rng.randbytes(s)) for s in sizes]


async def send_chunked(w: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 7, 100, 4096, 65536, 300_000))
        w.write(data[pos : pos + n])
        pos += n
        await w.drain()
        if rng.random() < 0.05:
            await asyncio.sleep(0)


@pytest.mark.parametrize("way", ["native", "python"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_bit_exact_forwarding_both_directions(
    tmp_path: Path, seed: int, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random frames, random chunking, both directions at once; with the capture thread's
    native helper (when built) and without it."""
    if way == "python":
        monkeypatch.setattr(batch, "write_checked", batch.python_write_checked)
    elif batch.native_write_checked is None:
        pytest.skip("capture/_capture.c not compiled")
    rng = random.Random(seed)
    up_frames = [("version", b"\x02" * 100), *random_frames(rng, 150)]
    down_frames = [("version", b"\x01" * 100), *random_frames(rng, 150)]
    up_bytes = b"".join(encode_frame(MAGIC, t, p) for t, p in up_frames)
    down_bytes = b"".join(encode_frame(MAGIC, t, p) for t, p in down_frames)
    got_upstream = bytearray()

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        async def rx() -> None:
            got_upstream.extend(await read_all(r))

        t = asyncio.create_task(rx())
        await send_chunked(w, up_bytes, random.Random(seed + 100))
        w.write_eof()
        await t

    async with Upstream(peer) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        rx = asyncio.create_task(read_all(r))
        await send_chunked(w, down_bytes, random.Random(seed + 200))
        w.write_eof()
        got_node = await asyncio.wait_for(rx, 30)
        w.close()
        await connection_closed(tmp_path)
    assert bytes(got_upstream) == down_bytes  # node -> peer, byte for byte
    assert got_node == up_bytes  # peer -> node, byte for byte
    assert capture(tmp_path, up.port, "msgs_sent.dat") == down_frames
    assert capture(tmp_path, up.port, "msgs_recv.dat") == up_frames
    close = next(e for e in events(tmp_path) if e["event"] == "close")
    assert close["sent"]["bytes"] == len(down_bytes) and close["recv"]["bytes"] == len(up_bytes)


async def echo_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(PEER_VERSION)
    await w.drain()
    await read_all(r)


def corrupt_checksum(frame: bytes) -> bytes:
    return frame[:20] + bytes(b ^ 0xFF for b in frame[20:24]) + frame[24:]


BAD_TYPE = MAGIC + b"pi\x01g\0\0\0\0\0\0\0\0" + (8).to_bytes(4, "little") + checksum(b"1" * 8)


@pytest.mark.parametrize(
    "bad,event,forwarded,fatal",
    [
        (corrupt_checksum(PING), "bad_checksum", True, False),
        (BAD_TYPE + b"1" * 8, "invalid_type", True, False),
        (b"\xf9\xbe\xb4\xd9" + PING[4:], "bad_magic", False, True),
        (PING[:16] + (4_000_001).to_bytes(4, "little") + b"\0" * 4, "oversize", False, True),
    ],
    ids=["bad-checksum", "invalid-type", "bad-magic", "oversize"],
)
async def test_bad_frames(
    tmp_path: Path, bad: bytes, event: str, forwarded: bool, fatal: bool
) -> None:
    received = bytearray()

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.extend(await read_all(r))

    after = encode_frame(MAGIC, "pong", b"87654321")
    async with Upstream(peer) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION + bad + after)
        await w.drain()
        if fatal:
            assert await asyncio.wait_for(read_all(r), 10) == b""  # the proxy closed on us
        else:
            w.write_eof()
            await asyncio.wait_for(read_all(r), 10)
        w.close()
        await connection_closed(tmp_path)
    kinds = [e["event"] for e in events(tmp_path)]
    assert event in kinds
    if forwarded:
        assert bytes(received) == VERSION + bad + after
        assert capture(tmp_path, up.port, "msgs_sent.dat") == [
            ("version", b"\x01" * 100),
            ("pong", b"87654321"),
        ]
    else:
        assert bytes(received) == VERSION  # nothing after the bad header
        assert capture(tmp_path, up.port, "msgs_sent.dat") == [("version", b"\x01" * 100)]


async def test_bad_connection_does_not_disturb_another(tmp_path: Path) -> None:
    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(1 << 16):
            w.write(data)  # echo
            await w.drain()

    async with Upstream(peer) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        port = px.addresses[0][1]
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(VERSION)
        w2.write(VERSION + b"garbage!" * 10)
        await w1.drain()
        await w2.drain()
        with contextlib.suppress(ConnectionError):  # cut off: EOF or a reset
            assert await asyncio.wait_for(read_all(r2), 10) == b""
        w1.write(PING)
        await w1.drain()
        echoed = await asyncio.wait_for(r1.readexactly(len(VERSION + PING)), 10)
        assert echoed == VERSION + PING
        w1.close()
        w2.close()


async def test_unknown_type_is_forwarded_and_captured(tmp_path: Path) -> None:
    async with (
        Upstream(echo_then_close) as up,
        running_proxy(tmp_path, route=route_to(up.port)) as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION + encode_frame(MAGIC, "futuremsg", b"?"))
        w.write_eof()
        await asyncio.wait_for(read_all(r), 10)
        w.close()
        await connection_closed(tmp_path)
    assert capture(tmp_path, up.port, "msgs_sent.dat")[1] == ("futuremsg", b"?")


async def test_backpressure_bounds_buffering(tmp_path: Path) -> None:
    """A peer that stops reading stops the proxy reading from the node."""
    release = asyncio.Event()
    received = bytearray()

    async def slow_peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        received.extend(await read_all(r))

    frame = encode_frame(MAGIC, "block", bytes(1_000_000))
    total = 200
    async with Upstream(slow_peer) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION)
        accepted = len(VERSION)
        for _ in range(total):
            w.write(frame)
            try:
                await asyncio.wait_for(w.drain(), 1.0)
            except TimeoutError:
                break
            accepted += len(frame)
        # Kernel socket buffers on both hops plus one frame and one read chunk: far less
        # than everything the node wanted to send.
        assert accepted < 64_000_000, accepted
        release.set()
        w.write(frame * ((total * len(frame) - accepted) // len(frame)))
        w.write_eof()
        await asyncio.wait_for(w.drain(), 60)
        await asyncio.wait_for(read_all(r), 60)
        w.close()
        await connection_closed(tmp_path)
    assert len(received) == len(VERSION) + len(frame) * (
        (len(received) - len(VERSION)) // len(frame)
    )
    assert capture(tmp_path, up.port, "msgs_sent.dat")[0][0] == "version"


async def test_half_close_propagates(tmp_path: Path) -> None:
    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await read_all(r)  # ends when the node half-closes
        w.write(encode_frame(MAGIC, "pong", len(data).to_bytes(8, "little")))
        await w.drain()

    async with Upstream(peer) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION)
        w.write_eof()
        reply = await asyncio.wait_for(read_all(r), 10)
        w.close()
    assert reply == encode_frame(MAGIC, "pong", len(VERSION).to_bytes(8, "little"))


@pytest.mark.parametrize("resetting", ["peer", "node"])
async def test_reset_propagates(tmp_path: Path, resetting: str) -> None:
    """README: a reset on one side is passed on as a reset (RST), not as a clean EOF."""
    peer_got: list[bytes] = []
    peer_end: list[str] = []

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peer_got.append(await r.readexactly(len(VERSION)))
        if resetting == "peer":
            reset(w)
        else:
            peer_end.append((await read_until_end(r))[1])

    async with Upstream(peer) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION)
        await w.drain()
        if resetting == "peer":
            node_end = await asyncio.wait_for(read_until_end(r), 10)
            assert node_end == (b"", "ConnectionResetError")
        else:
            await wait_until_async(lambda: peer_got, 10, "the version reached the peer")
            reset(w)
            await wait_until_async(lambda: peer_end, 10, "the peer's connection ended")
            assert peer_end == ["ConnectionResetError"]
        w.close()
        await connection_closed(tmp_path)
    assert peer_got == [VERSION]
    assert [e["reason"] for e in events(tmp_path) if e["event"] == "close"] == [
        "ConnectionResetError"
    ]


async def test_v2_downgrade_closes_before_a_byte(tmp_path: Path) -> None:
    async with (
        Upstream(echo_then_close) as up,
        running_proxy(tmp_path, route=route_to(up.port), v2="downgrade") as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(random.Random(5).randbytes(64))  # an ElligatorSwift key looks like this
        await w.drain()
        assert await asyncio.wait_for(read_all(r), 10) == b""
        w.close()
    assert up.connections == 0  # the peer never heard of it
    assert [e for e in events(tmp_path) if e["event"] == "v2_downgrade"]


async def test_v2_passthrough_relays_untouched(tmp_path: Path) -> None:
    blob = random.Random(6).randbytes(5000)

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write((await r.readexactly(len(blob)))[::-1])
        await w.drain()

    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path, route=route_to(up.port), v2="passthrough") as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(blob)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(blob)), 10) == blob[::-1]
        w.close()
        await connection_closed(tmp_path)
    assert [e for e in events(tmp_path) if e["event"] == "v2_passthrough"]
    assert not (tmp_path / "cap" / f"127.0.0.1_{up.port}").exists()  # nothing to capture


async def test_capture_limit_keeps_forwarding(tmp_path: Path) -> None:
    got = bytearray()

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.extend(await read_all(r))

    data = VERSION + PING * 10
    async with (
        Upstream(peer) as up,
        running_proxy(
            tmp_path, route=route_to(up.port), limits={"capture_bytes_per_peer": 200}
        ) as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(data)
        w.write_eof()
        await asyncio.wait_for(read_all(r), 10)
        w.close()
        await connection_closed(tmp_path)
    assert bytes(got) == data
    captured = capture(tmp_path, up.port, "msgs_sent.dat")
    assert captured == [("version", b"\x01" * 100), ("ping", b"12345678"), ("ping", b"12345678")]
    assert [e for e in events(tmp_path) if e["event"] == "capture_limit"]


async def test_connection_limit(tmp_path: Path) -> None:
    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_all(r)

    async with (
        Upstream(hold) as up,
        running_proxy(tmp_path, route=route_to(up.port), limits={"max_connections": 1}) as px,
    ):
        port = px.addresses[0][1]
        _r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(VERSION)
        await w1.drain()
        await wait_until_async(logged(tmp_path / "cap", "open"), 10, "the first connection")
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(read_all(r2), 10) == b""
        assert [e for e in events(tmp_path) if e["event"] == "connection_limit"]
        w1.close()
        w2.close()


async def test_session_layout(tmp_path: Path) -> None:
    async with (
        Upstream(echo_then_close) as up,
        running_proxy(tmp_path, route=route_to(up.port), layout="session") as px,
    ):
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
            w.write(VERSION)
            w.write_eof()
            await asyncio.wait_for(read_all(r), 10)
            w.close()
        await connection_closed(tmp_path, 2)
    sessions = sorted((tmp_path / "cap" / f"127.0.0.1_{up.port}").iterdir())
    assert len(sessions) == 2
    for s in sessions:
        assert (s / "msgs_sent.dat").read_bytes()[8:20] == b"version\0\0\0\0\0"


async def test_shutdown_closes_connections_and_files(tmp_path: Path) -> None:
    forwarded: list[bytes] = []

    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        forwarded.append(await r.readexactly(len(VERSION)))
        await read_all(r)

    async with Upstream(hold) as up:
        async with running_proxy(tmp_path, route=route_to(up.port)) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
            w.write(VERSION)
            await w.drain()
            await wait_until_async(lambda: forwarded, 10, "the version reached the peer")
        # stop() has run: our side sees the connection end
        assert await asyncio.wait_for(read_all(r), 10) == b""
        w.close()
    assert capture(tmp_path, up.port, "msgs_sent.dat") == [("version", b"\x01" * 100)]
    kinds = [e["event"] for e in events(tmp_path)]
    assert kinds[-2:] == ["close", "stop"]


async def test_slow_capture_disk_slows_forwarding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames waiting for the capture thread are bounded: forwarding waits for the disk."""
    import time as _time

    real = batch.write_checked

    def slow(fd: int, items: list[batch.BatchItem]) -> list[bool]:
        _time.sleep(0.02)
        return real(fd, items)

    # The capture thread's write path (proxy/store.py) when no quota is within reach.
    monkeypatch.setattr(batch, "write_checked", slow)
    received = bytearray()
    lead = []

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sent_file = tmp_path / "cap" / f"127.0.0.1_{up.port}" / "msgs_sent.dat"
        while chunk := await r.read(1 << 16):
            received.extend(chunk)
            on_disk = sent_file.stat().st_size if sent_file.exists() else 0
            lead.append(len(received) - on_disk)

    frame = encode_frame(MAGIC, "block", bytes(300_000))
    async with Upstream(peer) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION)
        for _ in range(300):
            w.write(frame)
            await w.drain()
        w.write_eof()
        await asyncio.wait_for(read_all(r), 60)
        w.close()
        await connection_closed(tmp_path)
    assert len(received) == len(VERSION) + 300 * len(frame)
    # Forwarded but not yet captured stays near the queue bound (32 MB plus a read or
    # two), far below the 90 MB that went through.
    assert max(lead) < 36_000_000, max(lead)
    assert len(capture(tmp_path, up.port, "msgs_sent.dat")) == 301


async def test_live_view_prints_each_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with (
        Upstream(echo_then_close) as up,
        running_proxy(tmp_path, route=route_to(up.port), live=True) as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION + PING)
        w.write_eof()
        await asyncio.wait_for(read_all(r), 10)
        w.close()
        await connection_closed(tmp_path)
    lines = [x.split() for x in capsys.readouterr().out.splitlines()]
    peer = f"127.0.0.1_{up.port}"
    assert sorted(x[1:] for x in lines) == [
        [peer, "recv", "version", "100"],
        [peer, "sent", "ping", "8"],
        [peer, "sent", "version", "100"],
    ]
    assert all(len(x[0]) == len("16:05:01.123456") for x in lines)


async def test_socks_client_that_sends_everything_at_once(tmp_path: Path) -> None:
    """Greeting, CONNECT, version and 3 MB of frames in one write, before any reply:
    what arrives during setup is relayed and captured like the rest."""
    got = bytearray()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.extend(await read_all(r))

    frames = [encode_frame(MAGIC, "block", bytes([i]) * 300_000) for i in range(10)]
    async with (
        Upstream(sink) as up,
        running_proxy(tmp_path, socks5={"listen": "127.0.0.1:0"}) as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        connect = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + up.port.to_bytes(2, "big")
        w.write(b"\x05\x01\x00" + connect + VERSION + b"".join(frames))
        w.write_eof()
        replies = await asyncio.wait_for(read_all(r), 30)
        w.close()
        await connection_closed(tmp_path)
    assert replies == b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)
    assert bytes(got) == VERSION + b"".join(frames)
    assert capture(tmp_path, up.port, "msgs_sent.dat") == [("version", b"\x01" * 100)] + [
        ("block", bytes([i]) * 300_000) for i in range(10)
    ]


async def test_peer_that_talks_before_the_node(tmp_path: Path) -> None:
    """A peer that speaks as soon as it is connected (before the node's version arrives
    there) is relayed and captured in order."""
    greeting = PEER_VERSION + encode_frame(MAGIC, "verack", b"")

    async def eager(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(greeting)
        await w.drain()
        await read_all(r)

    async with Upstream(eager) as up, running_proxy(tmp_path, route=route_to(up.port)) as px:
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        w.write(VERSION)  # the proxy dials the peer on these first bytes; the peer talks at once
        w.write_eof()
        assert await asyncio.wait_for(read_all(r), 10) == greeting
        w.close()
        await connection_closed(tmp_path)
    assert [t for t, _ in capture(tmp_path, up.port, "msgs_recv.dat")] == ["version", "verack"]
