"""The dataset's command-line glue: the options of ``msgcap export --parquet`` and
``msgcap sql``, and the functions :mod:`msgcap.cli` runs for them.

Failures are raised (:class:`~msgcap.capture.errors.UsageError`, exit status 2;
:class:`~msgcap.parser.dataset.schema.DatasetError` and ``OSError``, exit status 1) and
said in one line by the command-line dispatcher, as for every command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msgcap.capture.errors import UsageError
from msgcap.parser.dataset.export import Report, export_parquet
from msgcap.parser.dataset.sql import run_query


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
    result = export_parquet(
        args.paths, Path(args.parquet), node=args.node, payload=not args.no_payload,
        report=report,
    )  # fmt: skip
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
    run_query(out, args.query, args.format)
    return 0
