"""Hostile conditions in the relay: ``stop`` means stop, and incomplete frames have a
memory bound.

``on_capture_error = "stop"`` promises that no byte crosses that was not captured first:
each case lets the capture fail after a number of batches while traffic flows, and checks
that what the receiver got is exactly what the capture holds (re-framed), nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture import batch
from msgcap.capture.conversation import folder_conversation
from msgcap.capture.framing import encode_frame
from tests import bitcoind
from tests.conftest import (
    MAGIC,
    Upstream,
    V2End,
    free_port,
    logged,
    read_all,
    read_events,
    route_to,
    running_proxy,
    wait_until_async,
)

TIMEOUT = 30.0


def fail_after(calls: int, original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, which raises ENOSPC from its ``calls``-th call on."""
    count = 0

    def wrapped(*args: Any) -> Any:
        nonlocal count
        count += 1
        if count > calls:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return original(*args)

    return wrapped


def captured_frames(cap: Path, direction: str) -> bytes:
    """The capture of one direction, re-framed as it crossed the wire."""
    folders = [p for p in cap.iterdir() if p.is_dir()]
    assert len(folders) == 1
    return b"".join(
        encode_frame(MAGIC, i.record.msgtype.label, bytes(i.record.payload))
        for i in folder_conversation(folders[0])
        if i.direction.value == direction
    )


def frames(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    out = [encode_frame(MAGIC, "version", rng.randbytes(100))]
    for _ in range(n):
        out.append(encode_frame(MAGIC, "tx", rng.randbytes(rng.choice([50, 1000, 20_000]))))
    return out


@pytest.mark.parametrize("fail_at", [1, 3, 8])
@pytest.mark.parametrize("chunking", ["whole", "odd pieces"])
async def test_stop_forwards_nothing_uncaptured_v1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int, chunking: str
) -> None:
    monkeypatch.setattr(batch, "write_checked", fail_after(fail_at, batch.write_checked))
    got = bytearray()

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            got.extend(await read_all(r))

    stream = b"".join(frames(3, 400))
    cap = tmp_path / "cap"
    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path, route=route_to(up.port), on_capture_error="stop") as px,
    ):
        _r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        rng = random.Random(7)
        pos = 0
        with contextlib.suppress(ConnectionError):
            while pos < len(stream):
                step = len(stream) if chunking == "whole" else rng.randint(1, 30_000)
                w.write(stream[pos : pos + step])
                pos += step
                await w.drain()
                await asyncio.sleep(0)
        await wait_until_async(logged(cap, "close"), TIMEOUT, "close event")
        w.close()
    assert read_events(cap, "close")[0]["reason"] == "capture error"
    sent = captured_frames(cap, "sent")
    assert len(got) < len(stream)  # the failure stopped the relay
    # Every byte that crossed was captured first (a capture the close overtook may not
    # have crossed: the proxy drops what it still holds when it stops).
    assert sent.startswith(bytes(got))
    assert stream.startswith(sent)


async def test_stop_without_failure_forwards_everything(tmp_path: Path) -> None:
    """Strict forwarding holds an incomplete frame's bytes, never loses them: byte-a-time
    pieces, a half-close in each direction, and the replies all arrive."""
    node_stream = b"".join(frames(4, 50))
    peer_stream = b"".join(frames(5, 50))
    got_at_peer = bytearray()

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(peer_stream)
        await w.drain()
        w.write_eof()
        got_at_peer.extend(await read_all(r))

    cap = tmp_path / "cap"
    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path, route=route_to(up.port), on_capture_error="stop") as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        for i in range(0, 200):  # the first 200 bytes one by one
            w.write(node_stream[i : i + 1])
            await w.drain()
        w.write(node_stream[200:])
        w.write_eof()
        got_at_node = await asyncio.wait_for(read_all(r), TIMEOUT)
        w.close()
        await wait_until_async(logged(cap, "close"), TIMEOUT, "close event")
    assert got_at_node == peer_stream
    assert bytes(got_at_peer) == node_stream
    assert captured_frames(cap, "sent") == node_stream
    assert captured_frames(cap, "recv") == peer_stream


@pytest.mark.parametrize("fail_at", [1, 10])
async def test_stop_forwards_nothing_uncaptured_v2_decrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    monkeypatch.setattr(batch, "write_all", fail_after(fail_at, batch.write_all))
    ends: list[V2End] = []

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        end = V2End(r, w, initiator=False, timeout=TIMEOUT)
        ends.append(end)
        with contextlib.suppress(ConnectionError):
            await end.handshake()
            await end.read_all()

    rng = random.Random(9)
    msgs = [("version", rng.randbytes(100))] + [
        ("tx", rng.randbytes(rng.choice([50, 1000, 70_000]))) for _ in range(300)
    ]
    cap = tmp_path / "cap"
    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path, route=route_to(up.port), on_capture_error="stop") as px,
    ):
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        client = V2End(r, w, initiator=True, timeout=TIMEOUT)
        await client.handshake()
        with contextlib.suppress(ConnectionError):
            for t, p in msgs:
                w.write(client.session.encrypt_message(t, p))
                await w.drain()
                await asyncio.sleep(0)
        await wait_until_async(logged(cap, "close"), TIMEOUT, "close event")
        w.close()
    assert read_events(cap, "close")[0]["reason"] == "capture error"
    folder = next(p for p in cap.iterdir() if p.is_dir())
    sent = [
        (i.record.msgtype.label, bytes(i.record.payload))
        for i in folder_conversation(folder)
        if i.direction.value == "sent"
    ]
    got = ends[0].got
    assert len(got) < len(msgs)
    assert got == sent[: len(got)]  # the peer got nothing that was not captured first
    assert msgs[: len(sent)] == sent


# --- memory for incomplete frames --------------------------------------------------------


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def settled(value: Callable[[], int], floor: int, what: str, quiet: float = 0.2) -> None:
    """Wait until ``value()`` is at least ``floor`` and has not changed for ``quiet``
    seconds."""
    deadline = asyncio.get_running_loop().time() + 30
    last, since = value(), asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(0.02)
        now = asyncio.get_running_loop().time()
        if value() != last:
            last, since = value(), now
        elif last >= floor and now - since >= quiet:
            return
        assert now < deadline, f"timed out waiting for {what} ({last} of at least {floor})"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
async def test_incomplete_frames_are_bounded_and_memory_returned(tmp_path: Path) -> None:
    """Waves of connections that each leave a 4 MB message incomplete (3.5 MB of it sent):
    the proxy's memory stays within its budget while they are open, and comes back after
    they close."""
    budget = 32 << 20
    conns, waves, sent_each = 100, 3, 3_500_000
    closes = 0
    forwarded = 0  # what the proxy read and passed on, over every connection

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal forwarded
        with contextlib.suppress(ConnectionError):
            while chunk := await r.read(1 << 16):
                forwarded += len(chunk)

    header = MAGIC + b"block".ljust(12, b"\0") + (4_000_000).to_bytes(4, "little") + bytes(4)
    version = encode_frame(MAGIC, "version", bytes(100))
    payload = random.Random(1).randbytes(sent_each)
    port = free_port()
    async with Upstream(sink) as up:
        config = (
            f'[[route]]\nlisten = "127.0.0.1:{port}"\npeer = "127.0.0.1:{up.port}"\n'
            f"[limits]\nmax_connections = {conns + 10}\n"
            f"frame_buffer_bytes = {budget}\n"
        )
        proxy = await asyncio.to_thread(bitcoind.ProxyProcess, tmp_path / "px", config=config)
        try:
            pid = proxy.proc.pid
            base = rss_kib(pid, "VmRSS")
            after: list[int] = []
            for _ in range(waves):
                writers = []
                before = forwarded
                for _ in range(conns):
                    _r, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(version + header + payload)
                    writers.append(w)
                # The proxy reads what its budget lets it: the whole of as many messages
                # as the budget covers, then nothing more.
                floor = before + budget // (len(header) + 4_000_000) * sent_each
                await settled(lambda: forwarded, floor, "the proxy's reading to stop")
                for w in writers:
                    w.close()
                closes += conns
                await wait_until_async(
                    lambda n=closes: len(read_events(proxy.capture_dir, "close")) >= n,
                    60,
                    "every connection closed",
                )
                # The trim after large reservations end (0.2 s after them): until the
                # proxy's size stops changing.
                await settled(lambda: -rss_kib(pid, "VmRSS"), -(1 << 40), "the trim", 0.4)
                after.append(rss_kib(pid, "VmRSS"))
            peak = rss_kib(pid, "VmHWM")
        finally:
            await asyncio.to_thread(proxy.stop)
    mib = 1024
    # While open: the budget, plus per connection 64 KiB free and a read or two.
    assert (peak - base) < (budget >> 10) + conns * 512 + 48 * mib, (base, peak, after)
    # After they closed: back to where it was, give or take.
    assert max(after) - base < 48 * mib, (base, peak, after)
