"""Spark reads the Parquet dataset as it is, and counts what DuckDB counts.

Needs pyspark and a Java runtime (17 or later); the test skips, saying so, where either is
missing, and fails instead under ``MSGCAP_REQUIRE_SPARK=1`` (CI installs both).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

from msgcap.capture.records import encode_record
from msgcap.parser import dataset
from msgcap.parser.messages import Inv, Ping
from msgcap.parser.structures import Inventory
from tests.conftest import pair_tree

T0 = 1_795_000_000_000_000


def _missing(what: str) -> None:
    if os.environ.get("MSGCAP_REQUIRE_SPARK"):
        pytest.fail(f"{what} (MSGCAP_REQUIRE_SPARK is set)")
    pytest.skip(f"{what}: .ci/run installs it (Debian's openjdk-17-jre-headless, pip pyspark)")


def _java_major() -> int | None:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        return None
    res = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    m = re.search(r'version "(\d+)', res.stderr + res.stdout)
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        _missing("pyspark is not installed")
    major = _java_major()
    if major is None:
        _missing("no Java runtime (java on PATH or JAVA_HOME)")
    assert major is not None
    if major < 17:
        _missing(f"Java {major} is too old for Spark 4 (17 or later)")
    session = (
        SparkSession.builder.master("local[2]")
        .appName("msgcap-dataset-test")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.memory", "512m")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Core captures (nodes a and b) and a second tree with a node folder, the session
    layout and records over three days, exported in two runs."""
    tmp = tmp_path_factory.mktemp("spark")
    root = pair_tree(tmp)
    out = tmp / "ds"
    dataset.export_parquet([root], out)
    day = 86_400 * 10**6
    folder = root / "lab" / "203.0.113.7_8333" / "20261118T000000.000000Z_3"
    folder.mkdir(parents=True)
    with open(folder / "msgs_recv.dat", "wb") as f:
        for i in range(30):
            t = T0 + i * day // 10
            f.write(encode_record(t, "ping", Ping(i).encode()))
            inv = Inv(tuple(Inventory(5, bytes([i]) * 32) for _ in range(i % 3)))
            f.write(encode_record(t + 1, "inv", inv.encode()))
    dataset.export_parquet([root], out)
    return out


def duck(out: Path, query: str) -> list[tuple[Any, ...]]:
    con = dataset.connect(out)
    try:
        return sorted(tuple(r) for r in con.execute(query).fetchall())
    finally:
        con.close()


def spark_sql(spark: Any, out: Path, query: str) -> list[tuple[Any, ...]]:
    for table in dataset.TABLES:
        spark.read.parquet(str(out / table.name)).createOrReplaceTempView(table.name)
    return sorted(tuple(r) for r in spark.sql(query).collect())


QUERIES = [
    "select count(*) from messages",
    "select count(*) from inv_items",
    "select count(*) from transactions",
    "select count(*) from blocks",
    "select node, cast(date as string), direction, msgtype, count(*), sum(size) "
    "from messages group by 1, 2, 3, 4",
    "select node, peer, coalesce(connection, '-'), count(*) from messages group by 1, 2, 3",
    "select node, msgtype, inv_type, count(*), count(distinct hash) from inv_items "
    "group by 1, 2, 3",
    "select node, count(distinct txid), count(distinct wtxid), sum(vsize) from transactions "
    "group by 1",
    "select node, msgtype, count(*), sum(height), sum(tx_count) from blocks group by 1, 2",
    "select sum(octet_length(payload)), count(distinct payload) from messages",
]


@pytest.mark.parametrize("query", QUERIES)
def test_spark_counts_what_duckdb_counts(spark: Any, out: Path, query: str) -> None:
    expected = duck(out, query)
    assert expected and expected != [(0,)]
    assert spark_sql(spark, out, query) == expected


def test_spark_reads_the_same_times(spark: Any, out: Path) -> None:
    query = "select node, min({t}), max({t}) from messages group by node"
    expected = duck(out, query.format(t="epoch_us(time)"))
    assert spark_sql(spark, out, query.format(t="unix_micros(time)")) == expected
    assert len(expected) == 3  # a, b and lab
