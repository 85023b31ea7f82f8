"""``msgcap export --parquet``: capture files into the dataset, incrementally.

Each capture file is read from where the last export onto the same OUT stopped (the
manifest says where, and :func:`~msgcap.parser.dataset.manifest.resume_offset` checks it
is still the same file), mapped and walked in place with the capture layer's reader
(:data:`~msgcap.capture.records.scan`, then
:class:`~msgcap.capture.records.RecordChunks` for what is not whole records: damage is
reported as everywhere else). Per record, Python only splits the header and copies the
payload into the ``messages`` buffer; the derived tables decode only what they need
(:mod:`msgcap.parser.dataset.decode`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import mmap
import os
import sys
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

from msgcap.capture.conversation import CaptureFile, expand_paths
from msgcap.capture.errors import UsageError
from msgcap.capture.framing import MsgType
from msgcap.capture.layout import CapturePath
from msgcap.capture.records import (
    MAX_RECORD_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    Damage,
    RecordChunks,
    whole_end,
)
from msgcap.capture.report import Warnings
from msgcap.parser.dataset.decode import INV_ENTRY, INV_MESSAGES, block_row, inv_span, tx_row
from msgcap.parser.dataset.manifest import (
    MANIFEST_NAME,
    FileState,
    Manifest,
    fingerprint,
    locked,
    new_run_id,
    read_manifest,
    remove_run,
    resume_offset,
    write_manifest,
)
from msgcap.parser.dataset.schema import TABLES
from msgcap.parser.dataset.writing import DatasetWriter
from msgcap.parser.wire import DecodeError

WINDOW: Final = 16 << 20
"""Bytes of a capture file walked at a time in place (mapped), then let go."""

_DAY_US: Final = 86_400 * 1_000_000
_MAX_TIME_US: Final = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_NULL_PARTITION: Final = "__HIVE_DEFAULT_PARTITION__"  # Hive's (and every engine's) null
_ROW_OVERHEAD: Final = 300  # estimated bytes of Python objects per buffered row


class Report(Warnings):
    """What an export says on stderr, and its exit status: every damaged stretch, the first
    undecodable payload per table (the rest are counted at the end)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.undecodable: dict[str, int] = {}

    def undecodable_payload(
        self, table: str, source: CaptureFile, offset: int, e: Exception
    ) -> None:
        n = self.undecodable.get(table, 0)
        self.undecodable[table] = n + 1
        self.failed += 1
        if n == 0:
            self.warn(
                f"{source.path}: offset {offset}: {e}: not in {table} (the message is in "
                "messages; further undecodable payloads are counted at the end)"
            )

    def summary(self) -> None:
        super().summary()
        for table, n in self.undecodable.items():
            self.warn(f"{n} undecodable payload(s) left out of {table}")


@dataclass(slots=True)
class ExportResult:
    run_id: str
    files: int = 0
    new_files: int = 0
    records: int = 0
    payload_bytes: int = 0
    rows: dict[str, int] = field(default_factory=dict)

    def summary(self, out: Path) -> str:
        counts = ", ".join(f"{n:,} {name}" for name, n in self.rows.items() if name != "messages")
        return (
            f"{self.records:,} new messages ({self.payload_bytes:,} payload bytes; {counts}) "
            f"from {self.files} capture files ({self.new_files} new) into {out} (run {self.run_id})"
        )


def node_of(source: CaptureFile) -> str:
    """The default node label: the node folder (``<root>/<node>/<peer>/``) when the file
    was found under one, else the name of the folder that holds the peer folder (the
    capture root)."""
    if source.node is not None:
        return source.node
    return CapturePath.of(source.path.resolve()).above.name or "/"


def _date(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


def _is_incomplete_tail(f: BinaryIO, d: Damage, size: int) -> bool:
    """A record cut short by the end of the file (still being written, or cut by a
    crash), as opposed to garbage."""
    if d.offset + d.skipped < size:
        return False
    f.seek(d.offset)
    header = f.read(RECORD_HEADER_SIZE)
    if len(header) < RECORD_HEADER_SIZE:
        return True
    return int(RECORD_HEADER.unpack(header)[2]) <= MAX_RECORD_PAYLOAD


class _Segments:
    """The whole records of an open capture file from ``start``, as segments
    ``(data, pos, stop, base)``: ``data[pos:stop]`` holds whole records and ``data[0]`` is
    at byte ``base`` of the file (a segment must be let go before the next is asked for).
    ``damage`` then says why the file did not end cleanly.

    The file as it is when the walk starts is mapped and walked in place with the
    capture reader's :data:`~msgcap.capture.records.scan`, a window at a time, its pages
    let go after each: no copy of the file is made, and memory stays bounded. Where that
    stops (the end of the mapping, or a record that is not whole), the capture reader
    (:class:`~msgcap.capture.records.RecordChunks`) reads on and reports damage."""

    def __init__(self, f: BinaryIO, start: int) -> None:
        self.f = f
        self.start = start
        self.damage: Damage | None = None

    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        f, pos = self.f, self.start
        if os.fstat(f.fileno()).st_size > pos:
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                pass
            else:
                pos = yield from _mapped(mm, pos)
                del mm
        f.seek(pos)
        chunks = RecordChunks(f)
        while chunks.fill():
            stop = chunks.whole_end()
            yield chunks.data, chunks.pos, stop, chunks.base
            chunks.pos = stop
        self.damage = chunks.damage


def _mapped(mm: mmap.mmap, pos: int) -> Generator[tuple[Any, int, int, int], None, int]:
    """The whole records of a mapped file from ``pos``, a window at a time; returns where
    they stop."""
    n = len(mm)
    page = mmap.PAGESIZE
    dropped = pos // page * page
    whole = memoryview(mm)
    try:
        while pos < n:
            limit = min(pos + WINDOW, n)
            end = whole_end(whole[:limit], pos)
            if end == pos and limit < n:  # a record longer than the window
                limit = min(pos + RECORD_HEADER_SIZE + MAX_RECORD_PAYLOAD, n)
                end = whole_end(whole[:limit], pos)
            if end == pos:
                break
            window = whole[:end]
            yield window, pos, end, 0
            window.release()
            pos = end
            drop = end // page * page
            if drop > dropped and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED, dropped, drop - dropped)
                dropped = drop
    finally:
        whole.release()
    return pos


def _export_file(
    source: CaptureFile,
    state: FileState,
    start: int,
    writer: DatasetWriter,
    report: Report,
    result: ExportResult,
) -> None:
    node, peer, conn, direction = state.node, state.peer, state.connection, state.direction
    with_payload = "payload" in writer.messages.table.column_names()
    messages, inv_items = writer.messages, writer.inv_items
    transactions, blocks = writer.transactions, writer.blocks
    days: dict[int, str] = {}
    end = start
    last_time = state.last_time
    records = 0
    payload_bytes = 0
    labels: dict[bytes, str] = {}
    unpack = RECORD_HEADER.unpack_from
    header_size = RECORD_HEADER_SIZE
    with open(source.path, "rb") as f:
        segments = _Segments(f, start)
        for data, pos, stop, base in segments:
            # Whole records, walked in place: payloads are views of the file, copied
            # once, into the messages buffer (and as bytes for the tx decoder).
            view = memoryview(data)
            while pos < stop:
                rtime, raw_type, size = unpack(data, pos)
                offset = base + pos
                pos += header_size
                payload = view[pos : pos + size]
                pos += size
                t: int | None = rtime
                if rtime <= _MAX_TIME_US:
                    day = rtime // _DAY_US
                    date = days.get(day)
                    if date is None:
                        date = days[day] = _date(day)
                else:
                    t, date = None, _NULL_PARTITION
                msgtype = labels.get(raw_type)
                if msgtype is None:
                    msgtype = labels[raw_type] = MsgType.of(raw_type).label
                buf = messages.buffer(node, date)
                buf.add((peer, conn, direction, t, msgtype, size, offset))
                if with_payload:
                    buf.data += payload
                    buf.lengths.append(size)
                messages.added(node, date, buf, size + _ROW_OVERHEAD)
                if msgtype in INV_MESSAGES:
                    try:
                        first, n = inv_span(msgtype, payload)
                    except DecodeError as e:
                        report.undecodable_payload("inv_items", source, offset, e)
                        n = 0
                    if n:
                        ibuf = inv_items.buffer(node, date)
                        ibuf.add_message(
                            (peer, conn, direction, t, msgtype, offset),
                            payload[first : first + INV_ENTRY.size * n],
                            n,
                        )
                        inv_items.added(node, date, ibuf, _ROW_OVERHEAD * n)
                elif msgtype == "tx":
                    try:
                        txid, wtxid, vsize, n_in, n_out = tx_row(bytes(payload))
                    except DecodeError as e:
                        report.undecodable_payload("transactions", source, offset, e)
                    else:
                        tbuf = transactions.buffer(node, date)
                        tbuf.add(
                            (peer, conn, direction, t, offset, txid, wtxid, size, vsize,
                             n_in, n_out)
                        )  # fmt: skip
                        transactions.added(node, date, tbuf, _ROW_OVERHEAD)
                elif msgtype == "block" or msgtype == "cmpctblock":
                    try:
                        bhash, prev, height, tx_count, btime = block_row(msgtype, payload)
                    except DecodeError as e:
                        report.undecodable_payload("blocks", source, offset, e)
                    else:
                        bbuf = blocks.buffer(node, date)
                        bbuf.add(
                            (peer, conn, direction, t, msgtype, offset, bhash, prev, height,
                             tx_count, btime, size)
                        )  # fmt: skip
                        blocks.added(node, date, bbuf, _ROW_OVERHEAD)
                end = pos + base
                last_time = rtime
                records += 1
                payload_bytes += size
            del view, payload, data
        damage = segments.damage
        if damage is not None:
            size = os.fstat(f.fileno()).st_size
            if _is_incomplete_tail(f, damage, size):
                report.note(
                    f"{source.path}: offset {damage.offset}: {damage.reason}: not exported; "
                    "the next export retries from there"
                )
            else:
                report.damage(source, damage)
        st = os.fstat(f.fileno())
        state.head_sha256, state.tail_sha256 = fingerprint(f, end)
        f.seek(0)
        state.first_header = f.read(min(end, RECORD_HEADER_SIZE)).hex()
    state.offset = end
    state.last_time = last_time
    state.records += records
    state.device, state.inode = st.st_dev, st.st_ino
    result.records += records
    result.payload_bytes += payload_bytes


def export_parquet(
    paths: Iterable[str | os.PathLike[str]],
    out: Path,
    *,
    node: str | None = None,
    payload: bool = True,
    report: Report | None = None,
) -> ExportResult:
    """Export capture files and folders into the dataset at ``out`` (created if needed),
    adding only what earlier exports onto ``out`` did not (see the module doc).

    Raises :class:`UsageError` for bad paths or an incompatible ``out``, and
    :class:`DatasetError` when another export holds ``out``.
    """
    report = report or Report(sys.stderr)
    if node is not None and not node:
        raise UsageError("--node: an empty name")
    sources = expand_paths(os.fspath(p) for p in paths)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out}: {e.strerror or e}") from None
    with locked(out):
        manifest = read_manifest(out)
        if manifest is None:
            if any((out / t.name).exists() for t in TABLES):
                raise UsageError(
                    f"{out}: holds dataset folders but no {MANIFEST_NAME}: export into a new "
                    "folder (or restore the manifest)"
                )
            manifest = Manifest(payload=payload)
        elif manifest.payload != payload:
            flag = "without --no-payload" if manifest.payload else "with --no-payload"
            raise UsageError(f"{out}: this dataset was exported {flag}: export it the same way")
        if manifest.pending_run is not None:
            remove_run(out, manifest.pending_run, manifest.committed_runs)
            report.note(
                f"{out}: removed the files of an interrupted export ({manifest.pending_run})"
            )
            manifest.pending_run = None
        remove_run(out, None)

        # Which files, from where (said before anything is written).
        plan: list[tuple[CaptureFile, str, FileState, int]] = []
        seen: set[str] = set()
        result = ExportResult(new_run_id())
        for source in sources:
            key = str(source.path.resolve())
            if key in seen:
                continue
            seen.add(key)
            label = node if node is not None else node_of(source)
            state = manifest.files.get(key)
            if state is None:
                state = FileState(
                    label, source.peer, CapturePath.of(source.path).session, source.direction.value
                )
                start = 0
                result.new_files += 1
            else:
                if state.node != label:
                    raise UsageError(
                        f"{source.path}: exported into {out} as node {state.node!r} before, "
                        f"not {label!r}: pass --node {state.node} (or export into another folder)"
                    )
                start = resume_offset(key, state, report.warn)
                if start < state.offset:  # replaced or truncated: a new stream from here
                    state.offset = start
                if start == 0:
                    state.last_time = -1
            plan.append((source, key, state, start))
        result.files = len(plan)

        manifest.pending_run = result.run_id
        write_manifest(out, manifest)
        writer = DatasetWriter(out, result.run_id, payload)
        try:
            new_states: dict[str, FileState] = {}
            for source, key, state, start in plan:
                state = FileState(**state.to_json())
                _export_file(source, state, start, writer, report, result)
                new_states[key] = state
            writer.commit()
        except BaseException:
            writer.abort()
            manifest.pending_run = None
            with contextlib.suppress(OSError):
                write_manifest(out, manifest)
            raise
        manifest.files.update(new_states)
        result.rows = {s.table.name: s.rows_written for s in writer.sinks}
        manifest.runs += 1
        manifest.last_run = {
            "id": result.run_id,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": result.files,
            "new_files": result.new_files,
            "rows": result.rows,
            "payload_bytes": result.payload_bytes,
        }
        manifest.pending_run = None
        manifest.committed_runs.append(result.run_id)
        write_manifest(out, manifest)
    return result
