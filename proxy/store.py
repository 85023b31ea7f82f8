"""Capture files for live connections, with quotas and the capture-error policy."""

from __future__ import annotations

import datetime as dt
import os
from collections import Counter
from collections.abc import Callable

from capture.framing import UncheckedFrame, msgtype_is_valid
from capture.layout import Layout, capture_folder
from capture.records import RECORD_HEADER, RECORD_HEADER_SIZE
from capture.writer import CaptureWriter
from proxy.config import CaptureErrorPolicy, Config
from proxy.events import EventLog

native_write_checked: (
    Callable[[int, list[tuple[bytes, tuple[bytes | memoryview, ...], bytes]]], list[bool]] | None
)
try:  # the native helper (capture/_capture.c), when it was built
    from capture._capture import write_checked as native_write_checked
except ImportError:  # pragma: no cover - depends on the build
    native_write_checked = None
if os.environ.get("MSGCAP_PURE_PYTHON"):  # as for the parser: Python code regardless
    native_write_checked = None


class CaptureStopped(Exception):
    """Capture failed under the ``stop`` policy: the connection must close."""


class ConnectionCapture:
    """One connection's capture: writes records, counts them, enforces quotas."""

    def __init__(self, store: CaptureStore, peer: str, conn_id: int, enabled: bool) -> None:
        self.store = store
        self.peer = peer
        self.conn_id = conn_id
        self.writer: CaptureWriter | None = None
        self.active = enabled
        self.bytes = 0
        if not enabled:
            return
        try:
            folder = capture_folder(
                store.root,
                peer,
                store.layout,
                start=dt.datetime.now(dt.UTC),
                connection_id=conn_id,
            )
            self.writer = CaptureWriter(folder)
        except (OSError, ValueError) as e:
            self._failed(f"cannot open capture files: {e}")

    def write(self, recv: bool, frames: list[tuple[int, bytes, bytes]]) -> int:
        """Capture ``(time, 12-byte raw type, payload)`` messages of one direction with
        one write; returns how many were captured (fewer when a quota is hit or the disk
        fails)."""
        if not self.active or self.writer is None:
            return 0
        pack = RECORD_HEADER.pack
        parts: list[bytes] = []
        size = sum(len(payload) for _, _, payload in frames) + RECORD_HEADER_SIZE * len(frames)
        if self.store.reserve(self.peer, size) is None:  # all of them, the usual case
            for time_us, raw_msgtype, payload in frames:
                parts += (pack(time_us, raw_msgtype, len(payload)), payload)
            count = len(frames)
        else:  # a quota is hit within these: capture up to it
            count = size = 0
            for time_us, raw_msgtype, payload in frames:
                n = RECORD_HEADER_SIZE + len(payload)
                quota = self.store.reserve(self.peer, n)
                if quota is not None:
                    self.active = False
                    self.store.events.emit(
                        "capture_limit",
                        conn=self.conn_id,
                        peer=self.peer,
                        limit=quota,
                        note="capture stopped, forwarding continues",
                    )
                    break
                parts += (pack(time_us, raw_msgtype, len(payload)), payload)
                size += n
                count += 1
        if not parts:
            return 0
        try:
            self.writer.write_parts(recv, parts)
        except OSError as e:
            self.store.release(self.peer, size)
            self._failed(f"cannot write capture: {e}")
            return 0
        self.bytes += size
        return count

    def write_checked(
        self, recv: bool, t0: int, frames: list[UncheckedFrame], size: int
    ) -> tuple[list[bool], int] | None:
        """Check frames and capture the valid ones (the i-th at time ``t0 + i``; ``size``
        is their records' total) in one native call that releases the GIL once: which
        frames are valid, and how many were captured. None when it must be done the
        Python way (no native helper, capture off, or a quota within reach)."""
        if native_write_checked is None or not self.active or self.writer is None:
            return None
        if self.store.reserve(self.peer, size) is not None:
            return None
        pack = RECORD_HEADER.pack
        typed = [msgtype_is_valid(f.raw_msgtype) for f in frames]
        batch = [
            (pack(t0 + i, f.raw_msgtype, f.length), f.parts, f.expected_checksum)
            for i, f in enumerate(frames)
            if typed[i]
        ]
        try:
            written = iter(native_write_checked(self.writer.fd(recv), batch))
        except OSError as e:
            self.store.release(self.peer, size)
            self._failed(f"cannot write capture: {e}")
            return None  # the Python way tells valid from invalid; capture is off now
        ok = [typed[i] and next(written) for i in range(len(frames))]
        kept = sum(f.length for f, w in zip(frames, ok, strict=True) if w)
        kept += RECORD_HEADER_SIZE * ok.count(True)
        self.store.release(self.peer, size - kept)
        self.bytes += kept
        return ok, ok.count(True)

    def _failed(self, reason: str) -> None:
        self.active = False
        policy = self.store.on_error
        self.store.events.emit(
            "capture_error", conn=self.conn_id, peer=self.peer, error=reason, policy=policy.value
        )
        if policy is CaptureErrorPolicy.STOP:
            raise CaptureStopped(reason)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class CaptureStore:
    def __init__(self, config: Config, events: EventLog) -> None:
        self.root = config.capture_dir
        self.layout: Layout = config.layout
        self.on_error = config.on_capture_error
        self.per_peer_limit = config.limits.capture_bytes_per_peer
        self.total_limit = config.limits.capture_bytes_total
        self.events = events
        self.per_peer: Counter[str] = Counter()
        self.total = 0
        self.writable = True
        problem = self._check_root()
        if problem is not None:
            self.writable = False
            events.emit("capture_error", error=problem, policy=self.on_error.value,
                        note="no capture until it is writable" if self.on_error is
                        CaptureErrorPolicy.CONTINUE else "refusing connections")  # fmt: skip

    def _check_root(self) -> str | None:
        """Why the capture directory cannot take files, or None."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".msgcap-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return f"capture directory {self.root} is not writable: {e.strerror or e}"
        return None

    def open(self, peer: str, conn_id: int, enabled: bool = True) -> ConnectionCapture:
        """The capture of one connection; ``enabled=False`` opens no files (BIP324
        passthrough, where there is nothing to capture)."""
        return ConnectionCapture(self, peer, conn_id, enabled)

    def reserve(self, peer: str, size: int) -> str | None:
        """Count ``size`` bytes against the quotas; the name of the quota hit, if any."""
        if self.per_peer[peer] + size > self.per_peer_limit:
            return f"capture_bytes_per_peer={self.per_peer_limit}"
        if self.total + size > self.total_limit:
            return f"capture_bytes_total={self.total_limit}"
        self.per_peer[peer] += size
        self.total += size
        return None

    def release(self, peer: str, size: int) -> None:
        self.per_peer[peer] -= size
        self.total -= size
