"""Core's capture record format, the streaming reader, folder naming, clock and writer."""

from __future__ import annotations

import datetime as dt
import io
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgcap.capture.framing import MsgType
from msgcap.capture.layout import (
    Layout,
    addr_port_string,
    capture_folder,
    peer_folder_name,
    peer_of_capture_file,
)
from msgcap.capture.records import (
    RECORD_HEADER_SIZE,
    Damage,
    Direction,
    Record,
    encode_record,
    read_record_headers,
    read_records,
)
from msgcap.capture.writer import CaptureWriter, Clock

DATA = Path(__file__).parent / "data" / "core-v30-pair"
CORE_FILES = sorted(DATA.rglob("*.dat"))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(DATA)))
def test_reencoding_core_files_is_byte_identical(path: Path) -> None:
    raw = path.read_bytes()
    with open(path, "rb") as f:
        records = list(read_records(f))
    assert records and all(isinstance(r, Record) for r in records)
    again = b"".join(
        encode_record(r.time, r.msgtype.name.decode(), r.payload)
        for r in records
        if isinstance(r, Record)
    )
    assert again == raw


def test_record_layout() -> None:
    rec = encode_record(0x0102030405060708, "ping", b"\xaa" * 8)
    assert rec[:8] == bytes.fromhex("0807060504030201")
    assert rec[8:20] == b"ping\0\0\0\0\0\0\0\0"
    assert rec[20:24] == bytes.fromhex("08000000")
    assert rec[24:] == b"\xaa" * 8


def records_of(data: bytes) -> list[Record | Damage]:
    return list(read_records(io.BytesIO(data)))


GOOD = encode_record(1, "verack", b"") + encode_record(2, "ping", b"12345678")


def test_empty_file() -> None:
    assert records_of(b"") == []


def test_truncated_header() -> None:
    out = records_of(GOOD + b"\x01\x02\x03")
    assert [r.msgtype.name for r in out[:2] if isinstance(r, Record)] == [b"verack", b"ping"]
    assert isinstance(out[2], Damage)
    assert out[2].offset == len(GOOD) and out[2].skipped == 3
    assert "truncated record header" in out[2].reason


def test_truncated_payload() -> None:
    cut = encode_record(3, "block", b"x" * 100)[:-10]
    out = records_of(GOOD + cut)
    assert len(out) == 3 and isinstance(out[2], Damage)
    assert out[2].offset == len(GOOD)
    assert "declares 100 payload bytes, 90 before end of file" in out[2].reason


def test_implausible_length_stops_the_file() -> None:
    garbage = (5).to_bytes(8, "little") + b"junk".ljust(12, b"\0") + (2**31).to_bytes(4, "little")
    out = records_of(GOOD + garbage + GOOD)
    assert len(out) == 3 and isinstance(out[2], Damage)
    assert "implausible payload length" in out[2].reason
    assert out[2].skipped == len(garbage) + len(GOOD)


def test_odd_types_keep_the_boundary() -> None:
    data = encode_record(1, MsgType.of(b"\xff\xfe\x01"), b"abc") + GOOD
    out = records_of(data)
    assert len(out) == 3 and all(isinstance(r, Record) for r in out)


def test_header_scan_matches_reader() -> None:
    data = GOOD + encode_record(9, "tx", b"t" * 70) + b"\x00" * 5
    heads = list(read_record_headers(io.BytesIO(data)))
    assert heads[:3] == [(0, 1), (24, 2), (56, 9)]
    assert isinstance(heads[3], Damage) and heads[3].offset == 56 + 24 + 70


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_reader_never_raises_and_accounts_for_every_byte(data: bytes) -> None:
    out = records_of(data)
    total = 0
    for item in out:
        if isinstance(item, Record):
            assert item.offset == total
            total += RECORD_HEADER_SIZE + len(item.payload)
        else:
            assert item is out[-1]
            assert item.offset == total
            total += item.skipped
    assert total == len(data)


def test_direction_of_file() -> None:
    assert Direction.of_file("x/msgs_recv.dat") is Direction.RECV
    assert Direction.of_file("x/msgs_sent.dat") is Direction.SENT
    assert Direction.of_file("recv_folder/msgs_sent.dat") is Direction.SENT  # the stem only


@pytest.mark.parametrize(
    "host,port,name",
    [
        ("203.0.113.7", 8333, "203.0.113.7_8333"),
        ("2001:db8::1", 8333, "[2001_db8__1]_8333"),
        ("2001:0db8:0000::0001", 8333, "[2001_db8__1]_8333"),
        ("::ffff:10.0.0.1", 18444, "10.0.0.1_18444"),
        ("::", 0, "[__]_0"),
        ("xyz.onion", 8333, "xyz.onion_8333"),
        ("localhost", 18444, "localhost_18444"),
        ("../../etc", 1, "%2E.%2F..%2Fetc_1"),
        ("a/b", 1, "a%2Fb_1"),
        ("nul\0byte", 1, "nul%00byte_1"),
        ("fe80::1%eth0", 8333, "[fe80__1]_8333"),
    ],
)
def test_peer_folder_names(host: str, port: int, name: str) -> None:
    assert peer_folder_name(host, port) == name


def test_addr_port_string() -> None:
    assert addr_port_string("2001:db8::1", 8333) == "[2001:db8::1]:8333"


def test_long_names_are_cut() -> None:
    name = peer_folder_name("a" * 300, 8333)
    assert len(name) == 255 and name.endswith("_8333")


@settings(max_examples=300, deadline=None)
@given(host=st.text(max_size=300), port=st.integers(0, 65535))
def test_any_hostname_stays_inside_capture_dir(host: str, port: int) -> None:
    root = Path("/tmp/msgcap-root-for-naming-test")
    name = peer_folder_name(host, port)
    assert "/" not in name and "\0" not in name and name not in (".", "..")
    folder = capture_folder(root, name, Layout.CORE)
    assert folder.parent == root


def test_session_layout(tmp_path: Path) -> None:
    start = dt.datetime(2026, 11, 25, 16, 5, 1, 123456, tzinfo=dt.UTC)
    folder = capture_folder(
        tmp_path, "127.0.0.1_18444", Layout.SESSION, start=start, connection_id=7
    )
    assert folder == tmp_path / "127.0.0.1_18444" / "20261125T160501.123456Z_7"
    assert peer_of_capture_file(folder / "msgs_recv.dat") == "127.0.0.1_18444"
    assert peer_of_capture_file(tmp_path / "127.0.0.1_18444" / "msgs_recv.dat") == (
        "127.0.0.1_18444"
    )


def test_capture_folder_rejects_unsafe_names(tmp_path: Path) -> None:
    for bad in ("..", ".", "a/b", ""):
        with pytest.raises(ValueError):
            capture_folder(tmp_path, bad, Layout.CORE)


def test_clock_strictly_increases() -> None:
    clock = Clock()
    times: list[int] = []
    for n in [1, 5, 1, 300, 2] * 2000:  # reads that complete n messages at once
        t0 = clock.stamps(n)
        times += range(t0, t0 + n)
    assert all(b > a for a, b in itertools.pairwise(times))


def test_writer_appends_like_core(tmp_path: Path) -> None:
    folder = tmp_path / "127.0.0.1_18444"
    w = CaptureWriter(folder)
    w.write(Direction.RECV, 10, "version", b"v")
    w.write(Direction.SENT, 11, "verack", b"")
    w.close()
    w2 = CaptureWriter(folder)  # a second session appends, as Core does
    w2.write(Direction.RECV, 20, "ping", b"12345678")
    w2.close()
    assert (folder / "msgs_recv.dat").read_bytes() == encode_record(
        10, "version", b"v"
    ) + encode_record(20, "ping", b"12345678")
    assert (folder / "msgs_sent.dat").read_bytes() == encode_record(11, "verack", b"")


def test_capture_files_know_their_node(tmp_path: Path) -> None:
    from msgcap.capture.conversation import expand_paths

    for rel in ("n1/127.0.0.1_18444", "n2/127.0.0.1_18444/20261127T101010.000001Z_3",
                "127.0.0.1_8333"):  # fmt: skip
        folder = tmp_path / rel
        folder.mkdir(parents=True)
        (folder / "msgs_recv.dat").write_bytes(b"")
    found = {(f.node, f.peer) for f in expand_paths([str(tmp_path)])}
    assert found == {("n1", "127.0.0.1_18444"), ("n2", "127.0.0.1_18444"),
                     (None, "127.0.0.1_8333")}  # fmt: skip
    (one,) = expand_paths([str(tmp_path / "n1" / "127.0.0.1_18444")])  # a peer folder itself
    assert (one.node, one.peer) == (None, "127.0.0.1_18444")
