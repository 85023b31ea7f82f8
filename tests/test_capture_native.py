"""The capture thread's native helper (capture/_capture.c) against the Python way.

Both take a batch of unchecked frames, tell valid from invalid as Core would and append
the valid ones to the capture file; they must agree byte for byte.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capture.framing import HEADER_SIZE, FrameDecoder, Network, UncheckedFrame, encode_frame
from capture.records import Record, read_records
from proxy import store as store_module
from proxy.config import config_from_dict
from proxy.events import EventLog
from proxy.relay import Relay
from proxy.store import CaptureStore, ConnectionCapture

MAGIC = Network.REGTEST.magic
NATIVE = store_module.native_write_checked is not None


def test_native_helper_is_built_when_required() -> None:
    if os.environ.get("MSGCAP_REQUIRE_NATIVE_CAPTURE"):
        assert NATIVE, "capture/_capture.c was not compiled (OpenSSL headers are there)"
    elif not NATIVE:
        pytest.skip("capture/_capture.c not compiled (a compiler and OpenSSL's headers)")


def open_capture(tmp: Path, **limits: int) -> tuple[CaptureStore, ConnectionCapture]:
    config = config_from_dict({
        "network": "regtest", "capture_dir": str(tmp), "socks5": {"listen": "127.0.0.1:0"},
        "limits": limits,
    })  # fmt: skip
    store = CaptureStore(config, EventLog(config.event_log_path))
    return store, store.open("127.0.0.1_8333", 1)


def frames_of(stream: bytes, cuts: list[int]) -> list[UncheckedFrame]:
    """Frames as the relay sees them: pieces of chunks cut at ``cuts``."""
    dec = FrameDecoder(MAGIC)
    out: list[UncheckedFrame] = []
    points = sorted({c % (len(stream) + 1) for c in cuts})
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        dec.receive_data(stream[a:b])
        got, error = dec.take_unchecked()
        assert error is None
        out += got
    return out


def records_size(frames: list[UncheckedFrame]) -> int:
    return sum(HEADER_SIZE + f.length for f in frames)


def corrupt(frame: bytes, how: str) -> bytes:
    if how == "checksum":
        return frame[:20] + bytes(b ^ 0xFF for b in frame[20:24]) + frame[24:]
    if how == "type":
        return frame[:4] + b"bad\x00type\x00\x00\x00\x00" + frame[16:]
    return frame


message = st.tuples(
    st.sampled_from(["tx", "block", "inv", "ping", "verack"]),
    st.one_of(st.binary(max_size=300), st.integers(0, 300_000).map(lambda n: b"\x5a" * n)),
    st.sampled_from(["ok", "ok", "ok", "checksum", "type"]),
)


@pytest.mark.skipif(not NATIVE, reason="capture/_capture.c not compiled")
@settings(max_examples=60, deadline=None)
@given(messages=st.lists(message, min_size=1, max_size=8), cuts=st.lists(st.integers(), max_size=6))
def test_native_and_python_agree(
    tmp_path_factory: pytest.TempPathFactory,
    messages: list[tuple[str, bytes, str]],
    cuts: list[int],
) -> None:
    stream = b"".join(corrupt(encode_frame(MAGIC, t, p), how) for t, p, how in messages)
    frames = frames_of(stream, cuts)
    assert len(frames) == len(messages)
    results = []
    for way in ("native", "python"):
        tmp = tmp_path_factory.mktemp(way)
        store, capture = open_capture(tmp)
        relay = Relay(1, "p", MAGIC, capture, store.events, None, 0, None)
        if way == "native":
            result = capture.write_checked(False, 1000, frames, records_size(frames))
        else:
            result = relay._check_and_write(False, 1000, frames)
        capture.close()
        assert result is not None
        sent = tmp / "127.0.0.1_8333" / "msgs_sent.dat"
        results.append((result, sent.read_bytes() if sent.exists() else b"", store.total))
    assert results[0] == results[1]
    ok, captured = results[0][0]
    assert ok == [how == "ok" for _, _, how in messages]
    assert captured == ok.count(True)
    with open(tmp_path_factory.mktemp("read") / "x", "wb") as f:
        f.write(results[0][1])
    with open(f.name, "rb") as f:
        records = [r for r in read_records(f) if isinstance(r, Record)]
    assert [(r.msgtype_bytes.rstrip(b"\0").decode(), r.payload) for r in records] == [
        (t, p) for t, p, how in messages if how == "ok"
    ]


@pytest.mark.skipif(not NATIVE, reason="capture/_capture.c not compiled")
def test_native_defers_to_python_near_a_quota(tmp_path: Path) -> None:
    big = encode_frame(MAGIC, "block", bytes(1000))
    frames = frames_of(big * 3, [])
    store, capture = open_capture(tmp_path, capture_bytes_per_peer=2500)
    # the Python way stops at 2 of 3
    assert capture.write_checked(False, 1, frames, records_size(frames)) is None
    assert store.total == 0


@pytest.mark.skipif(not NATIVE, reason="capture/_capture.c not compiled")
def test_native_write_error_turns_capture_off(tmp_path: Path) -> None:
    frames = frames_of(encode_frame(MAGIC, "ping", bytes(8)), [])
    store, capture = open_capture(tmp_path)
    assert capture.writer is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, capture.writer.fd(False))  # the disk is full from now on: ENOSPC
    os.close(full)
    assert capture.write_checked(False, 1, frames, records_size(frames)) is None
    assert not capture.active and store.total == 0
    events = (tmp_path / "events.jsonl").read_text()
    assert "capture_error" in events and "No space left on device" in events
    capture.close()


@pytest.mark.skipif(not NATIVE, reason="capture/_capture.c not compiled")
def test_native_rejects_malformed_batches(tmp_path: Path) -> None:
    _, capture = open_capture(tmp_path)
    assert capture.writer is not None
    fd = capture.writer.fd(True)
    with pytest.raises(TypeError):
        store_module.native_write_checked(fd, [["a", "list"]])
    with pytest.raises(TypeError):
        store_module.native_write_checked(fd, [("not", "a", "frame")])
    with pytest.raises(ValueError):
        store_module.native_write_checked(fd, [(b"short", (b"",), b"1234")])
    rng = random.Random(1)
    payload = rng.randbytes(100)
    assert store_module.native_write_checked(fd, [(bytes(24), (payload,), b"\0\0\0\0")]) == [False]
    capture.close()
