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

Memory stays bounded whatever the input: files are mapped and walked in place a window
at a time with the capture layer's reader (the pages of each let go after it), rows are
buffered per partition up to one row group, all buffers together are kept under a
budget by flushing the largest, and one writer thread encodes and writes row groups
while the next rows are decoded. Per record, Python only splits the header and copies
the payload into its buffer; the derived tables decode only what they need (inventory
entries are turned into rows by Arrow, in bulk).

A run writes its files under hidden temporary names and renames them into place only
when all are complete, then records the run in the manifest; files of a run that died
before that are removed by the next run. One export at a time per OUT (a lock file).

pyarrow and duckdb are imported only when these commands run (``pip install
'msgcap[dataset]'``).

The modules: :mod:`.schema` (the tables), :mod:`.decode` (payloads to rows),
:mod:`.manifest` (what was exported, runs, the lock), :mod:`.writing` (rows to part
files), :mod:`.export` (the export itself), :mod:`.sql` (DuckDB over the dataset) and
:mod:`.cli` (the command-line glue); this package exports what their users need.
"""

from __future__ import annotations

from msgcap.parser.dataset.cli import (
    add_export_parquet_args,
    add_sql_args,
    run_export_parquet,
    run_sql,
)
from msgcap.parser.dataset.decode import (
    INV_MESSAGES,
    bip34_height,
    check_payload,
    inv_entries,
    tx_row,
    txs_end,
)
from msgcap.parser.dataset.export import Report, export_parquet
from msgcap.parser.dataset.manifest import (
    FORMAT_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    read_manifest,
    write_manifest,
)
from msgcap.parser.dataset.schema import MESSAGES, SCHEMA_VERSION, TABLES, DatasetError
from msgcap.parser.dataset.sql import connect, print_result
from msgcap.parser.dataset.writing import DatasetWriter

__all__ = [
    "FORMAT_NAME",
    "INV_MESSAGES",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "MESSAGES",
    "SCHEMA_VERSION",
    "TABLES",
    "DatasetError",
    "DatasetWriter",
    "Report",
    "add_export_parquet_args",
    "add_sql_args",
    "bip34_height",
    "check_payload",
    "connect",
    "export_parquet",
    "inv_entries",
    "print_result",
    "read_manifest",
    "run_export_parquet",
    "run_sql",
    "tx_row",
    "txs_end",
    "write_manifest",
]
