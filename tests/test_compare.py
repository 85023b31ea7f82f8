"""`msgcap compare`: two captures of one session, message by message."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import pytest

from msgcap.capture.compare import compare_folders
from msgcap.capture.framing import MsgType, encode_frame
from msgcap.capture.records import Record, encode_record, read_records
from msgcap.cli import main
from tests.conftest import (
    MAGIC,
    PAIR_A,
    PAIR_B,
    PEER_VERSION,
    VERSION,
    Upstream,
    logged,
    read_all,
    route_to,
    running_proxy,
    wait_until_async,
)

A, B = PAIR_A, PAIR_B  # node a's capture of b, node b's capture of a


def test_two_ends_of_a_real_core_connection_agree(capsys: pytest.CaptureFixture[str]) -> None:
    results = compare_folders(A, B, mirror=True)
    assert [(r.a_count, r.b_count, r.identical) for r in results] == [
        (22, 22, True),
        (123, 123, True),
    ]
    assert main(["compare", "--mirror", str(A), str(B)]) == 0
    assert capsys.readouterr().out.count("identical") == 2


def test_same_side_of_both_nodes_differs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--json", str(A), str(B)]) == 1
    recv, sent = json.loads(capsys.readouterr().out)
    assert not sent["identical"] and not recv["identical"] and recv["matched"] == 0
    assert recv["first_difference"]["a"]["msgtype"] == "version"
    assert recv["type_counts"]["cmpctblock"] == {"a": 0, "b": 97}


def rewrite(src: Path, dst: Path, edit: dict[int, bytes | None]) -> None:
    """Copy a capture file, replacing (bytes) or dropping (None) records by index."""
    out = bytearray()
    with open(src, "rb") as f:
        for i, rec in enumerate(read_records(f)):
            assert isinstance(rec, Record)
            payload = edit.get(i, rec.payload)
            if payload is not None:
                out += encode_record(rec.time + 7, MsgType.of(rec.raw_msgtype), payload)
    dst.write_bytes(bytes(out))


@pytest.mark.parametrize("where", [0, 40, 122])
def test_first_difference_is_found(tmp_path: Path, where: int) -> None:
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(A / "msgs_recv.dat", b / "msgs_recv.dat")
    with open(A / "msgs_sent.dat", "rb") as f:
        original = [r for r in read_records(f) if isinstance(r, Record)]
    changed = bytearray(original[where].payload or b"\0")
    changed[random.Random(where).randrange(len(changed))] ^= 1
    rewrite(A / "msgs_sent.dat", b / "msgs_sent.dat", {where: bytes(changed)})
    recv, sent = compare_folders(A, b)
    assert recv.identical  # timestamps differ (+7 µs), which does not count
    assert not sent.identical and sent.matched == where
    assert sent.first_a is not None and sent.first_b is not None
    assert sent.first_a.index == sent.first_b.index == where
    assert sent.type_counts == {}


def test_a_missing_message_and_a_damaged_file(tmp_path: Path) -> None:
    b = tmp_path / "b"
    b.mkdir()
    rewrite(A / "msgs_sent.dat", b / "msgs_sent.dat", {122: None})  # the last one dropped
    data = (A / "msgs_recv.dat").read_bytes()
    (b / "msgs_recv.dat").write_bytes(data[:-5])  # cut inside the last record
    recv, sent = compare_folders(A, b)
    assert sent.matched == 122 and sent.first_b is None and sent.first_a is not None
    assert "(B ends)" in sent.summary()
    assert sum(sent.type_counts[t][0] - sent.type_counts[t][1] for t in sent.type_counts) == 1
    assert recv.damage and "truncated" in recv.damage[0] and not recv.identical


def test_not_a_capture_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(tmp_path), str(A)]) == 2
    assert "not a capture folder" in capsys.readouterr().err


async def test_two_proxies_in_a_row_capture_the_same_session(tmp_path: Path) -> None:
    """node -> proxy 1 -> proxy 2 -> peer: two independent captures of one session, as
    Core's own and the proxy's would be, agree message by message."""
    rng = random.Random(5)
    node_says = VERSION + b"".join(
        encode_frame(MAGIC, rng.choice(["inv", "tx", "ping"]), rng.randbytes(rng.randrange(2000)))
        for _ in range(300)
    )
    peer_says = PEER_VERSION + b"".join(
        encode_frame(MAGIC, "block", rng.randbytes(rng.randrange(300_000))) for _ in range(20)
    )

    async def peer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(peer_says)
        w.write_eof()
        await read_all(r)

    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path / "2", route=route_to(up.port)) as second,
        running_proxy(tmp_path / "1", route=route_to(second.addresses[0][1])) as first,
    ):
        hop = second.addresses[0][1]
        r, w = await asyncio.open_connection("127.0.0.1", first.addresses[0][1])
        w.write(node_says)
        w.write_eof()
        assert await asyncio.wait_for(read_all(r), 30) == peer_says
        w.close()
        for hop_dir in (tmp_path / "1", tmp_path / "2"):  # both relays ended, captures closed
            await wait_until_async(logged(hop_dir / "cap", "close"), 10, f"close in {hop_dir}")
    one = tmp_path / "1" / "cap" / f"127.0.0.1_{hop}"
    two = tmp_path / "2" / "cap" / f"127.0.0.1_{up.port}"
    results = compare_folders(one, two)
    assert [(r.a_count, r.identical) for r in results] == [(21, True), (301, True)]
