"""Capture files as one conversation: a time-ordered stream of records, bounded memory.

This is the one reader of conversations: parse, stats, export, compare, replay and the
pytest fixtures all take their records from :func:`conversation` (or :func:`merged`).

The order is Core's parser's: a stable sort by time over the files in the order given.
Ties (equal times) go to the file given first; a folder's files are taken sorted by
path, so within one capture folder ``msgs_recv.dat`` comes before ``msgs_sent.dat``.
(msgcap's own captures never tie within a connection: its clock is strictly increasing
across both files.) Files Core wrote are in time order already, so they are merged as
streams; a file whose clock went backwards is indexed (offset and time per record) and
read in sorted order.

Damage (a truncated record, garbage, an unreadable file) is reported once per file
through a callback, with the file and byte offset, and everything readable before it is
still given. The default callback logs a warning.

:func:`merged` gives the stream record by record. :func:`merged_batches` gives it in bulk,
for readers that walk records in native code (``msgcap parse`` and ``stats``): batches of
runs, a run being whole records of one file (its records up to the next time another file
comes first), with the merge itself done in ``capture/_capture.c`` when it was built; and
:func:`merged_runs` run by run.
"""

from __future__ import annotations

import heapq
import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple

from msgcap.capture import native
from msgcap.capture.errors import UsageError
from msgcap.capture.layout import CapturePath
from msgcap.capture.records import (
    MAX_TIME,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    Damage,
    Direction,
    Record,
    RecordChunks,
    RecordFilter,
    scan,
    walk_records,
)

log = logging.getLogger("msgcap")


@dataclass(frozen=True, slots=True)
class CaptureFile:
    path: Path
    direction: Direction
    peer: str
    """The peer folder's name."""
    node: str | None = None
    """The node folder's name, when the file was found under a capture root that holds
    one folder per node (``<root>/<node>/<peer>/msgs_*.dat``, see :func:`expand_paths`)."""

    @classmethod
    def at(cls, path: Path, root: Path | None = None) -> CaptureFile:
        """The capture file at ``path``; ``root`` is the folder it was found under."""
        where = CapturePath.of(path)
        node = None
        if root is not None and where.above != root and where.above.is_relative_to(root):
            node = where.above.name
        return cls(path, Direction.of_file(path), where.peer, node)


@dataclass(frozen=True, slots=True)
class Item:
    """A record with the file it came from."""

    record: Record
    source: CaptureFile

    @property
    def direction(self) -> Direction:
        return self.source.direction


DamageReport = Callable[[CaptureFile, Damage], None]


def warn_damage(source: CaptureFile, damage: Damage) -> None:
    """The default damage report: one warning per damaged file."""
    log.warning("%s: at byte %d: %s", source.path, damage.offset, damage.reason)


def expand_paths(paths: Iterable[str]) -> list[CaptureFile]:
    """Files as given; folders become their ``*.dat`` files, recursively, sorted by path.

    Under a folder, a file two folders down (``<node>/<peer>/msgs_recv.dat``, a ``session``
    layout folder aside) belongs to the node named by the upper one: a capture root that
    holds several nodes' captures, as ``msgcap proxy`` writes for named nodes."""
    files: list[CaptureFile] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(q for q in path.rglob("*.dat") if q.is_file())
            if not found:
                raise UsageError(f"{p}: no .dat capture files in this folder")
            files.extend(CaptureFile.at(q, path) for q in found)
        elif path.exists():
            files.append(CaptureFile.at(path))
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


class Run(NamedTuple):
    """Records that come next in a conversation, all from one file: ``data[start:end]``
    is whole records, in the order to give them; ``data[0]`` is at byte ``base`` of the
    file. (Named tuples, not frozen dataclasses: they are made several times faster.)"""

    source: CaptureFile
    data: bytes
    start: int
    end: int
    base: int

    def records(self) -> Iterator[Record]:
        return walk_records(self.data, self.start, self.end, self.base)

    def items(self) -> Iterator[Item]:
        source = self.source
        for rec in self.records():
            yield Item(rec, source)


class Batch(NamedTuple):
    """Runs that come next in a conversation, in order, from one or more files: a chunk
    of whole records per file (``chunks[k]`` of ``sources[k]``, its byte 0 at byte
    ``bases[k]`` of the file) and the plan, packed int64 triples ``(k, start, end)``:
    run after run, ``chunks[k][start:end]``."""

    sources: list[CaptureFile]
    chunks: list[bytes]
    bases: list[int]
    plan: bytes

    @property
    def size(self) -> int:
        """Bytes of records in the batch."""
        plan = memoryview(self.plan).cast("q")
        return sum(plan[i + 2] - plan[i + 1] for i in range(0, len(plan), 3))

    def runs(self) -> Iterator[Run]:
        plan = memoryview(self.plan).cast("q")
        for i in range(0, len(plan), 3):
            k = plan[i]
            yield Run(self.sources[k], self.chunks[k], plan[i + 1], plan[i + 2], self.bases[k])

    def tally(self, selection: RecordFilter) -> list[dict[bytes, tuple[int, int]]]:
        """Per source, ``{type name: (messages, payload bytes)}`` of the records that
        ``selection`` takes."""
        counts: list[dict[bytes, tuple[int, int]]] = [{} for _ in self.sources]
        _tally(counts, self.chunks, self.plan, *selection.bounds)
        return counts


def python_plan(
    chunks: list[bytes], positions: list[int], times: list[int]
) -> tuple[bytes, list[int], list[int | None], int]:
    """Merge chunks of several files (in the order given: ties go to the earlier) by time:
    each has a whole record at its position, of the time given. Returns the plan of a
    :class:`Batch`, the runs that come next up to where one chunk (the last value) has no
    whole record left, and the positions and times of the chunks after it (None for that
    one). ``capture/_capture.c`` has the native twin."""
    next_times: list[int | None] = list(times)
    positions = list(positions)
    plan = array("q")
    while True:
        # the chunk whose next record comes first, and the one that comes second
        first, *second = sorted(range(len(chunks)), key=lambda i: (next_times[i], i))[:2]
        limit = MAX_TIME
        if second:
            b = second[0]
            at = next_times[b]
            assert at is not None
            limit = at if first < b else at - 1
        end, later, _ = scan(chunks[first], positions[first], limit, 0)
        if end > positions[first]:
            plan.extend((first, positions[first], end))
        positions[first] = end
        next_times[first] = later
        if later is None:
            return plan.tobytes(), positions, next_times, first


def python_tally(
    counts: list[dict[bytes, tuple[int, int]]],
    chunks: list[bytes],
    plan: bytes,
    since: int,
    until: int,
    types: tuple[bytes, ...] | None,
) -> None:
    """Count the records of a plan that are within ``[since, until]`` and, unless
    ``types`` is None, of a type named in it: ``counts[k][name]`` becomes (messages,
    payload bytes) plus theirs. ``capture/_capture.c`` has the native twin."""
    runs = memoryview(plan).cast("q")
    for i in range(0, len(runs), 3):
        k = runs[i]
        for rec in walk_records(chunks[k], runs[i + 1], runs[i + 2]):
            name = rec.raw_msgtype.split(b"\0", 1)[0]
            if since <= rec.time <= until and (types is None or name in types):
                n, size = counts[k].get(name, (0, 0))
                counts[k][name] = (n + 1, size + len(rec.payload))


Plan = Callable[[list[bytes], list[int], list[int]], tuple[bytes, list[int], list[int | None], int]]
TallyPlan = Callable[
    [list[dict[bytes, tuple[int, int]]], list[bytes], bytes, int, int, tuple[bytes, ...] | None],
    None,
]
_native = native.load("msgcap.capture._capture")
_plan: Final[Plan] = python_plan if _native is None else _native.plan
_tally: Final[TallyPlan] = python_tally if _native is None else _native.tally


RUN_CHUNK: int = 1 << 20
"""Bytes read at a time from one run of a file whose clock went backwards."""


class _RunIndex(NamedTuple):
    """A file as runs of records in time order: run ``i`` is the bytes from ``starts[i]``
    to the next start (the last to ``stop``, the end of the whole records), its first
    record of time ``times[i]``."""

    starts: array[int]
    times: array[int]
    stop: int
    damage: Damage | None
    """Where the file stops being records, if it does."""


def _run_index(f: BinaryIO) -> _RunIndex:
    """One pass over ``f`` (bulk, as :class:`_Stream` reads): where its clock goes back.
    Memory is two integers per run: proportional to the disorder, not to the file."""
    chunks = RecordChunks(f)
    starts, times = array("Q"), array("Q")
    last = 0
    stop = 0
    while chunks.fill():
        if not starts:
            starts.append(chunks.base + chunks.pos)
            times.append(RECORD_HEADER.unpack_from(chunks.data, chunks.pos)[0])
        end, later, last = scan(chunks.data, chunks.pos, MAX_TIME, last)
        if later is not None:  # a whole record earlier than the one before it: a new run
            starts.append(chunks.base + end)
            times.append(later)
            last = later
        stop = chunks.base + end
        chunks.pos = end
    return _RunIndex(starts, times, stop, chunks.damage)


class _Stream(RecordChunks):
    """A file in time order, read a chunk at a time: ``data[pos:]`` starts with its next
    record, of time ``time`` (None once it is done)."""

    def __init__(self, source: CaptureFile, f: BinaryIO, on_damage: DamageReport) -> None:
        super().__init__(f)
        self.source = source
        self.on_damage = on_damage
        self.time: int | None = None
        self.advance()

    def advance(self) -> None:
        """When ``time`` is None: read on to the next record, or finish."""
        if self.fill():
            self.time = RECORD_HEADER.unpack_from(self.data, self.pos)[0]
        elif self.damage is not None:
            self.on_damage(self.source, self.damage)


class _Runs:
    """A file whose clock went backwards, read in time order by merging its runs (see
    :class:`_RunIndex`): a heap holds each run's next record (time, run, offset), and
    each step reads, in bulk, the records of the first run that come before the next
    run's (a stable merge: equal times keep file order). ``data[pos:]`` holds those
    records, ``data[0]`` at byte ``base`` of the file, the first of time ``time``.

    Memory: the heap (one entry per run) and one chunk of at most :data:`RUN_CHUNK`
    bytes (or one record); reads: one per switch between runs, beside the bulk reads.
    So one record out of order costs a few reads more than a file in order."""

    def __init__(
        self, source: CaptureFile, f: BinaryIO, on_damage: DamageReport, runs: _RunIndex
    ) -> None:
        self.source = source
        self.f = f
        self.on_damage = on_damage
        self.damage = runs.damage
        ends = [*runs.starts[1:], runs.stop]
        self.heap = [
            (t, i, start, end)
            for i, (t, start, end) in enumerate(zip(runs.times, runs.starts, ends, strict=True))
        ]
        heapq.heapify(self.heap)
        self.data = b""
        self.pos = self.base = 0
        self.time: int | None = None
        self.advance()

    def _read(self, offset: int, n: int) -> bytes:
        self.f.seek(offset)
        data = self.f.read(n)
        if len(data) < n:
            raise OSError(f"file shrank while read (at byte {offset + len(data)})")
        return data

    def advance(self) -> None:
        heap = self.heap
        if not heap:
            self.time = None
            if self.damage is not None:  # said once, after the last record
                damage, self.damage = self.damage, None
                self.on_damage(self.source, damage)
            return
        t, i, offset, end = heapq.heappop(heap)
        limit = MAX_TIME
        if heap:  # the records of this run that come before the next run's first
            t2, j = heap[0][0], heap[0][1]
            limit = t2 if i < j else t2 - 1  # t < t2 when j < i: the heap's order
        data = self._read(offset, max(min(RUN_CHUNK, end - offset), RECORD_HEADER_SIZE))
        need = RECORD_HEADER_SIZE + RECORD_HEADER.unpack_from(data, 0)[2]
        if len(data) < need:
            data += self._read(offset + len(data), need - len(data))
        stop, later, _ = scan(data, 0, limit, 0)
        after = offset + stop
        if after < end:
            if later is None:
                later = RECORD_HEADER.unpack(self._read(after, RECORD_HEADER_SIZE))[0]
            heapq.heappush(heap, (later, i, after, end))
        if stop < len(data):  # the merge walks the whole chunk: only what comes now
            data = data[:stop]
        self.data, self.pos, self.base, self.time = data, 0, offset, t


_Reader = _Stream | _Runs


def _open(source: CaptureFile, on_damage: DamageReport) -> _Reader:
    """A reader of ``source`` at its first record."""
    f = open(source.path, "rb")
    try:
        runs = _run_index(f)
        f.seek(0)
        if len(runs.starts) <= 1:
            return _Stream(source, f, on_damage)
        return _Runs(source, f, on_damage, runs)
    except BaseException:
        f.close()
        raise


def _merge(files: list[CaptureFile], on_damage: DamageReport) -> Iterator[Batch]:
    """The batches of :func:`merged_batches`."""

    def unreadable(source: CaptureFile, e: OSError) -> None:
        on_damage(source, Damage(0, f"cannot read file: {e.strerror or e}", 0))

    opened: list[_Reader] = []
    readers: list[_Reader] = []  # those with records left, in the order given
    try:
        for source in files:
            try:
                reader = _open(source, on_damage)
            except OSError as e:
                unreadable(source, e)
                continue
            opened.append(reader)
            if reader.time is None:  # nothing readable in it
                reader.f.close()
            else:
                readers.append(reader)
        while readers:
            chunks, positions, times = [], [], []
            for r in readers:
                assert r.time is not None  # readers with no record left are dropped
                chunks.append(r.data)
                positions.append(r.pos)
                times.append(r.time)
            plan, positions, next_times, stopped = _plan(chunks, positions, times)
            for reader, pos, time_us in zip(readers, positions, next_times, strict=True):
                reader.pos, reader.time = pos, time_us
            yield Batch([r.source for r in readers], chunks, [r.base for r in readers], plan)
            # The stopped reader's chunk is used up (and its records given): read on.
            reader = readers[stopped]
            try:
                reader.advance()
            except OSError as e:
                unreadable(reader.source, e)
                reader.time = None
            if reader.time is None:
                reader.f.close()
                del readers[stopped]
    finally:
        for reader in opened:
            reader.f.close()


def file_records(source: CaptureFile, on_damage: DamageReport) -> Iterator[Item]:
    """The records of one file in time order; damage goes to ``on_damage``."""
    for batch in _merge([source], on_damage):
        for run in batch.runs():
            yield from run.items()


def _ensure_open_files(n: int) -> None:
    """Merging keeps every file open: raise the soft limit on open files if needed."""
    try:
        import resource
    except ImportError:  # not on Unix: let open() say it
        return
    want = n + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < want:
            raise UsageError(
                f"{n} capture files must be open at once, but the limit on open files is "
                f"{soft}: raise it (ulimit -n) or pass fewer files"
            )


def merged_batches(files: list[CaptureFile], on_damage: DamageReport) -> Iterator[Batch]:
    """All records of all files, stably sorted by time (ties: earlier file first), in
    batches of runs."""
    _ensure_open_files(len(files))
    return _merge(files, on_damage)


def merged_runs(files: list[CaptureFile], on_damage: DamageReport) -> Iterator[Run]:
    """All records of all files, stably sorted by time (ties: earlier file first), as runs
    of whole records of one file each."""
    _ensure_open_files(len(files))
    return (run for batch in _merge(files, on_damage) for run in batch.runs())


def merged(files: list[CaptureFile], on_damage: DamageReport) -> Iterator[Item]:
    """All records of all files, stably sorted by time (ties: earlier file first)."""
    _ensure_open_files(len(files))
    return (
        item for batch in _merge(files, on_damage) for run in batch.runs() for item in run.items()
    )


def folder_conversation(folder: Path, on_damage: DamageReport = warn_damage) -> Iterator[Item]:
    """The conversation of one capture folder: its ``msgs_recv.dat`` and ``msgs_sent.dat``
    (those that exist), merged by time, ``recv`` first on ties."""
    files = [folder / d.file_name for d in (Direction.RECV, Direction.SENT)]
    found = [CaptureFile.at(f) for f in files if f.is_file()]
    if not found:
        raise UsageError(f"{folder}: no {files[0].name} or {files[1].name} in this folder")
    return merged(found, on_damage)


def conversation(
    paths: Iterable[str | os.PathLike[str]], on_damage: DamageReport = warn_damage
) -> Iterator[Item]:
    """The records of capture files and folders (searched recursively for ``*.dat``) as
    one time-ordered stream, with the tie rule and damage reports of the module doc.

    Raises :class:`~msgcap.capture.errors.UsageError` for a path that does not exist or a folder
    without capture files.
    """
    return merged(expand_paths(os.fspath(p) for p in paths), on_damage)
