"""``msgcap sql``: DuckDB over the dataset, each table a view of its Parquet files, and
the printing of a result (an aligned table, CSV, a JSON array or JSON lines).

duckdb is imported only when a query runs (``pip install 'msgcap[dataset]'``).
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import orjson

from msgcap.capture.errors import UsageError
from msgcap.parser.dataset.manifest import MANIFEST_NAME, read_manifest
from msgcap.parser.dataset.schema import PARTITION_COLUMNS, SQL_TYPES, TABLES, DatasetError, Table


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
        cols = ", ".join(f'CAST(NULL AS {SQL_TYPES[kinds[n]]}) AS "{n}"' for n in names)
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
