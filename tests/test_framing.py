"""The sans-IO v1 frame decoder: fed whole, one byte at a time, and with trailing bytes."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgcap.capture.framing import (
    MAX_PROTOCOL_MESSAGE_LENGTH,
    NEED_DATA,
    BadMagic,
    Frame,
    FrameDecoder,
    FrameProblem,
    InvalidFrame,
    Network,
    Oversize,
    StreamError,
    UncheckedFrame,
    checksum,
    encode_frame,
    encode_raw_frame,
    msgtype_is_valid,
    parse_magic,
    v1_version_prefix,
)

REGTEST = Network.REGTEST.magic


def drain(dec: FrameDecoder) -> list[Frame | InvalidFrame]:
    out: list[Frame | InvalidFrame] = []
    while (ev := dec.next_event()) is not NEED_DATA:
        assert not isinstance(ev, type(NEED_DATA))
        out.append(ev)
    return out


def feed(chunks: Iterable[bytes], magic: bytes = REGTEST) -> list[Frame | InvalidFrame]:
    dec = FrameDecoder(magic)
    events: list[Frame | InvalidFrame] = []
    for c in chunks:
        dec.receive_data(c)
        events.extend(drain(dec))
    return events


STREAM = (
    encode_frame(REGTEST, "version", b"v" * 103)
    + encode_frame(REGTEST, "verack", b"")
    + encode_frame(REGTEST, "ping", (7).to_bytes(8, "little"))
)


def summary(events: list[Frame | InvalidFrame]) -> list[tuple[str, bytes, int]]:
    return [(e.msgtype, e.payload, e.offset) for e in events if isinstance(e, Frame)]


EXPECTED = [
    ("version", b"v" * 103, 0),
    ("verack", b"", 127),
    ("ping", (7).to_bytes(8, "little"), 151),
]


def test_whole() -> None:
    assert summary(feed([STREAM])) == EXPECTED


def test_one_byte_at_a_time() -> None:
    assert summary(feed(STREAM[i : i + 1] for i in range(len(STREAM)))) == EXPECTED


def test_trailing_partial_frame_waits() -> None:
    tail = encode_frame(REGTEST, "pong", b"12345678")[:30]
    dec = FrameDecoder(REGTEST)
    dec.receive_data(STREAM + tail)
    assert summary(drain(dec)) == EXPECTED
    assert dec.buffered == 30
    assert dec.next_event() is NEED_DATA


def test_encode_frame_layout() -> None:
    frame = encode_frame(REGTEST, "ping", b"\x00" * 8)
    assert frame[:4] == bytes.fromhex("fabfb5da")
    assert frame[4:16] == b"ping" + b"\0" * 8
    assert frame[16:20] == (8).to_bytes(4, "little")
    assert frame[20:24] == checksum(b"\x00" * 8)
    assert checksum(b"") == bytes.fromhex("5df6e0e2")


def test_encode_raw_frame_keeps_the_type_field() -> None:
    """A capture record's 12-byte type field goes on the wire byte for byte, valid or not
    (what the fuzz and pcap exports write)."""
    ping = encode_frame(REGTEST, "ping", b"x")
    assert encode_raw_frame(REGTEST, b"ping" + bytes(8), b"x") == ping
    raw = b"p\x00ng\xff" + bytes(7)
    frame = encode_raw_frame(REGTEST, raw, b"")
    assert frame[4:16] == raw and frame[20:24] == checksum(b"")
    assert isinstance(feed([frame])[0], InvalidFrame)


def test_magics() -> None:
    assert {n.value: n.magic.hex() for n in Network} == {
        "main": "f9beb4d9",
        "testnet3": "0b110907",
        "testnet4": "1c163f28",
        "signet": "0a03cf40",
        "regtest": "fabfb5da",
    }
    assert parse_magic("regtest") == REGTEST
    assert parse_magic("01020304") == b"\x01\x02\x03\x04"
    with pytest.raises(ValueError, match="unknown network"):
        parse_magic("bogus")


def test_custom_magic() -> None:
    magic = b"\x01\x02\x03\x04"
    events = feed([encode_frame(magic, "verack", b"")], magic)
    assert summary(events) == [("verack", b"", 0)]


def test_wrong_magic_is_fatal_and_sticky() -> None:
    dec = FrameDecoder(REGTEST)
    dec.receive_data(encode_frame(REGTEST, "verack", b"") + encode_frame(b"ABCD", "ping", b""))
    assert isinstance(dec.next_event(), Frame)
    with pytest.raises(BadMagic) as e:
        dec.next_event()
    assert e.value.offset == 24 and e.value.actual == b"ABCD"
    with pytest.raises(BadMagic):
        dec.next_event()


def test_wrong_magic_detected_from_first_byte() -> None:
    dec = FrameDecoder(REGTEST)
    dec.receive_data(b"\x00")
    with pytest.raises(BadMagic):
        dec.next_event()


def test_oversize_rejected_before_payload_arrives() -> None:
    header = encode_frame(REGTEST, "block", b"")[:16] + (MAX_PROTOCOL_MESSAGE_LENGTH + 1).to_bytes(
        4, "little"
    )
    dec = FrameDecoder(REGTEST)
    dec.receive_data(header + b"\0\0\0\0")
    with pytest.raises(Oversize) as e:
        dec.next_event()
    assert e.value.length == MAX_PROTOCOL_MESSAGE_LENGTH + 1


def test_max_length_is_allowed() -> None:
    payload = bytes(MAX_PROTOCOL_MESSAGE_LENGTH)
    assert summary(feed([encode_frame(REGTEST, "block", payload)])) == [("block", payload, 0)]


def test_bad_checksum_is_reported_and_skipped() -> None:
    bad = bytearray(encode_frame(REGTEST, "ping", b"12345678"))
    bad[20] ^= 0xFF
    events = feed([bytes(bad) + encode_frame(REGTEST, "verack", b"")])
    assert isinstance(events[0], InvalidFrame) and events[0].reason is FrameProblem.BAD_CHECKSUM
    assert events[0].expected_checksum != events[0].actual_checksum
    assert "bad checksum" in events[0].describe()
    assert summary(events) == [("verack", b"", 32)]


@pytest.mark.parametrize(
    "raw,valid",
    [
        (b"version\0\0\0\0\0", True),
        (b"\0" * 12, True),
        (b"abcdefghijkl", True),
        (b"a b~\0\0\0\0\0\0\0\0", True),
        (b"ver\0sion\0\0\0\0", False),
        (b"ver\x01ion\0\0\0\0\0", False),
        (b"ver\x7fion\0\0\0\0\0", False),
        (b"v\xc3\xa9rsion\0\0\0\0", False),
    ],
)
def test_msgtype_validity_rule(raw: bytes, valid: bool) -> None:
    assert msgtype_is_valid(raw) is valid


def test_invalid_type_is_reported_and_skipped() -> None:
    payload = b"xy"
    frame = REGTEST + b"ba\x01d\0\0\0\0\0\0\0\0" + len(payload).to_bytes(4, "little")
    frame += checksum(payload) + payload
    events = feed([frame + encode_frame(REGTEST, "verack", b"")])
    assert isinstance(events[0], InvalidFrame) and events[0].reason is FrameProblem.INVALID_TYPE
    assert summary(events) == [("verack", b"", len(frame))]


def test_unknown_valid_type_is_a_frame() -> None:
    assert summary(feed([encode_frame(REGTEST, "futuremsg", b"!")])) == [("futuremsg", b"!", 0)]


def test_v1_version_prefix() -> None:
    assert STREAM.startswith(v1_version_prefix(REGTEST))
    assert len(v1_version_prefix(REGTEST)) == 16


frames_strategy = st.lists(
    st.tuples(
        st.sampled_from(["inv", "tx", "ping", "block", "x", "abcdefghijkl"]),
        st.binary(max_size=600),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(frames=frames_strategy, cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_any_chunking_gives_the_same_frames(
    frames: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(REGTEST, t, p) for t, p in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    events = feed(chunks)
    assert [(e.msgtype, e.payload) for e in events if isinstance(e, Frame)] == frames
    assert len(events) == len(frames)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000), chunk=st.integers(1, 64))
def test_arbitrary_bytes_only_raise_stream_errors(data: bytes, chunk: int) -> None:
    # Starting with a valid prefix exercises more than the magic check.
    stream = encode_frame(REGTEST, "ping", b"12345678") + data
    dec = FrameDecoder(REGTEST, max_length=1000)
    try:
        for i in range(0, len(stream), chunk):
            dec.receive_data(stream[i : i + chunk])
            drain(dec)
    except StreamError as e:
        assert 0 <= e.offset <= len(stream)


def _one_by_one(dec: FrameDecoder) -> tuple[list[UncheckedFrame], StreamError | None]:
    out: list[UncheckedFrame] = []
    try:
        while (ev := dec.next_unchecked()) is not NEED_DATA:
            out.append(ev)
    except StreamError as e:
        return out, e
    return out, None


@settings(max_examples=300, deadline=None)
@given(
    frames=frames_strategy,
    junk=st.binary(max_size=40),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_batch_take_equals_one_by_one(
    frames: list[tuple[str, bytes]], junk: bytes, cuts: list[int]
) -> None:
    """take_unchecked (the proxy's fast path) returns exactly what next_unchecked would,
    frame by frame, including where the stream breaks (junk after the frames)."""
    stream = b"".join(encode_frame(REGTEST, t, p) for t, p in frames) + junk
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    batch, single = FrameDecoder(REGTEST, max_length=5000), FrameDecoder(REGTEST, max_length=5000)
    for c in chunks:
        batch.receive_data(c)
        single.receive_data(c)
        got, error = batch.take_unchecked()
        want, want_error = _one_by_one(single)
        assert [
            (f.raw_msgtype, f.payload, f.length, f.offset, f.expected_checksum) for f in got
        ] == [(f.raw_msgtype, f.payload, f.length, f.offset, f.expected_checksum) for f in want]
        assert (type(error), getattr(error, "offset", None)) == (
            type(want_error),
            getattr(want_error, "offset", None),
        )
        assert (batch.offset, batch.buffered) == (single.offset, single.buffered)
        if error is not None:
            break
