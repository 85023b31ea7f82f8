"""Core's capture record format, the streaming reader, folder naming, clock and writer."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgcap.capture import native
from msgcap.capture.conversation import python_plan, python_tally
from msgcap.capture.framing import MsgType
from msgcap.capture.layout import (
    CapturePath,
    Layout,
    addr_port_string,
    capture_folder,
    peer_folder_name,
)
from msgcap.capture.records import (
    MAX_RECORD_PAYLOAD,
    MAX_TIME,
    RECORD_HEADER_SIZE,
    Damage,
    Direction,
    Record,
    RecordChunks,
    RecordFilter,
    encode_record,
    python_scan,
    read_record_headers,
    read_records,
    walk_records,
)
from msgcap.capture.writer import CaptureWriter, Clock
from tests.conftest import BATCH_ARGUMENTS, PAIR, packed_plan

CORE_FILES = sorted(PAIR.rglob("*.dat"))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(PAIR)))
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
    assert CapturePath.of(folder / "msgs_recv.dat") == (
        tmp_path,
        "127.0.0.1_18444",
        "20261125T160501.123456Z_7",
    )
    assert CapturePath.of(tmp_path / "127.0.0.1_18444" / "msgs_recv.dat") == (
        tmp_path,
        "127.0.0.1_18444",
        None,
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


# --- reading in bulk: chunks, scan, the merge plan -------------------------------------


def reference_records(data: bytes) -> list[Record | Damage]:
    """What a reader must make of a whole file, read the simplest way."""
    out: list[Record | Damage] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < RECORD_HEADER_SIZE:
            out.append(Damage(pos, "", len(data) - pos))
            break
        time_us, raw, length = struct.unpack_from("<Q12sI", data, pos)
        end = pos + RECORD_HEADER_SIZE + length
        if length > MAX_RECORD_PAYLOAD or end > len(data):
            out.append(Damage(pos, "", len(data) - pos))
            break
        out.append(Record(time_us, raw, data[pos + RECORD_HEADER_SIZE : end], pos))
        pos = end
    return out


def without_reasons(items: list[Record | Damage]) -> list[Record | Damage]:
    return [Damage(i.offset, "", i.skipped) if isinstance(i, Damage) else i for i in items]


capture_bytes = st.lists(
    st.one_of(
        st.builds(
            encode_record,
            st.integers(0, 40) | st.integers(0, 2**64 - 1),
            st.sampled_from(["ping", "tx", "inv", "verack"]),
            st.binary(max_size=90),
        ),
        st.binary(max_size=30),
    ),
    max_size=10,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=capture_bytes, chunk_size=st.integers(1, 200))
def test_chunks_of_any_size_read_the_same(data: bytes, chunk_size: int) -> None:
    """RecordChunks (which read_records is built on) finds the same records and damage
    whatever its chunk size, as the simplest reader does."""
    want = reference_records(data)
    assert without_reasons(records_of(data)) == want
    chunks = RecordChunks(io.BytesIO(data), chunk_size)
    got: list[Record | Damage] = []
    while chunks.fill():
        end = chunks.whole_end()
        got += walk_records(chunks.data, chunks.pos, end, chunks.base)
        chunks.pos = end
    if chunks.damage is not None:
        got.append(chunks.damage)
    assert without_reasons(got) == want
    assert not chunks.fill()  # done stays done


native_module = native.load("msgcap.capture._capture")
needs_native = pytest.mark.skipif(native_module is None, reason="capture/_capture.c not built")


@needs_native
def test_native_record_limit_is_ours() -> None:
    assert native_module is not None
    assert native_module.MAX_RECORD_PAYLOAD == MAX_RECORD_PAYLOAD


@needs_native
@settings(max_examples=500, deadline=None)
@given(
    data=capture_bytes,
    pos=st.integers(0, 400),
    limit=st.integers(0, 50) | st.just(MAX_TIME),
    last=st.integers(0, 20),
)
def test_scan_native_and_python_agree(data: bytes, pos: int, limit: int, last: int) -> None:
    assert native_module is not None
    pos = min(pos, len(data))
    assert native_module.scan(data, pos, limit, last) == python_scan(data, pos, limit, last)


def test_scan_rejects_positions_outside() -> None:
    if native_module is not None:
        with pytest.raises(ValueError):
            native_module.scan(GOOD, len(GOOD) + 1, MAX_TIME, 0)


chunk_lists = st.lists(
    st.lists(st.integers(0, 12), min_size=1, max_size=8).map(
        lambda times: b"".join(encode_record(t, "ping", b"x" * (t % 3)) for t in sorted(times))
    ),
    min_size=1,
    max_size=4,
)


@given(chunks=chunk_lists)
def test_plan_is_a_stable_merge(chunks: list[bytes]) -> None:
    """Batches of plans, as conversation.py makes them, give Core's order: a stable sort
    by time over the chunks in the order given; native and Python plans are the same."""
    want = sorted(
        (
            (rec.time, k, rec.offset)
            for k, c in enumerate(chunks)
            for rec in walk_records(c, 0, len(c))
        ),
        key=lambda e: e[0],
    )
    for plan_fn in [python_plan] + ([native_module.plan] if native_module else []):
        live = list(range(len(chunks)))
        positions = [0] * len(chunks)
        times = [struct.unpack_from("<Q", c)[0] for c in chunks]
        got = []
        while live:
            plan, new_pos, new_times, stopped = plan_fn(
                [chunks[k] for k in live], [positions[k] for k in live], [times[k] for k in live]
            )
            runs = memoryview(plan).cast("q")
            for i in range(0, len(runs), 3):
                k = live[runs[i]]
                got += [
                    (r.time, k, r.offset) for r in walk_records(chunks[k], runs[i + 1], runs[i + 2])
                ]
            for j, k in enumerate(live):
                positions[k], times[k] = new_pos[j], new_times[j]
            del live[stopped]
        assert got == want, plan_fn


def test_record_filter() -> None:
    f = RecordFilter(since=5, until=9, types=frozenset({b"ping"}))
    assert f.accepts(5, b"ping\0\0\0\0\0\0\0\0") and not f.accepts(10, b"ping".ljust(12, b"\0"))
    assert not f.accepts(6, b"pong".ljust(12, b"\0"))
    assert f.bounds == (5, 9, (b"ping",))
    assert RecordFilter().bounds == (0, MAX_TIME, None)
    assert RecordFilter(since=-5, until=2**70).bounds == (0, MAX_TIME, None)
    for empty in (RecordFilter(since=9, until=5), RecordFilter(until=-1),
                  RecordFilter(since=2**64)):  # fmt: skip
        assert empty.bounds[2] == ()  # nothing passes
    data = encode_record(1, "pong", b"") + encode_record(7, "ping", b"") + GOOD
    assert f.next_taken(data, 0, len(data)) == 24
    assert RecordFilter(types=frozenset()).next_taken(data, 0, len(data)) == len(data)


@needs_native
@given(
    chunks=st.lists(capture_bytes, min_size=1, max_size=3),
    since=st.integers(0, 20),
    until=st.integers(0, 50) | st.just(MAX_TIME),
    types=st.none() | st.sets(st.sampled_from([b"ping", b"tx", b"inv", b"pong"])),
)
def test_tally_native_and_python_agree(
    chunks: list[bytes], since: int, until: int, types: set[bytes] | None
) -> None:
    assert native_module is not None
    plan = b"".join(struct.pack("<3q", k, 0, whole_end(c)) for k, c in enumerate(chunks))
    wanted = None if types is None else tuple(sorted(types))
    counts: list[list[dict[bytes, tuple[int, int]]]] = [[{} for _ in chunks] for _ in range(2)]
    native_module.tally(counts[0], chunks, plan, since, until, wanted)
    python_tally(counts[1], chunks, plan, since, until, wanted)
    assert counts[0] == counts[1]


def whole_end(data: bytes) -> int:
    """Where the whole records at the start of data end."""
    chunks = RecordChunks(io.BytesIO(data))
    return chunks.whole_end() if chunks.fill() else 0


@needs_native
@settings(max_examples=1000, deadline=None)
@given(time=st.integers(-1, 20), **BATCH_ARGUMENTS)
def test_batch_functions_take_any_arguments_safely(
    chunks: list[bytes], plan: list[int], pos: int, time: int
) -> None:
    """Arguments that do not describe whole records raise ValueError; nothing else
    happens (run under AddressSanitizer too: see the report of issue 11). The parser's
    render_batch: tests/test_fastjson.py."""
    assert native_module is not None
    packed = packed_plan(plan)
    try:
        native_module.tally([{} for _ in chunks], chunks, packed, 0, MAX_TIME, None)
    except ValueError:
        pass
    try:
        native_module.plan(chunks, [max(pos, 0)] * len(chunks), [max(time, 0)] * len(chunks))
    except (ValueError, OverflowError):
        pass
