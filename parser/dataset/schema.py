"""The dataset's tables and columns (schema version :data:`SCHEMA_VERSION`), as the
Parquet files and the SQL views of :mod:`msgcap.parser.dataset` have them.

The README documents the same tables; a change to any of them bumps the version, and an
existing dataset of another version is refused rather than mixed.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, Final

from msgcap.capture.errors import MsgcapError, UsageError

SCHEMA_VERSION: Final = 1
"""Bumped whenever a table, column or type changes; an OUT of another version is refused."""


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


def load_pyarrow() -> Any:
    """pyarrow, with the submodules the dataset uses; UsageError when not installed."""
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.compute  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError:
        raise UsageError(
            "the Parquet export needs pyarrow: pip install 'msgcap[dataset]'"
        ) from None
    return pyarrow


def arrow_type(pa: Any, kind: str) -> Any:
    """The Arrow type of a column kind."""
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


SQL_TYPES: Final = {
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
