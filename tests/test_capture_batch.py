"""The capture write path (msgcap.capture.batch): the native helper (capture/_capture.c)
against its Python twin, and what the proxy's capture does when either fails.

Both take a batch of unchecked frames, tell valid from invalid as Core would and append
the valid ones to the capture file; they must agree byte for byte. Any exception on the
path is a capture failure: a ``capture_error`` event, then the policy.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgcap.capture import batch
from msgcap.capture.framing import HEADER_SIZE, FrameDecoder, UncheckedFrame, encode_frame
from msgcap.capture.records import Direction, Record, read_records
from msgcap.proxy.config import config_from_dict
from msgcap.proxy.events import EventLog
from msgcap.proxy.store import CaptureStopped, CaptureStore, ConnectionCapture
from tests.conftest import MAGIC

BUILT: batch.WriteChecked | None
try:  # the helper itself, also where MSGCAP_PURE_PYTHON keeps msgcap from loading it
    from msgcap.capture._capture import write_checked as BUILT
except ImportError:
    BUILT = None
NATIVE = BUILT is not None
IMPLEMENTATIONS: dict[str, batch.WriteChecked | None] = {
    "native": BUILT,
    "python": batch.python_write_checked,
}


def test_native_helper_is_built_when_required() -> None:
    required = bool(os.environ.get("MSGCAP_REQUIRE_NATIVE_CAPTURE"))
    if not required and not NATIVE:
        pytest.skip("capture/_capture.c not compiled (a compiler and OpenSSL's headers)")
    assert NATIVE, "capture/_capture.c was not compiled (OpenSSL headers are there)"
    pure = bool(os.environ.get("MSGCAP_PURE_PYTHON"))
    assert batch.NATIVE == (not pure)
    assert batch.write_checked is (batch.python_write_checked if pure else BUILT)


def use(monkeypatch: pytest.MonkeyPatch, way: str) -> batch.WriteChecked:
    impl = IMPLEMENTATIONS[way]
    if impl is None:
        pytest.skip("capture/_capture.c not compiled")
    monkeypatch.setattr(batch, "write_checked", impl)
    return impl


def open_capture(
    tmp: Path, policy: str = "continue", **limits: int
) -> tuple[CaptureStore, ConnectionCapture]:
    config = config_from_dict({
        "network": "regtest", "capture_dir": str(tmp), "socks5": {"listen": "127.0.0.1:0"},
        "on_capture_error": policy, "limits": limits,
    })  # fmt: skip
    store = CaptureStore(config, EventLog(config.event_log_path))
    return store, store.open("127.0.0.1_8333", 1)


def events(tmp: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (tmp / "events.jsonl").read_text().splitlines()]


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
    for way, impl in IMPLEMENTATIONS.items():
        tmp = tmp_path_factory.mktemp(way)
        store, capture = open_capture(tmp)
        with pytest.MonkeyPatch.context() as m:
            assert impl is not None
            m.setattr(batch, "write_checked", impl)
            result = capture.capture(Direction.SENT, 1000, frames)
        capture.close()
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
    assert [(r.msgtype.text, r.payload) for r in records] == [
        (t, p) for t, p, how in messages if how == "ok"
    ]


@pytest.mark.parametrize("way", ["native", "python"])
def test_quota_within_a_batch(tmp_path: Path, way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, way)
    big = encode_frame(MAGIC, "block", bytes(1000))
    frames = frames_of(big * 3, [])
    store, capture = open_capture(tmp_path, capture_bytes_per_peer=2500)
    ok, captured = capture.capture(Direction.RECV, 1, frames)
    assert ok == [True, True, True] and captured == 2  # the third would pass the quota
    assert store.total == 2 * (1000 + HEADER_SIZE) and not capture.active
    assert [e["event"] for e in events(tmp_path)] == ["capture_limit"]
    capture.close()


def failing(impl: batch.WriteChecked, error: Exception) -> batch.WriteChecked:
    def write_checked(fd: int, items: list[batch.BatchItem]) -> list[bool]:
        impl(-1, items)  # the implementation runs, then fails as OpenSSL or the disk would
        raise error

    return write_checked


FAILURES: dict[str, Callable[[batch.WriteChecked], batch.WriteChecked]] = {
    "disk full": lambda impl: impl,  # real: the file is /dev/full
    "OpenSSL failure": lambda impl: failing(impl, RuntimeError("OpenSSL SHA-256 failed")),
    "a bug": lambda impl: failing(impl, TypeError("each frame must be a tuple")),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("way", ["native", "python"])
@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_any_failure_is_a_capture_error(
    tmp_path: Path, way: str, failure: str, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    impl = use(monkeypatch, way)
    monkeypatch.setattr(batch, "write_checked", FAILURES[failure](impl))
    frames = frames_of(encode_frame(MAGIC, "ping", bytes(8)) * 2, [])
    store, capture = open_capture(tmp_path, policy)
    assert capture.writer is not None
    if failure == "disk full":
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, capture.writer.fd(Direction.RECV))  # ENOSPC from now on
        os.close(full)
    if policy == "stop":
        with pytest.raises(CaptureStopped):
            capture.capture(Direction.RECV, 1, frames)
    else:
        assert capture.capture(Direction.RECV, 1, frames) == ([True, True], 0)
    assert not capture.active and store.total == 0
    (event,) = events(tmp_path)
    assert event["event"] == "capture_error" and event["policy"] == policy
    expected = {"disk full": "No space left on device", "OpenSSL failure": "OpenSSL",
                "a bug": "TypeError"}[failure]  # fmt: skip
    assert expected in str(event["error"])
    capture.close()


@pytest.mark.skipif(not NATIVE, reason="capture/_capture.c not compiled")
def test_native_rejects_malformed_batches(tmp_path: Path) -> None:
    native = BUILT
    assert native is not None
    _, capture = open_capture(tmp_path)
    assert capture.writer is not None
    fd = capture.writer.fd(Direction.RECV)
    with pytest.raises(TypeError):
        native(fd, [["a", "list"]])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        native(fd, [("not", "a", "frame")])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        native(fd, [(b"short", (b"",), b"1234")])
    rng = random.Random(1)
    payload = rng.randbytes(100)
    assert native(fd, [(bytes(24), (payload,), b"\0\0\0\0")]) == [False]
    capture.close()


@pytest.mark.parametrize("way", ["native", "python"])
def test_check_only_writes_nothing(tmp_path: Path, way: str) -> None:
    impl = IMPLEMENTATIONS[way]
    if impl is None:
        pytest.skip("capture/_capture.c not compiled")
    payload = b"abc"
    good = encode_frame(MAGIC, "tx", payload)[20:24]
    assert impl(-1, [(bytes(24), (payload,), good), (bytes(24), (payload,), b"0000")]) == [
        True,
        False,
    ]
