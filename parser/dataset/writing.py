"""Rows into Parquet part files: buffered per table and partition, written as row
groups by one background thread, hidden until the run commits.

Each partition's rows are kept until they make a row group (:data:`ROW_GROUP_BYTES` or
:data:`ROW_GROUP_ROWS`); all buffers together stay under :data:`MEMORY_BUDGET` by
flushing the largest. The writer thread encodes and writes one row group while the next
rows are decoded (pyarrow releases the GIL there), with at most
:data:`MAX_PENDING_WRITES` waiting, so memory stays bounded whatever the input.
"""

from __future__ import annotations

import binascii
import collections
import concurrent.futures
import contextlib
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from msgcap.parser.dataset.decode import INV_ENTRY
from msgcap.parser.dataset.schema import (
    BLOCKS,
    INV_ITEMS,
    MESSAGES,
    SCHEMA_VERSION,
    TRANSACTIONS,
    Table,
    arrow_type,
    load_pyarrow,
    partition_value,
)
from msgcap.parser.structures import InvType

ROW_GROUP_BYTES: Final = 8 << 20
"""A partition's buffer is written as one row group when it holds this much (estimated)."""
ROW_GROUP_ROWS: Final = 64 * 1024
MEMORY_BUDGET: Final = 32 << 20
"""All buffers together; above it the largest is written out early."""
MAX_PENDING_WRITES: Final = 2
"""Row groups waiting for the writer thread at most (each up to ROW_GROUP_BYTES)."""
MAX_OPEN_FILES: Final = 64
"""Part files open at once; the least recently written is closed (a later row group of
its partition goes to a new part file)."""


class _Buffer:
    """Rows of one partition of one table: a tuple per row (of the values of the columns
    but a binary last column; turned into columns when written), and the values of a
    binary last column one after another in ``data`` (with their ``lengths``), ready to
    be one Arrow buffer."""

    __slots__ = ("data", "lengths", "nbytes", "rows", "tuples")

    def __init__(self) -> None:
        self.tuples: list[tuple[Any, ...]] = []
        self.data = bytearray()
        self.lengths: list[int] = []
        self.rows = 0
        self.nbytes = 0

    def add(self, row: tuple[Any, ...]) -> None:
        self.tuples.append(row)
        self.rows += 1


class _InvBuffer:
    """Rows of one partition of ``inv_items``, in bulk: the inventory entries as they are
    on the wire, one after another (``data``, 36 bytes each), and the columns shared by
    the entries of a message once per message (``columns``, with ``counts``). Arrow
    builds the rows from them (:meth:`_InvSink.arrays`), with no Python object per row."""

    __slots__ = ("columns", "counts", "data", "nbytes", "rows")

    def __init__(self) -> None:
        self.columns: list[list[Any]] = [[] for _ in range(6)]
        self.counts: list[int] = []
        self.data = bytearray()
        self.rows = 0
        self.nbytes = 0

    def add_message(self, same: tuple[Any, ...], entries: memoryview, n: int) -> None:
        """The ``n`` entries of one message (``entries``: their bytes), whose rows share
        the first columns' values (``same``)."""
        for column, value in zip(self.columns, same, strict=True):
            column.append(value)
        self.counts.append(n)
        self.data += entries
        self.rows += n


@dataclass(slots=True)
class _Part:
    tmp: Path
    final: Path
    writer: Any


class _TableSink:
    """Rows of one table, buffered per partition, written as row groups of part files."""

    def __init__(self, dataset: DatasetWriter, table: Table) -> None:
        self.dataset = dataset
        self.table = table
        pa = dataset.pa
        self.columns = table.columns
        self.schema = pa.schema(
            [pa.field(c.name, arrow_type(pa, c.kind), nullable=c.nullable) for c in self.columns],
            metadata={
                "msgcap.table": table.name,
                "msgcap.schema_version": str(SCHEMA_VERSION),
            },
        )
        self.buffers: dict[tuple[str, str], Any] = {}
        self.rows_written = 0
        self._stored = [c for c in self.columns if c.kind != "binary"]  # in lists

    def buffer(self, node: str, date: str) -> Any:
        key = (node, date)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = self.new_buffer()
        return buf

    def new_buffer(self) -> Any:
        return _Buffer()

    def added(self, node: str, date: str, buf: Any, nbytes: int) -> None:
        buf.nbytes += nbytes
        self.dataset.buffered += nbytes
        if buf.nbytes >= ROW_GROUP_BYTES or buf.rows >= ROW_GROUP_ROWS:
            self.flush(node, date)
        elif self.dataset.buffered > MEMORY_BUDGET:
            self.dataset.flush_largest()

    def flush(self, node: str, date: str) -> None:
        buf = self.buffers.pop((node, date), None)
        if buf is None or not buf.rows:
            return
        self.dataset.buffered -= buf.nbytes
        arrays = self.arrays(buf)
        batch = self.dataset.pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        del arrays, buf
        part = self.dataset.part(self, node, date)
        self.dataset.background(_write_row_group, self.dataset.pa, part, batch)
        self.rows_written += batch.num_rows

    def arrays(self, buf: _Buffer) -> list[Any]:
        """The columns of a buffer as Arrow arrays."""
        pa = self.dataset.pa
        arrays = []
        columns = list(zip(*buf.tuples, strict=True))
        buf.tuples.clear()
        for c, values in zip(self._stored, columns, strict=True):
            arrays.append(pa.array(values, arrow_type(pa, c.kind)))
        del columns
        if self.columns[-1].kind == "binary":
            # The values as they are: no copy (the Parquet writer makes the only one).
            offsets = pa.array(list(itertools.accumulate(buf.lengths, initial=0)), pa.int32())
            arrays.append(
                pa.Array.from_buffers(
                    pa.binary(),
                    len(buf.lengths),
                    [None, offsets.buffers()[1], pa.py_buffer(buf.data)],
                )
            )
        return arrays

    def flush_all(self) -> None:
        for node, date in list(self.buffers):
            self.flush(node, date)


class _InvSink(_TableSink):
    """``inv_items``, buffered as :class:`_InvBuffer`."""

    def new_buffer(self) -> Any:
        return _InvBuffer()

    def arrays(self, buf: _InvBuffer) -> list[Any]:  # type: ignore[override]
        pa = self.dataset.pa
        pc = pa.compute
        rows, size = buf.rows, INV_ENTRY.size
        int32 = pa.int32()
        ends = pa.array(list(itertools.accumulate(buf.counts)), int32)
        message = pc.run_end_decode(
            pa.RunEndEncodedArray.from_arrays(ends, pa.array(range(len(buf.counts)), int32))
        )  # the message of each row
        arrays = [
            pa.array(values, arrow_type(pa, c.kind)).take(message)
            for c, values in zip(self.columns, buf.columns, strict=False)
        ]
        row = pc.cumulative_sum(pa.repeat(pa.scalar(1, int32), rows))  # 1, 2, ...
        starts = pc.subtract(ends, pa.array(buf.counts, int32))  # rows before each message
        arrays.append(pc.subtract(row, pc.add(starts.take(message), 1)).cast(int32))
        entries = pa.Array.from_buffers(pa.binary(size), rows, [None, pa.py_buffer(buf.data)])
        if sys.byteorder == "little":
            raw = pc.binary_slice(entries, 0, 4).buffers()[1]
            type_ids = pa.Array.from_buffers(pa.uint32(), rows, [None, raw]).cast(pa.int64())
        else:
            type_ids = pa.array([t for t, _ in INV_ENTRY.iter_unpack(buf.data)], pa.int64())
        known = pc.unique(type_ids)
        names = pa.array([InvType.name_of(t) for t in known.to_pylist()], pa.string())
        arrays.append(names.take(pc.index_in(type_ids, value_set=known)))
        arrays.append(type_ids)
        # The hashes, each reversed (display order), one after another, as hex.
        wire = pc.binary_slice(entries, 4, size).cast(pa.binary())
        display = pc.binary_reverse(wire).buffers()[2]
        hexed = binascii.hexlify(memoryview(display)[: 32 * rows])
        del entries, wire, display
        hashes = pa.Array.from_buffers(pa.binary(64), rows, [None, pa.py_buffer(hexed)])
        arrays.append(hashes.cast(pa.string()))
        return arrays


def _write_row_group(pa: Any, part: _Part, batch: Any) -> None:
    part.writer.write_batch(batch, row_group_size=batch.num_rows)
    del batch
    pa.default_memory_pool().release_unused()  # keeps peak memory flat (mimalloc caches)


class DatasetWriter:
    """The part files of one run: hidden while written, renamed into place by commit().

    Row groups are encoded and written by one background thread (pyarrow releases the
    GIL there), in order, while the next rows are decoded; at most
    :data:`MAX_PENDING_WRITES` wait for it, so memory stays bounded.
    """

    def __init__(self, out: Path, run_id: str, payload: bool) -> None:
        self.pa = load_pyarrow()
        self.out = out
        self.run_id = run_id
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="msgcap-parquet")
        self._pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()
        self.buffered = 0
        self.parts: dict[tuple[str, str, str], _Part] = {}
        self.closed: list[_Part] = []
        self._seq = itertools.count()
        messages = MESSAGES
        if not payload:
            messages = Table(
                MESSAGES.name,
                MESSAGES.doc,
                tuple(c for c in MESSAGES.columns if c.name != "payload"),
            )
        self.messages = _TableSink(self, messages)
        self.inv_items = _InvSink(self, INV_ITEMS)
        self.transactions = _TableSink(self, TRANSACTIONS)
        self.blocks = _TableSink(self, BLOCKS)
        self.sinks = (self.messages, self.inv_items, self.transactions, self.blocks)

    def part(self, sink: _TableSink, node: str, date: str) -> _Part:
        key = (sink.table.name, node, date)
        part = self.parts.pop(key, None)
        if part is None:
            if len(self.parts) >= MAX_OPEN_FILES:
                oldest = next(iter(self.parts))
                self._close(self.parts.pop(oldest))
            folder = self.out / sink.table.name / f"node={partition_value(node)}" / f"date={date}"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{self.run_id}-{next(self._seq)}.parquet"
            tmp = folder / f".{name}.tmp"
            pq = self.pa.parquet
            cols = sink.columns
            writer = pq.ParquetWriter(
                tmp,
                sink.schema,
                compression={c.name: ("none" if c.kind == "binary" else "zstd") for c in cols},
                use_dictionary=[c.name for c in cols if c.dictionary],
                write_statistics=[c.name for c in cols if c.kind != "binary"],
            )
            part = _Part(tmp, folder / name, writer)
        self.parts[key] = part  # most recently used last
        return part

    def background(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the writer thread, after everything submitted before."""
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > MAX_PENDING_WRITES:
            self._pending.popleft().result()  # raises what the writer raised

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _close(self, part: _Part) -> None:
        self.background(part.writer.close)
        self.closed.append(part)

    def flush_largest(self) -> None:
        sink, key = max(
            ((s, k) for s in self.sinks for k in s.buffers),
            key=lambda sk: sk[0].buffers[sk[1]].nbytes,
        )
        sink.flush(*key)

    def commit(self) -> None:
        """Flush everything, close the files and rename them into place."""
        for sink in self.sinks:
            sink.flush_all()
        for part in self.parts.values():
            self._close(part)
        self.parts.clear()
        self.wait()
        self._pool.shutdown()
        for part in self.closed:
            os.replace(part.tmp, part.final)

    def abort(self) -> None:
        """Remove what this run wrote (best effort)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        for part in self.parts.values():
            with contextlib.suppress(Exception):
                part.writer.close()
            self.closed.append(part)
        self.parts.clear()
        for part in self.closed:
            for p in (part.tmp, part.final):
                with contextlib.suppress(OSError):
                    p.unlink()
            folder = part.final.parent
            for _ in range(3):  # date=, node= and the table folder, where now empty
                with contextlib.suppress(OSError):
                    folder.rmdir()
                folder = folder.parent
