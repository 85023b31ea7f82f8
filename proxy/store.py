"""Capture files for live connections, with quotas and the capture-error policy.

:meth:`ConnectionCapture.capture` is the capture thread's whole job for one batch of
frames: it checks them as Core does and appends the valid ones through
:mod:`msgcap.capture.batch` (the native helper or its Python twin). Any exception on that
path is a capture failure: a ``capture_error`` event, then the ``on_capture_error``
policy (``stop`` raises :class:`CaptureStopped` so that the relay closes the connection).
A batch that fails part way is not in the file (the writer cuts it off again), and a link
planted anywhere under the capture directory is refused the same way, as a
``capture_error`` that names it (:class:`msgcap.capture.writer.LinkRefused`).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from msgcap.capture import batch
from msgcap.capture.errors import MsgcapError
from msgcap.capture.framing import MsgType, UncheckedFrame, msgtype_is_valid
from msgcap.capture.layout import Layout, capture_folder
from msgcap.capture.records import RECORD_HEADER_SIZE, Direction, record_header, record_messages
from msgcap.capture.writer import CaptureWriter, probe_writable
from msgcap.proxy.config import CaptureErrorPolicy, Config
from msgcap.proxy.events import CaptureApart, CaptureError, CaptureLimit, EventLog
from msgcap.proxy.metrics import Metrics


class CaptureStopped(MsgcapError):
    """Capture failed under the ``stop`` policy: the connection must close."""


class ConnectionCapture:
    """One connection's capture: checks and writes records, enforces quotas."""

    def __init__(
        self,
        store: CaptureStore,
        peer: str,
        conn_id: int,
        enabled: bool,
        node_name: str | None = None,
    ) -> None:
        self.store = store
        self.peer = peer
        self.conn_id = conn_id
        self.node_name = node_name
        self.quota_key = peer if node_name is None else f"{node_name}/{peer}"
        self.writer: CaptureWriter | None = None
        self.active = enabled
        self.bytes = 0
        if not enabled:
            return
        root = store.root if node_name is None else store.root / node_name
        start = dt.datetime.now(dt.UTC)
        try:
            folder = capture_folder(root, peer, store.layout, start=start, connection_id=conn_id)
            if store.layout is Layout.CORE:
                live = store.claim(folder, conn_id)
                if live is not None:  # another live connection writes it: never interleave
                    shared = folder
                    folder = capture_folder(root, peer, Layout.SESSION, start=start,
                                            connection_id=conn_id)  # fmt: skip
                    store.events.emit(CaptureApart(conn=conn_id, peer=peer, capture=str(folder),
                        live_conn=live, live_capture=str(shared), node_name=node_name))  # fmt: skip
            self.writer = CaptureWriter(folder, root=store.root)  # no link followed below root
        except (OSError, ValueError) as e:
            self.failed(f"cannot open capture files: {e}")

    def capture(
        self, direction: Direction, t0: int, frames: list[UncheckedFrame], size: int = -1
    ) -> tuple[list[bool], int]:
        """Check frames as Core would and capture the valid ones, the i-th at time
        ``t0 + i``: which frames are valid, and how many were captured. ``size`` is their
        records' total when the caller has it already (the relay sums it on the event
        loop). Raises :class:`CaptureStopped` when the capture failed under the ``stop``
        policy."""
        typed = [msgtype_is_valid(f.raw_msgtype) for f in frames]
        items: list[batch.BatchItem] = [
            (
                record_header(t0 + i, MsgType.of(f.raw_msgtype), f.length),
                f.parts,
                f.expected_checksum,
            )
            for i, f in enumerate(frames)
            if typed[i]
        ]
        if size < 0:
            size = sum(f.length for f in frames) + RECORD_HEADER_SIZE * len(frames)
        writer = self.writer if self.active else None
        whole = writer is not None and self.store.reserve(self.quota_key, size) is None
        try:
            checked = batch.write_checked(writer.fd(direction) if whole and writer else -1, items)
        except Exception as e:  # any failure here is a capture failure
            if whole:
                self.store.release(self.quota_key, size)
            self.failed(f"cannot write capture: {type(e).__name__}: {e}")
            checked = batch.python_write_checked(-1, items)  # what is valid, for the stats
            whole = False
        verdicts = iter(checked)
        ok = [t and next(verdicts) for t in typed]
        metrics = self.store.metrics
        if metrics is not None:
            valid = [f for f, v in zip(frames, ok, strict=True) if v]
            metrics.messages(
                direction, [(MsgType.of(f.raw_msgtype).label, f.length) for f in valid]
            )
        if whole:
            kept = sum(f.length + RECORD_HEADER_SIZE for f, v in zip(frames, ok, strict=True) if v)
            self.store.release(self.quota_key, size - kept)
            self.bytes += kept
            return ok, ok.count(True)
        if self.active and self.writer is not None:  # a quota is within reach
            return ok, self._capture_up_to_quota(direction, items, checked)
        return ok, 0

    def capture_messages(
        self, direction: Direction, t0: int, messages: Sequence[tuple[str, bytes | memoryview]]
    ) -> int:
        """Capture messages that need no check (decrypted BIP324 messages: the AEAD tag
        was their check), the i-th at ``t0 + i``: how many were captured. Raises
        :class:`CaptureStopped` as :meth:`capture` does."""
        metrics = self.store.metrics
        if metrics is not None:
            metrics.messages(direction, [(t, len(p)) for t, p in messages])
        if not self.active or self.writer is None:
            return 0
        size = sum(len(p) for _, p in messages) + RECORD_HEADER_SIZE * len(messages)
        if self.store.reserve(self.quota_key, size) is not None:  # a quota is within reach
            items: list[batch.BatchItem] = [
                (record_header(t0 + i, MsgType.from_text(t), len(p)), (p,), b"")
                for i, (t, p) in enumerate(messages)
            ]
            return self._capture_up_to_quota(direction, items, [True] * len(items))
        parts: list[bytes | memoryview] = []
        for time_us, (t, p) in enumerate(messages, t0):
            parts += (record_header(time_us, MsgType.from_text(t), len(p)), p)
        return self._append_reserved(direction, parts, size, len(messages))

    def capture_records(self, direction: Direction, t0: int, count: int, records: bytes) -> int:
        """Capture ``count`` ready-made records (a native BIP324 pipe's, the i-th stamped
        ``t0 + i``) as :meth:`capture_messages` would capture their messages (the same
        quotas, metrics and failure policy), in one write when no quota is within reach
        and no metrics are kept."""
        size = len(records)
        if (self.store.metrics is not None or not self.active or self.writer is None
                or self.store.reserve(self.quota_key, size) is not None):  # fmt: skip
            return self.capture_messages(direction, t0, record_messages(records))
        return self._append_reserved(direction, [records], size, count)

    def _append_reserved(
        self, direction: Direction, parts: list[bytes | memoryview], size: int, count: int
    ) -> int:
        """Append ``parts`` (``count`` records, ``size`` bytes already reserved against
        the quotas): how many were captured (0 on a failure, which is logged and whose
        policy applies)."""
        assert self.writer is not None
        try:
            batch.write_all(self.writer.fd(direction), parts)
        except Exception as e:  # any failure here is a capture failure
            self.store.release(self.quota_key, size)
            self.failed(f"cannot write capture: {type(e).__name__}: {e}")
            return 0
        self.bytes += size
        return count

    def _capture_up_to_quota(
        self, direction: Direction, items: list[batch.BatchItem], valid: list[bool]
    ) -> int:
        """Capture the valid items until a quota is hit: how many were captured."""
        assert self.writer is not None
        parts: list[bytes | memoryview] = []
        size = count = 0
        for (header, pieces, _), v in zip(items, valid, strict=True):
            if not v:
                continue
            n = RECORD_HEADER_SIZE + sum(map(len, pieces))
            quota = self.store.reserve(self.quota_key, n)
            if quota is not None:
                self.active = False
                self.store.events.emit(CaptureLimit(conn=self.conn_id, peer=self.peer,
                    limit=quota, note="capture stopped, forwarding continues"))  # fmt: skip
                break
            parts += (header, *pieces)
            size += n
            count += 1
        if not parts:
            return 0
        return self._append_reserved(direction, parts, size, count)

    def failed(self, reason: str) -> None:
        """Capture has failed: log it, stop capturing, and apply the policy (``stop``
        raises :class:`CaptureStopped`)."""
        self.active = False
        policy = self.store.on_error
        self.store.events.emit(
            CaptureError(conn=self.conn_id, peer=self.peer, error=reason, policy=policy.value)
        )
        if policy is CaptureErrorPolicy.STOP:
            raise CaptureStopped(reason)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.store.unclaim(self.writer.folder, self.conn_id)


class CaptureStore:
    def __init__(self, config: Config, events: EventLog, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.root = config.capture_dir
        self.layout: Layout = config.layout
        self.on_error = config.on_capture_error
        self.per_peer_limit = config.limits.capture_bytes_per_peer
        self.total_limit = config.limits.capture_bytes_total
        self.events = events
        self.per_peer: Counter[str] = Counter()
        self._live: dict[Path, int] = {}
        """``core`` folders being written, by connection (see :meth:`claim`)."""
        self._live_lock = threading.Lock()  # claimed on the event loop, released by the worker
        self.total = 0
        self.problem = self._check_root()
        """Why the capture directory cannot take files (None: it can)."""
        if self.problem is not None:
            note = ("no capture until it is writable" if self.on_error is
                    CaptureErrorPolicy.CONTINUE else "refusing connections")  # fmt: skip
            events.emit(CaptureError(error=self.problem, policy=self.on_error.value, note=note))

    @property
    def writable(self) -> bool:
        """Whether the capture directory could take files when the store was made."""
        return self.problem is None

    def _check_root(self) -> str | None:
        """Why the capture directory cannot take files, or None."""
        try:
            probe_writable(self.root)
        except OSError as e:
            where = f" ({e.filename})" if e.filename and e.filename != str(self.root) else ""
            return f"capture directory {self.root} is not writable: {e.strerror or e}{where}"
        return None

    def open(
        self, peer: str, conn_id: int, enabled: bool = True, node_name: str | None = None
    ) -> ConnectionCapture:
        """The capture of one connection (under ``<root>/<node_name>/`` for a named node);
        ``enabled=False`` opens no files (BIP324 passthrough: nothing to capture)."""
        return ConnectionCapture(self, peer, conn_id, enabled, node_name)

    def claim(self, folder: Path, conn_id: int) -> int | None:
        """Mark ``folder`` as written by ``conn_id``; or the live connection that already
        writes it (then nothing changes)."""
        with self._live_lock:
            live = self._live.get(folder)
            if live is None:
                self._live[folder] = conn_id
            return live

    def unclaim(self, folder: Path, conn_id: int) -> None:
        """The connection is done with ``folder``: a later one appends to it, as Core does
        after a reconnection."""
        with self._live_lock:
            if self._live.get(folder) == conn_id:
                del self._live[folder]

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
