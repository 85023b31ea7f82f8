"""Captures as a Parquet dataset (``msgcap export --parquet``) and SQL over it (``msgcap sql``).

The dataset is a folder of Hive-partitioned Parquet files that any engine reads as it is
(DuckDB, Spark, ClickHouse, pandas, Polars)::

    OUT/_msgcap_manifest.json                    what was exported, per capture file
    OUT/<table>/node=<node>/date=<YYYY-MM-DD>/part-<run>-<n>.parquet

Tables (:data:`TABLES`; schema version :data:`SCHEMA_VERSION`, documented in the README):
``messages`` (one row per record), ``inv_items`` (one row per inventory entry of ``inv``,
``getdata`` and ``notfound``), ``transactions`` (one row per ``tx`` message) and ``blocks``
(one row per ``block`` and ``cmpctblock`` message). ``node`` and ``date`` (the UTC day of
the record's time) are the partition columns: they live in the folder names.

Incremental: the manifest keeps, per capture file, the byte offset exported so far and a
fingerprint of the bytes before it (SHA-256 of the first and of the last 4 KiB). A later
export of the same files onto the same OUT reads each file from its offset, so only the
records written since are added, in new part files (earlier files are never rewritten).
A file that is now shorter than its offset was truncated; one whose fingerprint changed
was replaced: both are said on stderr. A replaced file is exported again from its start
(its earlier rows stay: they were real records); after a truncation the export goes on
with the records later than the last one exported. A record cut short at the end of a
file (still being written, or cut by a crash) is left for the next export.

Memory stays bounded whatever the input: files are walked in place a window at a time
(mapped; :class:`_Segments`), rows are buffered per partition up to one row group
(:data:`ROW_GROUP_BYTES`), all buffers together are kept under :data:`MEMORY_BUDGET` by
flushing the largest, and one writer thread encodes and writes row groups while the next
rows are decoded. Per record, Python only splits the header and copies the payload into
its buffer; the derived tables decode only what they need (inventory entries are turned
into rows by Arrow, in bulk).

A run writes its files under hidden temporary names and renames them into place only
when all are complete, then records the run in the manifest; files of a run that died
before that are removed by the next run. One export at a time per OUT (a lock file).

pyarrow and duckdb are imported only when these commands run (``pip install
'msgcap[dataset]'``).
"""

from __future__ import annotations

import argparse
import binascii
import collections
import concurrent.futures
import contextlib
import csv
import datetime as dt
import decimal
import fcntl
import hashlib
import itertools
import mmap
import os
import re
import secrets
import struct
import sys
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Final, cast

import orjson

from msgcap.capture.conversation import CaptureFile, expand_paths
from msgcap.capture.errors import MsgcapError, UsageError
from msgcap.capture.framing import MsgType, hash256
from msgcap.capture.layout import SESSION_DIR
from msgcap.capture.records import (
    MAX_RECORD_PAYLOAD,
    MAX_TIME,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    Damage,
    RecordChunks,
    native,
    read_record_headers,
    scan,
)
from msgcap.parser import fastjson
from msgcap.parser.structures import BlockHeader, InvType, Transaction
from msgcap.parser.wire import DecodeError, Reader, display_hash

SCHEMA_VERSION: Final = 1
"""Bumped whenever a table, column or type changes; an OUT of another version is refused."""

MANIFEST_NAME: Final = "_msgcap_manifest.json"
LOCK_NAME: Final = "_msgcap.lock"
FORMAT_NAME: Final = "msgcap parquet dataset"

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
FINGERPRINT_BYTES: Final = 4096

_DAY_US: Final = 86_400 * 1_000_000
_MAX_TIME_US: Final = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_NULL_PARTITION: Final = "__HIVE_DEFAULT_PARTITION__"  # Hive's (and every engine's) null
_ROW_OVERHEAD: Final = 300  # estimated bytes of Python objects per buffered row


# --- the schema ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: str
    """``string``, ``int32``, ``int64``, ``timestamp`` (µs, UTC) or ``binary``."""
    doc: str
    nullable: bool = False
    dictionary: bool = False
    """Low cardinality: dictionary-encoded in Parquet."""


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    doc: str
    columns: tuple[Column, ...]
    """The columns stored in the files, in row order (the partition columns are not)."""

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]


PARTITION_COLUMNS: Final = (
    Column("node", "string", "the capturing node: --node, else the capture root's name"),
    Column("date", "date", "UTC day of time (partition)", nullable=True),
)

_FILE_COLUMNS: Final = (
    Column("peer", "string", "the peer folder", dictionary=True),
    Column(
        "connection",
        "string",
        "the session layout's connection folder, else null",
        nullable=True,
        dictionary=True,
    ),
    Column("direction", "string", "recv or sent, from the node's point of view", dictionary=True),
    Column("time", "timestamp", "capture time, µs, UTC", nullable=True),
)
_OFFSET: Final = Column("file_offset", "int64", "byte offset of the record in its capture file")
_MSGTYPE: Final = Column("msgtype", "string", "message type", dictionary=True)

MESSAGES: Final = Table(
    "messages",
    "one row per captured message",
    (
        *_FILE_COLUMNS,
        _MSGTYPE,
        Column("size", "int32", "payload bytes"),
        _OFFSET,
        Column("payload", "binary", "the payload (absent with --no-payload)"),
    ),
)
INV_ITEMS: Final = Table(
    "inv_items",
    "one row per inventory entry of inv, getdata and notfound",
    (
        *_FILE_COLUMNS,
        _MSGTYPE,
        _OFFSET,
        Column("index", "int32", "position of the entry in its message"),
        Column(
            "inv_type", "string", "MSG_TX, MSG_WTX, MSG_BLOCK, ... (Core's names)", dictionary=True
        ),
        Column("inv_type_id", "int64", "the type as on the wire (uint32)"),
        Column("hash", "string", "hex, display (RPC) byte order"),
    ),
)
TRANSACTIONS: Final = Table(
    "transactions",
    "one row per tx message",
    (
        *_FILE_COLUMNS,
        _OFFSET,
        Column("txid", "string", "hex, display order"),
        Column("wtxid", "string", "hex, display order"),
        Column("size", "int32", "bytes"),
        Column("vsize", "int32", "virtual size (BIP141)"),
        Column("inputs", "int32", "number of inputs"),
        Column("outputs", "int32", "number of outputs"),
    ),
)
BLOCKS: Final = Table(
    "blocks",
    "one row per block and cmpctblock message",
    (
        *_FILE_COLUMNS,
        _MSGTYPE,
        _OFFSET,
        Column("hash", "string", "block hash, hex, display order"),
        Column("prev_hash", "string", "previous block's hash, hex, display order"),
        Column(
            "height", "int32", "BIP34 height from the coinbase, null where unknown", nullable=True
        ),
        Column("tx_count", "int32", "transactions in the block"),
        Column("block_time", "timestamp", "the header's time"),
        Column("size", "int32", "payload bytes"),
    ),
)
TABLES: Final = (MESSAGES, INV_ITEMS, TRANSACTIONS, BLOCKS)


class DatasetError(MsgcapError):
    """The dataset cannot be written or read (exit status 1, with this reason)."""


# --- small helpers ------------------------------------------------------------------------


def _pa() -> Any:
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.compute  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError:
        raise UsageError(
            "the Parquet export needs pyarrow: pip install 'msgcap[dataset]'"
        ) from None
    return pyarrow


def _arrow_type(pa: Any, kind: str) -> Any:
    if kind == "string":
        return pa.string()
    if kind == "int32":
        return pa.int32()
    if kind == "int64":
        return pa.int64()
    if kind == "timestamp":
        return pa.timestamp("us", tz="UTC")
    if kind == "binary":
        return pa.binary()
    raise ValueError(kind)


_SQL_TYPES: Final = {
    "string": "VARCHAR",
    "int32": "INTEGER",
    "int64": "BIGINT",
    "timestamp": "TIMESTAMPTZ",
    "binary": "BLOB",
    "date": "DATE",
}


def partition_value(text: str) -> str:
    """A Hive partition value: percent-encoded except ``[A-Za-z0-9_.-~]`` (engines decode it)."""
    return urllib.parse.quote(text, safe="")


def node_of(source: CaptureFile) -> str:
    """The default node label: the node folder (``<root>/<node>/<peer>/``) when the file
    was found under one, else the name of the folder that holds the peer folder (the
    capture root)."""
    if source.node is not None:
        return source.node
    peer_dir = source.path.resolve().parent
    if SESSION_DIR.match(peer_dir.name):
        peer_dir = peer_dir.parent
    return peer_dir.parent.name or "/"


def connection_of(source: CaptureFile) -> str | None:
    parent = source.path.parent.name
    return parent if SESSION_DIR.match(parent) else None


def bip34_height(header: BlockHeader, coinbase: Transaction | None) -> int | None:
    """The height a coinbase commits to (BIP34: ``CScript() << height`` starts its
    scriptSig), or None for a version 1 block or a script that does not start so."""
    if coinbase is None or header.version < 2 or len(coinbase.inputs) != 1:
        return None
    txin = coinbase.inputs[0]
    if txin.prevout.hash != b"\0" * 32 or txin.prevout.index != 0xFFFFFFFF:
        return None
    script = txin.script_sig
    if not script:
        return None
    op = script[0]
    if 0x51 <= op <= 0x60:  # OP_1 .. OP_16
        return op - 0x50
    if 1 <= op <= 4 and len(script) > op:
        num = script[1 : 1 + op]
        if num[-1] & 0x80:  # negative CScriptNum
            return None
        value = int.from_bytes(num, "little")
        return value if value <= 0x7FFFFFFF else None
    return None


def block_row(msgtype: str, payload: bytes | memoryview) -> tuple[str, str, int | None, int, int]:
    """``(hash, prev_hash, height, tx_count, block_time_us)`` of a ``block`` or
    ``cmpctblock`` payload, or DecodeError where the payload does not decode (as
    ``msgcap parse`` decides: :func:`check_payload`). Decodes the header, the counts and
    the coinbase (the first prefilled transaction of a compact block), not the other
    transactions (a memoryview payload is read in place)."""
    check_payload(msgtype, payload)
    r = Reader(payload, msgtype)  # type: ignore[arg-type]
    header = BlockHeader.read(r)
    coinbase: Transaction | None = None
    if msgtype == "block":
        tx_count = r.count(10)
        if tx_count:
            coinbase = Transaction.read(r)
    else:
        r.u64()  # nonce
        short_ids = r.count(6)
        r.read(6 * short_ids)
        prefilled = r.count(11)
        tx_count = short_ids + prefilled
        if prefilled and r.compact_size() == 0:
            coinbase = Transaction.read(r)
    return (
        display_hash(header.hash),
        display_hash(header.prev_block),
        bip34_height(header, coinbase),
        tx_count,
        header.time * 1_000_000,
    )


_native = native()
_check: Final[Callable[[str, bytes | memoryview], bool] | None] = (
    None if _native is None else _native.check
)


def check_payload(msgtype: str, payload: bytes | memoryview) -> None:
    """Raise the DecodeError ``msgcap parse`` reports (the same reason at the same offset)
    unless ``payload`` is a valid serialization of ``msgtype``, all of it.

    Walks the payload without building anything: in ``parser/_fastjson.c`` (the render
    walk, writing nothing) when it was built, else, for a ``block``, with plain indexing
    (:func:`_txs_end`). Where neither decides, the typed codec does."""
    if _check is not None:
        try:
            if _check(msgtype, payload):
                return
        except ValueError as e:  # args: the reason and the payload offset
            reason, offset = e.args
            raise DecodeError(msgtype, offset, reason) from None
    elif msgtype == "block":
        try:
            count, pos = _count_at(payload, 80)
        except (IndexError, struct.error, _NonCanonical):
            pass
        else:
            if _txs_end(payload, pos, count) == len(payload):
                return
    from msgcap.parser.messages import decode_message  # only for what is left: slow, exact

    decode_message(msgtype, bytes(payload))


# The CompactSize reader of the pure-Python renderer (it reads a memoryview as well).
_big_compact: Final = cast(
    Callable[[bytes | memoryview, int], tuple[int, int]], fastjson._big_compact
)
_NonCanonical: Final = fastjson._NonCanonical


def _count_at(p: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The CompactSize at ``pos`` and where it ends."""
    n = p[pos]
    return (n, pos + 1) if n < 0xFD else _big_compact(p, pos)


def _txs_end(p: bytes | memoryview, pos: int, count: int) -> int | None:
    """Where ``count`` transactions from ``pos`` end, walked with plain indexing; None
    where that does not simply succeed (a legacy transaction without inputs, a
    non-canonical CompactSize, a read past the end).

    Where this returns ``len(p)`` the typed codec accepts the payload too: every item
    walked takes at least the bytes its count check asks for (an input 41, an output 9,
    a transaction 10), and every CompactSize is canonical."""
    try:
        for _ in range(count):
            n_in = p[pos + 4]
            pos += 5
            flags = 0
            if n_in == 0:
                flags = p[pos]
                if not flags:
                    return None
                n_in = p[pos + 1]
                pos += 2
            if n_in >= 0xFD:
                n_in, pos = _big_compact(p, pos - 1)
            for _ in range(n_in):
                pos += 36  # prevout
                n = p[pos]
                if n >= 0xFD:
                    n, pos = _big_compact(p, pos)
                    pos += n + 4
                else:
                    pos += n + 5  # scriptSig, nSequence
            n_out = p[pos]
            pos += 1
            if n_out >= 0xFD:
                n_out, pos = _big_compact(p, pos - 1)
            for _ in range(n_out):
                pos += 8  # nValue
                n = p[pos]
                if n >= 0xFD:
                    n, pos = _big_compact(p, pos)
                    pos += n
                else:
                    pos += n + 1
            if flags:
                for _ in range(n_in):
                    items = p[pos]
                    pos += 1
                    if items >= 0xFD:
                        items, pos = _big_compact(p, pos - 1)
                    for _ in range(items):
                        n = p[pos]
                        if n >= 0xFD:
                            n, pos = _big_compact(p, pos)
                            pos += n
                        else:
                            pos += n + 1
            pos += 4  # nLockTime
    except (IndexError, struct.error, _NonCanonical):
        return None
    return pos


def _skip_inputs(r: Reader, n: int) -> None:
    for _ in range(n):
        r.read(36)  # prevout
        r.var_bytes()  # scriptSig
        r.read(4)  # nSequence


def _skip_outputs(r: Reader, n: int) -> None:
    for _ in range(n):
        r.read(8)  # nValue
        r.var_bytes()  # scriptPubKey


def _tx_spans(p: bytes) -> tuple[int, int, int, int, int] | None:
    """``(flags, io_start, io_end, inputs, outputs)`` of a ``tx`` payload, walked with
    plain indexing; None where that does not simply succeed (a CompactSize of 0xfd or
    more, a legacy transaction without inputs, a read past the end, bytes left over):
    :func:`tx_row` then walks it again with its :class:`Reader`, which says why.

    Where this succeeds the Reader walk does too, with the same result: each item read
    takes at least the bytes its count check asks for, and every one-byte CompactSize
    is canonical."""
    try:
        n_in = p[4]
        pos = 5
        flags = 0
        io_start = 4
        if n_in == 0:
            flags = p[5]
            if not flags:
                return None
            io_start = 6
            n_in = p[6]
            pos = 7
        if n_in >= 0xFD:
            return None
        for _ in range(n_in):
            pos += 36
            n = p[pos]
            if n >= 0xFD:
                return None
            pos += n + 5
        n_out = p[pos]
        if n_out >= 0xFD:
            return None
        pos += 1
        for _ in range(n_out):
            pos += 8
            n = p[pos]
            if n >= 0xFD:
                return None
            pos += n + 1
        io_end = pos
        if flags:
            for _ in range(n_in):
                items = p[pos]
                if items >= 0xFD:
                    return None
                pos += 1
                for _ in range(items):
                    n = p[pos]
                    if n >= 0xFD:
                        return None
                    pos += n + 1
    except IndexError:
        return None
    if pos + 4 != len(p):
        return None
    return flags, io_start, io_end, n_in, n_out


def tx_row(payload: bytes) -> tuple[str, str, int, int, int]:
    """``(txid, wtxid, vsize, inputs, outputs)`` of a ``tx`` payload.

    Walks the serialization exactly as :meth:`Transaction.read` does (and raises the same
    :class:`DecodeError` where it does; the tests check the two against each other), but
    builds nothing: the txid is the hash of the payload without marker, flag and
    witnesses, cut out of the payload itself.
    """
    spans = _tx_spans(payload)
    if spans is not None:
        flags, io_start, io_end, n_in, n_out = spans
        wtxid = hash256(payload)
        if flags:
            base = payload[:4] + payload[io_start:io_end] + payload[-4:]
            txid, base_size = hash256(base), len(base)
        else:
            txid, base_size = wtxid, len(payload)
        weight = 3 * base_size + len(payload)
        return txid[::-1].hex(), wtxid[::-1].hex(), (weight + 3) // 4, n_in, n_out
    r = Reader(payload, "tx")
    r.read(4)  # version
    n_in = r.count(41)
    n_out = 0
    flags = 0
    io_start = 4
    if n_in == 0:
        flags = r.u8()  # the segwit flag, or (legacy, no inputs) the output count 0
        if flags:
            io_start = r.pos
            n_in = r.count(41)
            _skip_inputs(r, n_in)
            n_out = r.count(9)
            _skip_outputs(r, n_out)
    else:
        _skip_inputs(r, n_in)
        n_out = r.count(9)
        _skip_outputs(r, n_out)
    io_end = r.pos
    if flags:
        for _ in range(n_in):
            for _ in range(r.count(1)):
                r.var_bytes()
    lock_time = r.pos
    r.read(4)
    r.finish()
    wtxid = hash256(payload)
    if flags:
        base = payload[:4] + payload[io_start:io_end] + payload[lock_time:]
        txid, base_size = hash256(base), len(base)
    else:
        txid, base_size = wtxid, len(payload)
    weight = 3 * base_size + len(payload)
    return display_hash(txid), display_hash(wtxid), (weight + 3) // 4, n_in, n_out


INV_MESSAGES: Final = frozenset(("inv", "getdata", "notfound"))
_INV_ENTRY: Final = struct.Struct("<I32s")


def inv_entries(msgtype: str, payload: bytes) -> list[tuple[int, bytes]]:
    """``(type, hash)`` per inventory entry of an ``inv``, ``getdata`` or ``notfound``
    payload: what :class:`Inv`, :class:`GetData` and :class:`NotFound` decode (the tests
    check them against each other), in bulk."""
    start, n = _inv_span(msgtype, payload)
    return list(_INV_ENTRY.iter_unpack(memoryview(payload)[start : start + _INV_ENTRY.size * n]))


def _inv_span(msgtype: str, payload: bytes | memoryview) -> tuple[int, int]:
    """Where the entries of an inventory payload start, and how many there are (checked
    as :func:`inv_entries` checks them)."""
    if payload and payload[0] < 0xFD and 1 + _INV_ENTRY.size * payload[0] == len(payload):
        return 1, payload[0]  # the usual case, where the Reader agrees
    r = Reader(payload, msgtype)  # type: ignore[arg-type]
    n = r.count(_INV_ENTRY.size)
    start = r.pos
    r.read(_INV_ENTRY.size * n)
    r.finish()
    return start, n


# --- the manifest -------------------------------------------------------------------------


@dataclass(slots=True)
class FileState:
    """What the manifest knows of one capture file."""

    node: str
    peer: str
    connection: str | None
    direction: str
    offset: int = 0
    """Bytes exported so far: the end of the last record exported."""
    records: int = 0
    head_sha256: str = ""
    """SHA-256 of the first ``min(offset, 4096)`` bytes."""
    tail_sha256: str = ""
    """SHA-256 of the ``min(offset, 4096)`` bytes before ``offset``."""
    last_time: int = -1
    """The time of the last record exported."""
    first_header: str = ""
    """The first record's 24-byte header (time, type, length), hex: tells a file that
    was replaced by a shorter one from one that was truncated."""
    device: int = 0
    inode: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "peer": self.peer,
            "connection": self.connection,
            "direction": self.direction,
            "offset": self.offset,
            "records": self.records,
            "head_sha256": self.head_sha256,
            "tail_sha256": self.tail_sha256,
            "last_time": self.last_time,
            "first_header": self.first_header,
            "device": self.device,
            "inode": self.inode,
        }

    @classmethod
    def from_json(cls, d: Any) -> FileState:
        """From the manifest; ValueError naming the field when it is not what it should be."""
        if not isinstance(d, dict):
            raise ValueError("a file entry is not an object")
        connection = d.get("connection")
        if connection is not None and not isinstance(connection, str):
            raise ValueError("connection: not a string")
        direction = _field(d, "direction", str)
        if direction not in ("recv", "sent"):
            raise ValueError(f"direction: {direction!r}")
        state = cls(
            _field(d, "node", str),
            _field(d, "peer", str),
            connection,
            direction,
            _field(d, "offset", int),
            _field(d, "records", int, 0),
            _field(d, "head_sha256", str, ""),
            _field(d, "tail_sha256", str, ""),
            _field(d, "last_time", int, -1),
            _field(d, "first_header", str, ""),
            _field(d, "device", int, 0),
            _field(d, "inode", int, 0),
        )
        for name in ("offset", "records", "device", "inode"):
            if getattr(state, name) < 0:
                raise ValueError(f"{name}: negative")
        if state.last_time < -1:
            raise ValueError("last_time: below -1")
        return state


def _field(d: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``d[name]`` when it is of ``kind`` (bool is no int here); ``default`` when absent
    and there is one; else ValueError."""
    if name not in d and default is not None:
        return default
    value = d.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name}: {value!r} is not a {kind.__name__}")
    return value


RUN_ID: Final = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")
"""A run's id (:func:`_new_run_id`): the only names a part file may carry."""


@dataclass(slots=True)
class Manifest:
    payload: bool
    files: dict[str, FileState] = field(default_factory=dict)
    runs: int = 0
    last_run: dict[str, Any] | None = None
    pending_run: str | None = None
    committed_runs: list[str] = field(default_factory=list)
    """Every run whose part files are in the dataset: never removed by a rollback."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "tables": [t.name for t in TABLES],
            "payload": self.payload,
            "runs": self.runs,
            "last_run": self.last_run,
            "pending_run": self.pending_run,
            "committed_runs": self.committed_runs,
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
        }


def read_manifest(out: Path) -> Manifest | None:
    """The manifest of a dataset, None when there is none; UsageError when unusable."""
    path = out / MANIFEST_NAME
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as e:
        raise UsageError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UsageError(f"{path}: not a msgcap dataset manifest")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{out}: written with dataset schema version {version}, this msgcap writes and "
            f"reads version {SCHEMA_VERSION}: export into a new folder"
        )
    try:
        return _manifest_of(data)
    except ValueError as e:
        raise UsageError(
            f"{path}: damaged manifest ({e}): nothing was changed; restore it or export "
            "into a new folder"
        ) from None


def _manifest_of(data: dict[str, Any]) -> Manifest:
    """The manifest in ``data``; ValueError naming what is wrong."""
    payload = _field(data, "payload", bool, True)
    runs = _field(data, "runs", int, 0)
    if runs < 0:
        raise ValueError("runs: negative")
    last_run = data.get("last_run")
    if last_run is not None and not isinstance(last_run, dict):
        raise ValueError("last_run: not an object")
    pending = data.get("pending_run")
    if pending is not None and not (isinstance(pending, str) and RUN_ID.fullmatch(pending)):
        raise ValueError(f"pending_run: {pending!r} is not a run id")
    committed = data.get("committed_runs")
    if committed is None:  # written before the list was kept: its last run, at least
        last_id = None if last_run is None else last_run.get("id")
        committed = [last_id] if last_id is not None else []
    if not isinstance(committed, list):
        raise ValueError("committed_runs: not a list")
    for run_id in committed:
        if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
            raise ValueError(f"committed_runs: {run_id!r} is not a run id")
    if pending is not None and pending in committed:
        raise ValueError(f"pending_run {pending} is recorded as committed")
    files = _field(data, "files", dict, {})
    states = {}
    for key, value in files.items():
        if not os.path.isabs(key):
            raise ValueError(f"files: {key!r} is not an absolute path")
        try:
            states[key] = FileState.from_json(value)
        except ValueError as e:
            raise ValueError(f"files[{key!r}]: {e}") from None
    return Manifest(payload, states, runs, last_run, pending, list(committed))


def write_manifest(out: Path, manifest: Manifest) -> None:
    """Atomically: a reader sees the old manifest or the new one."""
    path = out / MANIFEST_NAME
    tmp = out / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(manifest.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(f: BinaryIO, end: int) -> tuple[str, str]:
    n = min(end, FINGERPRINT_BYTES)
    f.seek(0)
    head = hashlib.sha256(f.read(n)).hexdigest()
    f.seek(end - n)
    tail = hashlib.sha256(f.read(n)).hexdigest()
    return head, tail


def _first_after(f: BinaryIO, last_time: int) -> int:
    """The offset of the first record later than ``last_time``, else of the end of the
    last complete record."""
    for entry in read_record_headers(f):
        if isinstance(entry, Damage):
            return entry.offset
        offset, t = entry
        if t > last_time:
            return offset
    return os.fstat(f.fileno()).st_size


# --- warnings -------------------------------------------------------------------------------


class Report:
    """What an export says on stderr, and its exit status."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.damaged = 0
        self.undecodable: dict[str, int] = {}

    def warn(self, text: str) -> None:
        print(f"msgcap: warning: {text}", file=self.stream)

    def note(self, text: str) -> None:
        print(f"msgcap: note: {text}", file=self.stream)

    def damage(self, source: CaptureFile, d: Damage) -> None:
        """The damage report of :mod:`msgcap.capture.conversation`'s shape."""
        self.damaged += 1
        self.warn(f"{source.path}: offset {d.offset}: {d.reason} ({d.skipped} bytes skipped)")

    def undecodable_payload(
        self, table: str, source: CaptureFile, offset: int, e: Exception
    ) -> None:
        n = self.undecodable.get(table, 0)
        self.undecodable[table] = n + 1
        if n == 0:
            self.warn(
                f"{source.path}: offset {offset}: {e}: not in {table} (the message is in "
                "messages; further undecodable payloads are counted at the end)"
            )

    def summary(self) -> None:
        for table, n in self.undecodable.items():
            self.warn(f"{n} undecodable payload(s) left out of {table}")

    @property
    def exit_status(self) -> int:
        return 1 if self.damaged or self.undecodable else 0


# --- writing ------------------------------------------------------------------------------


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

    def __init__(self, dataset: _DatasetWriter, table: Table) -> None:
        self.dataset = dataset
        self.table = table
        pa = dataset.pa
        self.columns = table.columns
        self.schema = pa.schema(
            [pa.field(c.name, _arrow_type(pa, c.kind), nullable=c.nullable) for c in self.columns],
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
            arrays.append(pa.array(values, _arrow_type(pa, c.kind)))
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
        rows, size = buf.rows, _INV_ENTRY.size
        int32 = pa.int32()
        ends = pa.array(list(itertools.accumulate(buf.counts)), int32)
        message = pc.run_end_decode(
            pa.RunEndEncodedArray.from_arrays(ends, pa.array(range(len(buf.counts)), int32))
        )  # the message of each row
        arrays = [
            pa.array(values, _arrow_type(pa, c.kind)).take(message)
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
            type_ids = pa.array([t for t, _ in _INV_ENTRY.iter_unpack(buf.data)], pa.int64())
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


class _DatasetWriter:
    """The part files of one run: hidden while written, renamed into place by commit().

    Row groups are encoded and written by one background thread (pyarrow releases the
    GIL there), in order, while the next rows are decoded; at most
    :data:`MAX_PENDING_WRITES` wait for it, so memory stays bounded.
    """

    def __init__(self, out: Path, run_id: str, payload: bool) -> None:
        self.pa = _pa()
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


# --- the export ---------------------------------------------------------------------------


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


def _new_run_id() -> str:
    now = dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


def _remove_run(out: Path, run_id: str | None, committed: Iterable[str] = ()) -> int:
    """Remove the part files of an interrupted run (``run_id``, never one of ``committed``)
    and stray temporary files: only real files in real folders of the dataset (a symlink
    is never followed, nor removed unless it is itself one of those names)."""
    if run_id is not None and (not RUN_ID.fullmatch(run_id) or run_id in set(committed)):
        raise UsageError(f"{out}: will not remove the files of run {run_id!r}")
    removed = 0
    for table in TABLES:
        root = out / table.name
        if root.is_symlink() or not root.is_dir():
            continue
        for dirpath, dirnames, names in os.walk(root):  # does not follow symlinks
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in names:
                stray = name.startswith(".part-") and name.endswith(".tmp")
                if stray or (run_id is not None and name.startswith(f"part-{run_id}-")):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
    return removed


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    with open(out / LOCK_NAME, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"{out}: another export is writing this dataset") from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _start_offset(path: str, state: FileState, report: Report) -> int:
    """Where to resume in a known file (checking that it is still the same file)."""
    st = os.stat(path)
    with open(path, "rb") as f:
        n = min(state.offset, FINGERPRINT_BYTES)
        head_ok = st.st_size >= n and _fingerprint(f, n)[0] == state.head_sha256
        if st.st_size >= state.offset:
            if head_ok and _fingerprint(f, state.offset)[1] == state.tail_sha256:
                return state.offset
            report.warn(
                f"{path}: replaced since the last export (its bytes before offset "
                f"{state.offset} changed): exported again from the start; the rows exported "
                "from the earlier file stay in the dataset"
            )
            return 0
        first = bytes.fromhex(state.first_header)
        f.seek(0)
        if (st.st_size >= n and not head_ok) or f.read(len(first)) != first:
            report.warn(
                f"{path}: replaced since the last export (now {st.st_size} bytes, its first "
                "bytes changed): exported again from the start; the rows exported from the "
                "earlier file stay in the dataset"
            )
            return 0
        resume = _first_after(f, state.last_time)
        report.warn(
            f"{path}: truncated since the last export (now {st.st_size} bytes, "
            f"{state.offset} were exported): the rows exported before stay in the dataset; "
            f"the records after the last one exported (from byte {resume}) are exported"
        )
        return resume


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


def _date(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


_WINDOW: Final = 16 << 20
"""Bytes of a capture file walked at a time in place (mapped), then let go."""


class _Segments:
    """The whole records of an open capture file from ``start``, as segments
    ``(data, pos, stop, base)``: ``data[pos:stop]`` holds whole records and ``data[0]`` is
    at byte ``base`` of the file. ``damage`` then says why the file did not end cleanly,
    as :class:`RecordChunks` says it (a segment must be let go before the next is asked
    for).

    The file as it is when the walk starts is mapped and walked in place, a window at a
    time (its pages let go after each, so memory stays bounded); where that stops (the
    end of the mapping, or a record that is not whole), :class:`RecordChunks` reads on,
    and reports damage."""

    def __init__(self, f: BinaryIO, start: int) -> None:
        self.f = f
        self.start = start
        self.damage: Damage | None = None

    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        f = self.f
        pos = self.start
        if os.fstat(f.fileno()).st_size > pos:
            try:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                pass
            else:
                yield from self._mapped(mm)
                pos = self._pos
                del mm
        f.seek(pos)
        chunks = RecordChunks(f)
        while chunks.fill():
            stop = chunks.whole_end()
            yield chunks.data, chunks.pos, stop, chunks.base
            chunks.pos = stop
        self.damage = chunks.damage

    def _mapped(self, mm: mmap.mmap) -> Iterator[tuple[Any, int, int, int]]:
        n = len(mm)
        pos = self.start
        page = mmap.PAGESIZE
        dropped = pos // page * page
        whole = memoryview(mm)
        try:
            while pos < n:
                limit = min(pos + _WINDOW, n)
                end = _whole_end(whole[:limit], pos)
                if end == pos and limit < n:  # a record longer than the window
                    limit = min(pos + RECORD_HEADER_SIZE + MAX_RECORD_PAYLOAD, n)
                    end = _whole_end(whole[:limit], pos)
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
            self._pos = pos
            whole.release()


def _whole_end(data: memoryview, pos: int) -> int:
    """Where the whole records from ``pos`` in ``data`` end."""
    end, later, _ = scan(data, pos, MAX_TIME, 0)  # type: ignore[arg-type]
    while later is not None:  # stopped where time went back: walk on
        end, later, _ = scan(data, end, MAX_TIME, 0)  # type: ignore[arg-type]
    return end


def _export_file(
    source: CaptureFile,
    state: FileState,
    start: int,
    writer: _DatasetWriter,
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
                        first, n = _inv_span(msgtype, payload)
                    except DecodeError as e:
                        report.undecodable_payload("inv_items", source, offset, e)
                        n = 0
                    if n:
                        ibuf = inv_items.buffer(node, date)
                        ibuf.add_message(
                            (peer, conn, direction, t, msgtype, offset),
                            payload[first : first + _INV_ENTRY.size * n],
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
        state.head_sha256, state.tail_sha256 = _fingerprint(f, end)
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
    with _locked(out):
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
            _remove_run(out, manifest.pending_run, manifest.committed_runs)
            report.note(
                f"{out}: removed the files of an interrupted export ({manifest.pending_run})"
            )
            manifest.pending_run = None
        _remove_run(out, None)

        # Which files, from where (said before anything is written).
        plan: list[tuple[CaptureFile, str, FileState, int]] = []
        seen: set[str] = set()
        result = ExportResult(_new_run_id())
        for source in sources:
            key = str(source.path.resolve())
            if key in seen:
                continue
            seen.add(key)
            label = node if node is not None else node_of(source)
            state = manifest.files.get(key)
            if state is None:
                state = FileState(label, source.peer, connection_of(source), source.direction.value)
                start = 0
                result.new_files += 1
            else:
                if state.node != label:
                    raise UsageError(
                        f"{source.path}: exported into {out} as node {state.node!r} before, "
                        f"not {label!r}: pass --node {state.node} (or export into another folder)"
                    )
                start = _start_offset(key, state, report)
                if start < state.offset:  # replaced or truncated: a new stream from here
                    state.offset = start
                if start == 0:
                    state.last_time = -1
            plan.append((source, key, state, start))
        result.files = len(plan)

        manifest.pending_run = result.run_id
        write_manifest(out, manifest)
        writer = _DatasetWriter(out, result.run_id, payload)
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


# --- SQL ----------------------------------------------------------------------------------


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise UsageError("msgcap sql needs duckdb: pip install 'msgcap[dataset]'") from None
    return duckdb


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def view_sql(out: Path, table: Table, payload: bool = True) -> str:
    """``CREATE VIEW`` for one table of the dataset at ``out`` (an empty view with the
    table's columns while it has no files yet)."""
    names = ["node", "date", *table.column_names()]
    kinds = {c.name: c.kind for c in (*PARTITION_COLUMNS, *table.columns)}
    root = out / table.name
    has_files = root.is_dir() and any(
        n.endswith(".parquet") and n.startswith("part-") for _, _, ns in os.walk(root) for n in ns
    )
    if not has_files:
        cols = ", ".join(f'CAST(NULL AS {_SQL_TYPES[kinds[n]]}) AS "{n}"' for n in names)
        return f"CREATE VIEW {table.name} AS SELECT {cols} WHERE false"
    pattern = _sql_string(str(root / "**" / "*.parquet"))
    select = ", ".join(
        f'CAST(NULL AS BLOB) AS "{n}"' if n == "payload" and not payload else f'"{n}"'
        for n in names
    )
    return (
        f"CREATE VIEW {table.name} AS SELECT {select} FROM read_parquet({pattern}, "
        "hive_partitioning = true, hive_types = {'node': VARCHAR, 'date': DATE})"
    )


def connect(out: Path) -> Any:
    """An in-memory DuckDB connection with the dataset's tables as views (UTC session)."""
    duckdb = _duckdb()
    manifest = read_manifest(out)
    if manifest is None:
        raise UsageError(f"{out}: not a msgcap dataset (no {MANIFEST_NAME}; run msgcap export "
                         "--parquet first)")  # fmt: skip
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    for table in TABLES:
        con.execute(view_sql(out, table, manifest.payload))
    return con


def _text(value: Any, null: str) -> str:
    if value is None:
        return null
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | decimal.Decimal | dt.date | dt.time | dt.timedelta):
        return str(value)
    return orjson.dumps(value, default=_json_default).decode()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


_MAX_CELL: Final = 80


def print_result(cursor: Any, fmt: str, out: IO[str]) -> int:
    """Print a DuckDB result as a table, CSV, a JSON array or JSON lines; return the rows.

    CSV and JSON are streamed; the table is measured first, so it holds all rows."""
    if cursor.description is None:
        return 0
    names = [d[0] for d in cursor.description]
    batches: Iterator[list[tuple[Any, ...]]] = iter(lambda: cursor.fetchmany(10_000), [])
    count = 0
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(names)
        for batch in batches:
            w.writerows([_text(v, "") for v in row] for row in batch)
            count += len(batch)
        return count
    if fmt in ("json", "jsonl"):
        opt = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
        first = True
        if fmt == "json":
            out.write("[")
        for batch in batches:
            for row in batch:
                text = orjson.dumps(dict(zip(names, row, strict=True)), default=_json_value,
                                    option=opt).decode()  # fmt: skip
                if fmt == "jsonl":
                    out.write(text + "\n")
                else:
                    out.write(("\n" if first else ",\n") + text)
                first = False
            count += len(batch)
        if fmt == "json":
            out.write("\n]\n" if not first else "]\n")
        return count
    table = [[_cell(v) for v in values] for batch in batches for values in batch]
    # A column of numbers (NULLs aside) is right-aligned.
    numeric = [
        any(c[i][1] for c in table) and all(c[i][1] or c[i][2] for c in table)
        for i in range(len(names))
    ]
    widths = [max([len(n)] + [len(r[i][0]) for r in table]) for i, n in enumerate(names)]
    out.write("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for cells in table:
        line = "  ".join(
            text.rjust(w) if num else text.ljust(w)
            for (text, _, _), w, num in zip(cells, widths, numeric, strict=True)
        )
        out.write(line.rstrip() + "\n")
    out.write(f"({len(table)} row{'' if len(table) == 1 else 's'})\n")
    return len(table)


def _cell(value: Any) -> tuple[str, bool, bool]:
    """A table cell: its text, whether it is a number, whether it is NULL."""
    number = isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool)
    text = _text(value, "NULL")
    if len(text) > _MAX_CELL:
        text = text[: _MAX_CELL - 1] + "…"
    return text, number, value is None


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return _json_default(value)


def run_query(out: Path, query: str, fmt: str = "table", stream: IO[str] | None = None) -> int:
    """Run ``query`` over the dataset at ``out`` and print the result; the row count."""
    duckdb = _duckdb()
    con = connect(out)
    try:
        try:
            cursor = con.execute(query)
        except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException) as e:
            raise UsageError(_one_line(e)) from None
        except duckdb.Error as e:
            raise DatasetError(_one_line(e)) from None
        return print_result(cursor, fmt, stream or sys.stdout)
    finally:
        con.close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# --- the command line ---------------------------------------------------------------------


def add_export_parquet_args(
    p: argparse.ArgumentParser, kind: argparse._MutuallyExclusiveGroup | None = None
) -> None:
    """``--parquet OUT`` (into ``kind``, the export command's group of output kinds, when
    given) and the options that go with it."""
    (kind or p).add_argument(
        "--parquet", metavar="OUT", help="a Parquet dataset (incremental: adds new records)"
    )
    g = p.add_argument_group("with --parquet")
    g.add_argument(
        "--node", metavar="NAME", help="node label (default: the node folder, else the root's name)"
    )
    g.add_argument("--no-payload", action="store_true", help="leave payloads out of messages")


def run_export_parquet(args: argparse.Namespace) -> int:
    report = Report(sys.stderr)
    try:
        result = export_parquet(
            args.paths, Path(args.parquet), node=args.node, payload=not args.no_payload,
            report=report,
        )  # fmt: skip
    except DatasetError as e:
        print(f"msgcap: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"msgcap: error: {e}", file=sys.stderr)
        return 1
    print(result.summary(Path(args.parquet)))
    report.summary()
    return report.exit_status


def add_sql_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="a dataset written by msgcap export --parquet")
    p.add_argument("query", metavar="QUERY", help="SQL (DuckDB) over messages, inv_items, "
                   "transactions and blocks")  # fmt: skip
    p.add_argument("--format", choices=("table", "csv", "json", "jsonl"), default="table",
                   help="output format (default: an aligned table)")  # fmt: skip


def run_sql(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.is_dir():
        raise UsageError(f"{out}: no such folder")
    try:
        run_query(out, args.query, args.format)
    except DatasetError as e:
        print(f"msgcap: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
