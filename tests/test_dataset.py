"""``msgcap export --parquet`` and ``msgcap sql``: a tree of real Core captures exported and
read back with DuckDB record for record, incremental exports, damaged, truncated and
replaced files, and the README's one-line questions."""

from __future__ import annotations

import argparse
import datetime
import fcntl
import io
import json
import random
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("pyarrow")
duckdb = pytest.importorskip("duckdb")

import pyarrow.parquet as pq  # type: ignore[import-untyped]  # noqa: E402

from msgcap.capture.records import Direction, encode_record, read_records  # noqa: E402
from msgcap.parser import dataset  # noqa: E402
from msgcap.parser.messages import GetData, Inv, Ping, decode_message  # noqa: E402
from msgcap.parser.structures import (  # noqa: E402
    BlockHeader,
    Inventory,
    InvType,
    OutPoint,
    Transaction,
    TxIn,
    TxOut,
)
from msgcap.parser.wire import DecodeError, display_hash  # noqa: E402
from tests.conftest import PAIR, PAIR_A, pair_tree  # noqa: E402

ROOT = Path(__file__).parent.parent
T0 = 1_795_000_000_000_000  # 2026-11-18T...Z, in µs


def msgcap(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run a msgcap command in-process, as the command line does (failures said in one
    line by its dispatcher): (exit status, stdout, stderr)."""
    from msgcap import cli

    capsys.readouterr()
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def export(capsys: pytest.CaptureFixture[str], out: Path, *paths: Path | str) -> tuple[int, str]:
    status, stdout, stderr = msgcap(capsys, "export", "--parquet", str(out), *map(str, paths))
    assert "new messages" in stdout or status != 0, stdout + stderr
    return status, stderr


def sql(out: Path, query: str) -> list[tuple[Any, ...]]:
    con = dataset.connect(out)
    try:
        return list(con.execute(query).fetchall())
    finally:
        con.close()


def exported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> tuple[Path, Path]:
    """The Core pair copied (``pair_tree``) and exported to ``tmp_path / "ds"``: the
    capture root and the dataset."""
    root = pair_tree(tmp_path)
    out = tmp_path / "ds"
    status, err = export(capsys, out, root)
    assert status == 0, err
    return root, out


def file_records(root: Path) -> list[tuple[str, str, str, int, str, int, bytes]]:
    """(node, peer, direction, offset, msgtype, time, payload) of every record under root."""
    rows = []
    for path in sorted(root.rglob("*.dat")):
        with open(path, "rb") as f:
            for rec in read_records(f):
                assert not hasattr(rec, "reason"), rec
                rows.append(
                    (
                        path.parent.parent.name,
                        path.parent.name,
                        Direction.of_file(path).value,
                        rec.offset,
                        rec.msgtype.label,
                        rec.time,
                        rec.payload,
                    )
                )
    return rows


def write(path: Path, records: list[tuple[int, str, bytes]], mode: str = "ab") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        for t, msgtype, payload in records:
            f.write(encode_record(t, msgtype, payload))


def pings(n: int, t0: int = T0, step: int = 1000) -> list[tuple[int, str, bytes]]:
    return [(t0 + i * step, "ping", Ping(i).encode()) for i in range(n)]


MESSAGE_ROWS = (
    "select node, peer, direction, file_offset, msgtype, epoch_us(time), payload from messages"
)


# --- a tree of real Core captures ------------------------------------------------------------


def test_every_record_appears_once_with_its_type_direction_and_payload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = exported(capsys, tmp_path)
    expected = file_records(root)
    assert len(expected) == 290
    got = sql(out, MESSAGE_ROWS)
    assert sorted(got) == sorted(expected)
    assert Counter(got) == Counter(expected)  # once each
    sizes = sql(out, "select count(*), sum(size), min(octet_length(payload) = size) from messages")
    assert sizes == [(290, 60072, True)]
    assert sql(out, "select distinct node from messages order by 1") == [("a",), ("b",)]
    assert sql(out, "select count(*) from messages where connection is not null") == [(0,)]
    types = dict(sql(out, "select typeof(time), typeof(date) from messages limit 1"))
    assert types == {"TIMESTAMP WITH TIME ZONE": "DATE"}


def test_every_inventory_entry_appears_in_inv_items(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = exported(capsys, tmp_path)
    expected = []
    for node, peer, direction, offset, msgtype, t, payload in file_records(root):
        if msgtype in ("inv", "getdata", "notfound"):
            msg: Any = decode_message(msgtype, payload)
            for i, inv in enumerate(msg.inv):
                name = InvType.name_of(inv.type)
                expected.append(
                    (node, peer, direction, t, msgtype, offset, i, name, inv.type,
                     display_hash(inv.hash))
                )  # fmt: skip
    assert len(expected) == 32
    got = sql(
        out,
        'select node, peer, direction, epoch_us(time), msgtype, file_offset, "index", inv_type, '
        "inv_type_id, hash from inv_items",
    )
    assert sorted(got) == sorted(expected)
    assert {r[7] for r in got} == {"MSG_WTX", "MSG_WITNESS_BLOCK", "MSG_BLOCK"}


def test_transactions_and_blocks_tables_agree_with_what_core_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = exported(capsys, tmp_path)
    # Core's own getdata for witness transactions names wtxids; the answers' wtxids match.
    asked = set(
        sql(out, "select hash from inv_items where msgtype = 'getdata' and inv_type = 'MSG_WTX'")
    )
    sent = set(sql(out, "select wtxid from transactions where direction = 'sent'"))
    assert asked and asked <= sent
    assert sql(out, "select count(*), count(distinct txid) from transactions") == [(6, 3)]
    # Blocks asked for by hash are blocks sent, and the heights follow the chain.
    asked_blocks = set(
        sql(out, "select hash from inv_items where msgtype = 'getdata' and inv_type like '%BLOCK'")
    )
    sent_blocks = set(sql(out, "select hash from blocks where direction = 'sent'"))
    assert asked_blocks and asked_blocks <= sent_blocks
    assert sql(
        out,
        "select count(*) from blocks b join blocks p on b.prev_hash = p.hash and b.node = p.node "
        "and b.direction = p.direction where b.height <> p.height + 1",
    ) == [(0,)]
    assert sql(out, "select min(height), max(height), count(*) - count(height) from blocks") == [
        (1, 104, 0)
    ]
    assert sql(out, "select count(*) from blocks where msgtype = 'cmpctblock'") == [(194,)]


def test_sql_command_answers_from_duckdb(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = exported(capsys, tmp_path)
    query = "select count(*) from messages where msgtype = 'ping'"
    status, stdout, _ = msgcap(capsys, "sql", str(out), query)
    assert status == 0
    assert stdout.splitlines()[-2].strip() == "4" and stdout.endswith("(1 row)\n")
    status, stdout, _ = msgcap(capsys, "sql", str(out), query, "--format", "csv")
    assert stdout == "count_star()\n4\n"
    q = "select node, count(*) as n, min(time) as first from messages group by node order by node"
    status, stdout, _ = msgcap(capsys, "sql", str(out), q, "--format", "json")
    rows = json.loads(stdout)
    assert [(r["node"], r["n"]) for r in rows] == [("a", 145), ("b", 145)]
    assert rows[0]["first"].startswith("2026-") and rows[0]["first"].endswith("+00:00")
    status, stdout, _ = msgcap(capsys, "sql", str(out), q, "--format", "jsonl")
    assert [json.loads(line)["n"] for line in stdout.splitlines()] == [145, 145]
    q = "select payload from messages where msgtype = 'ping' order by time limit 1"
    status, stdout, _ = msgcap(capsys, "sql", str(out), q, "--format", "csv")
    assert re.fullmatch(r"payload\n[0-9a-f]{16}\n", stdout)


def test_sql_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out = exported(capsys, tmp_path)
    status, _, err = msgcap(capsys, "sql", str(out), "select nonsense from messages")
    assert status == 2 and "nonsense" in err and err.count("\n") == 1
    status, _, err = msgcap(capsys, "sql", str(out), "selec 1")
    assert status == 2 and "syntax error" in err.lower()
    status, _, err = msgcap(capsys, "sql", str(tmp_path), "select 1")
    assert status == 2 and "not a msgcap dataset" in err
    status, _, err = msgcap(capsys, "sql", str(tmp_path / "nowhere"), "select 1")
    assert status == 2


def readme_questions() -> dict[str, str]:
    """The README's one-line questions (the same text is in the README)."""
    return {
        "per hour": (
            "select node, peer, msgtype, date_trunc('hour', time) as hour, count(*) as messages, "
            "sum(size) as bytes from messages group by all order by all"
        ),
        "propagation": (
            "select coalesce(t.txid, i.hash) as txid, i.node, i.peer, "
            "min(i.time) as first_announced from inv_items i "
            "left join (select distinct txid, wtxid from transactions) t "
            "on i.hash = t.wtxid where i.msgtype = 'inv' and i.direction = 'recv' "
            "and i.inv_type in ('MSG_TX', 'MSG_WTX', 'MSG_WITNESS_TX') group by all "
            "order by txid, first_announced"
        ),
        "slowest answers": (
            "select g.node, g.peer, g.inv_type, g.hash, g.time as asked, "
            "min(a.time - g.time) as wait "
            "from inv_items g join (select node, peer, time, txid as hash from transactions "
            "where direction = 'recv' union all select node, peer, time, wtxid from transactions "
            "where direction = 'recv' union all select node, peer, time, hash from blocks "
            "where direction = 'recv' and msgtype = 'block') a on a.node = g.node "
            "and a.peer = g.peer and a.hash = g.hash and a.time >= g.time "
            "where g.msgtype = 'getdata' and g.direction = 'sent' group by all "
            "order by wait desc limit 10"
        ),
    }


def test_readme_questions_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out = exported(capsys, tmp_path)
    q = readme_questions()
    per_hour = sql(out, q["per hour"])
    assert sum(r[4] for r in per_hour) == 290 and sum(r[5] for r in per_hour) == 60072
    propagation = sql(out, q["propagation"])
    # a announced its three payments to b (b has them: txids), b its payment back to a
    # (a did not fetch it while capturing: its wtxid stands in).
    assert Counter(r[1] for r in propagation) == {"b": 3, "a": 1}
    txids = {r[0] for r in sql(out, "select txid from transactions")}
    assert {r[0] for r in propagation if r[1] == "b"} == txids
    answers = sql(out, q["slowest answers"])
    # b asked a for 5 blocks and 3 transactions, a asked b for 2 blocks: all answered.
    assert Counter((r[0], r[2]) for r in answers) == {
        ("b", "MSG_WITNESS_BLOCK"): 5,
        ("b", "MSG_WTX"): 3,
        ("a", "MSG_WITNESS_BLOCK"): 2,
    }
    waits = [r[5].total_seconds() for r in answers]
    assert waits == sorted(waits, reverse=True) and 0 < waits[-1] < waits[0] < 1


def test_readme_sql_examples_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every ``msgcap sql OUT "..."`` line of the README runs on the Core pair."""
    lines = re.findall(r'^msgcap sql OUT "(.+)"', (ROOT / "README.md").read_text(), re.M)
    if not lines:
        pytest.skip("the README has no msgcap sql examples yet")
    out = tmp_path / "OUT"
    export(capsys, out, pair_tree(tmp_path))
    for query in lines:
        status, stdout, err = msgcap(capsys, "sql", str(out), query)
        assert status == 0, (query, err)
        assert re.search(r"\(\d+ rows?\)\n$", stdout)


# --- incremental -----------------------------------------------------------------------------


def test_second_export_adds_exactly_the_records_appended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = exported(capsys, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    recv = root / PAIR_A.relative_to(PAIR) / "msgs_recv.dat"
    last = list(read_records(open(recv, "rb")))[-1]
    assert not hasattr(last, "reason")
    added = pings(5, t0=last.time + 10)  # type: ignore[union-attr]
    added.append((last.time + 100_000, "inv", Inv((Inventory(5, b"\x11" * 32),)).encode()))  # type: ignore[union-attr]
    write(recv, added)
    write(root / "a" / "10.0.0.9_8333" / "msgs_sent.dat", pings(3))  # a new peer
    status, err = export(capsys, out, root)
    assert status == 0, err
    expected = file_records(root)
    assert len(expected) == 290 + 6 + 3
    assert Counter(sql(out, MESSAGE_ROWS)) == Counter(expected)
    assert sql(out, "select count(*) from inv_items where hash = '" + "11" * 32 + "'") == [(1,)]
    # Earlier files are untouched; the new run wrote new files.
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert len(list(out.rglob("*.parquet"))) > len(before)
    # Nothing new: nothing added.
    status, err = export(capsys, out, root)
    assert sql(out, "select count(*) from messages") == [(299,)]
    manifest = json.loads((out / dataset.MANIFEST_NAME).read_text())
    assert manifest["schema_version"] == dataset.SCHEMA_VERSION
    assert manifest["last_run"]["rows"]["messages"] == 0
    state = manifest["files"][str(recv.resolve())]
    assert state["offset"] == recv.stat().st_size and state["records"] == 28


def test_truncated_and_replaced_files_are_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cap"
    a = root / "203.0.113.1_8333" / "msgs_recv.dat"
    b = root / "203.0.113.2_8333" / "msgs_recv.dat"
    write(a, pings(10))
    write(b, pings(10, t0=T0 + 7))
    out = tmp_path / "ds"
    export(capsys, out, root)
    # a: cut to 4 records (and a half), then two more appended; b: rewritten.
    rec = len(encode_record(0, "ping", b"\0" * 8))
    with open(a, "r+b") as f:
        f.truncate(4 * rec + 10)
    with open(a, "r+b") as f:
        f.truncate(4 * rec)
    write(a, pings(2, t0=T0 + 10**9))
    write(b, pings(3, t0=T0 + 2 * 10**9), mode="wb")
    status, err = export(capsys, out, root)
    assert status == 0
    assert f"{a}: truncated since the last export" in err
    assert f"{b}: replaced since the last export" in err
    # a: the 10 records exported before stay, the 2 new ones are added; b: 10 + 3.
    counts = sql(out, "select peer, count(*) from messages group by peer order by peer")
    assert counts == [("203.0.113.1_8333", 12), ("203.0.113.2_8333", 13)]


def test_record_still_being_written_is_left_for_the_next_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cap" / "203.0.113.1_8333" / "msgs_sent.dat"
    write(path, pings(3))
    whole = encode_record(T0 + 10**6, "ping", Ping(99).encode())
    with open(path, "ab") as f:
        f.write(whole[:30])  # header and 6 of 8 payload bytes
    out = tmp_path / "ds"
    status, err = export(capsys, out, path.parent.parent)
    assert status == 0 and "not exported; the next export retries" in err
    assert sql(out, "select count(*) from messages") == [(3,)]
    with open(path, "ab") as f:
        f.write(whole[30:])
    status, err = export(capsys, out, path.parent.parent)
    assert status == 0 and err == ""
    assert sql(out, "select count(*), max(epoch_us(time)) from messages") == [(4, T0 + 10**6)]


def test_damage_is_reported_with_file_and_offset_and_the_rest_exported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cap" / "203.0.113.1_8333" / "msgs_recv.dat"
    write(path, pings(3))
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(struct.pack("<Q12sI", T0, b"ping", 0xFFFFFFF0) + b"garbage")
    bad_inv = (T0 + 5, "inv", b"\x02" + b"\x01\0\0\0" + b"\x22" * 32)  # says 2, holds 1
    other = tmp_path / "cap" / "203.0.113.2_8333" / "msgs_recv.dat"
    write(other, [bad_inv, bad_inv, (T0 + 9, "getdata", GetData(()).encode())])
    out = tmp_path / "ds"
    status, err = export(capsys, out, tmp_path / "cap")
    assert status == 1
    assert f"{path}: offset {size}: implausible payload length" in err
    assert err.count(f"{other}: offset 0:") == 1  # the first undecodable inv, once
    assert "2 undecodable payload(s) left out of inv_items" in err
    assert sql(out, "select count(*) from messages") == [(6,)]
    assert sql(out, "select count(*) from inv_items") == [(0,)]


# --- options, layouts and partitions -------------------------------------------------------


def test_node_labels_layouts_and_partitions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "lab"
    session = root / "203.0.113.1_8333" / "20261125T100000.000000Z_7"
    write(session / "msgs_recv.dat", pings(2))
    day = 86_400 * 10**6
    write(root / "203.0.113.2_8333" / "msgs_sent.dat", pings(3, step=day))  # three days
    out = tmp_path / "ds"
    export(capsys, out, root)
    rows = sql(
        out,
        "select node, peer, connection, count(*) from messages group by all order by all",
    )
    assert rows == [
        ("lab", "203.0.113.1_8333", "20261125T100000.000000Z_7", 2),
        ("lab", "203.0.113.2_8333", None, 3),
    ]
    dates = {p.parent.name for p in (out / "messages").rglob("*.parquet")}
    assert dates == {"date=2026-11-18", "date=2026-11-19", "date=2026-11-20"}
    # The partition columns prune: DuckDB reads one file for one day.
    plan = str(
        dataset.connect(out)
        .execute("explain select count(*) from messages where date = '2026-11-19'")
        .fetchall()
    )
    assert "ScanningFiles:1/3" in plan.replace(" ", "")
    # The files hold the documented schema, with its version.
    f = next((out / "messages").rglob("*.parquet"))
    schema = pq.read_schema(f)
    assert schema.names == [c.name for c in dataset.MESSAGES.columns]
    assert schema.metadata[b"msgcap.schema_version"] == str(dataset.SCHEMA_VERSION).encode()
    assert str(schema.field("time").type) == "timestamp[us, tz=UTC]"

    # --node overrides; the same file under another label is refused, with the reason.
    out2 = tmp_path / "ds2"
    status, _, _ = msgcap(capsys, "export", "--parquet", str(out2), "--node", "lab/1 x",
                               str(root))  # fmt: skip
    assert status == 0
    assert sql(out2, "select distinct node from messages") == [("lab/1 x",)]
    status, _, err = msgcap(capsys, "export", "--parquet", str(out2), str(root))
    assert status == 2 and "as node 'lab/1 x' before" in err


def test_node_folders_under_a_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "capture"
    write(root / "n1" / "203.0.113.1_8333" / "msgs_recv.dat", pings(2))
    write(root / "n2" / "203.0.113.1_8333" / "msgs_recv.dat", pings(1))
    out = tmp_path / "ds"
    export(capsys, out, root)
    assert sql(out, "select node, count(*) from messages group by 1 order by 1") == [
        ("n1", 2),
        ("n2", 1),
    ]
    # A peer folder given alone belongs to the folder above it.
    out2 = tmp_path / "ds2"
    export(capsys, out2, root / "n2" / "203.0.113.1_8333")
    assert sql(out2, "select node from messages") == [("n2",)]


def test_no_payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ds"
    root = pair_tree(tmp_path)
    status, _, _ = msgcap(capsys, "export", "--parquet", str(out), "--no-payload", str(root))
    assert status == 0
    f = next((out / "messages").rglob("*.parquet"))
    assert "payload" not in pq.read_schema(f).names
    assert sql(out, "select count(*), count(payload), sum(size) from messages") == [(290, 0, 60072)]
    assert sql(out, "select count(*) from inv_items") == [(32,)]
    status, _, err = msgcap(capsys, "export", "--parquet", str(out), str(root))
    assert status == 2 and "--no-payload" in err


def test_times_outside_the_calendar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cap" / "203.0.113.1_8333" / "msgs_recv.dat"
    write(path, [(0, "ping", b"\0" * 8), (2**64 - 1, "ping", b"\1" * 8)])
    out = tmp_path / "ds"
    status, err = export(capsys, out, path)
    assert status == 0, err
    assert sql(out, "select epoch_us(time), date from messages order by file_offset") == [
        (0, datetime.date(1970, 1, 1)),
        (None, None),
    ]


def test_bounded_buffers_many_partitions_and_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small row groups, few open files and a small budget: every row still once."""
    monkeypatch.setattr(dataset.writing, "ROW_GROUP_ROWS", 7)
    monkeypatch.setattr(dataset.writing, "ROW_GROUP_BYTES", 500)
    monkeypatch.setattr(dataset.writing, "MEMORY_BUDGET", 3000)
    monkeypatch.setattr(dataset.writing, "MAX_OPEN_FILES", 2)
    root = tmp_path / "cap"
    hour = 3600 * 10**6
    for i in range(3):
        records = []
        for j in range(60):  # two and a half days, inv and ping mixed
            t = T0 + j * hour + i
            records.append((t, "ping", Ping(j).encode()))
            inv = tuple(Inventory(1, bytes([i, j]) * 16) for _ in range(j % 4))
            records.append((t + 1, "inv", Inv(inv).encode()))
        write(root / f"203.0.113.{i}_8333" / "msgs_recv.dat", records)
    out = tmp_path / "ds"
    export(capsys, out, root)
    assert Counter(sql(out, MESSAGE_ROWS)) == Counter(file_records(root))
    assert sql(out, "select count(*) from inv_items") == [(3 * sum(j % 4 for j in range(60)),)]
    groups = [pq.ParquetFile(p).num_row_groups for p in (out / "messages").rglob("*.parquet")]
    assert len(groups) > 6 and max(groups) >= 2


def test_interrupted_run_is_cleaned_up_and_one_export_at_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = pair_tree(tmp_path)
    out = tmp_path / "ds"

    def boom(*args: Any) -> None:
        raise KeyboardInterrupt

    # Dies while writing: nothing of the run stays, and the next run exports everything.
    original = dataset.DatasetWriter.commit
    monkeypatch.setattr(dataset.DatasetWriter, "commit", boom)
    with pytest.raises(KeyboardInterrupt):
        dataset.export_parquet([root], out)
    assert not list(out.rglob("*.parquet")) and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(dataset.DatasetWriter, "commit", original)
    # Killed after renaming its files, before recording the run: the next run removes them.
    manifest = dataset.read_manifest(out)
    assert manifest is not None
    manifest.pending_run = "19700101T000000Z-dead00"
    dataset.write_manifest(out, manifest)
    stale = (
        out / "messages" / "node=a" / "date=2026-11-25" / "part-19700101T000000Z-dead00-0.parquet"
    )
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"PAR1")
    status, err = export(capsys, out, root)
    assert status == 0 and "removed the files of an interrupted export" in err
    assert not stale.exists()
    assert sql(out, "select count(*) from messages") == [(290,)]
    # Another export holds the lock: this one says so and exits 1.
    with open(out / dataset.LOCK_NAME, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        status, _, err = msgcap(capsys, "export", "--parquet", str(out), str(root))
    assert status == 1 and "another export is writing" in err


def test_refuses_a_folder_that_is_not_its_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = pair_tree(tmp_path)
    out = tmp_path / "ds"
    (out / "messages").mkdir(parents=True)
    status, _, err = msgcap(capsys, "export", "--parquet", str(out), str(root))
    assert status == 2 and "no _msgcap_manifest.json" in err
    (out / dataset.MANIFEST_NAME).write_text(
        json.dumps({"format": dataset.FORMAT_NAME, "schema_version": 999})
    )
    status, _, err = msgcap(capsys, "export", "--parquet", str(out), str(root))
    assert status == 2 and "schema version 999" in err
    status, _, err = msgcap(capsys, "export", "--parquet", str(out), str(tmp_path / "nothing"))
    assert status == 2


def test_empty_tables_are_queryable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cap" / "203.0.113.1_8333" / "msgs_recv.dat"
    write(path, pings(2))
    out = tmp_path / "ds"
    export(capsys, out, path)
    for table in dataset.TABLES:
        names = [
            d[0] for d in dataset.connect(out).execute(f"select * from {table.name}").description
        ]
        assert names == ["node", "date", *table.column_names()]
    assert sql(out, "select count(*) from blocks") == [(0,)]


def test_table_output_aligns_numbers_and_cuts_long_cells() -> None:
    con = duckdb.connect()
    cursor = con.execute(
        "select * from (values ('x', 1, null, repeat('ab', 100)), ('yy', 22, 3.5, 'z')) "
        "t(name, n, f, long)"
    )
    buf = io.StringIO()
    assert dataset.print_result(cursor, "table", buf) == 2
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["name", "n", "f", "long"]
    assert lines[2].startswith("x      1  NULL  abab") and lines[2].endswith("…")
    assert lines[3].startswith("yy    22   3.5  z")
    assert lines[-1] == "(2 rows)"


def test_cli_is_wired() -> None:
    """``msgcap export --parquet`` and ``msgcap sql`` are commands of the msgcap CLI."""
    from msgcap import cli

    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    if "sql" not in sub.choices:
        pytest.skip("msgcap/cli.py does not wire the dataset commands yet")
    args = top.parse_args(["export", "--parquet", "OUT", "x"])
    assert args.parquet == "OUT" and args.node is None and not args.no_payload


# --- the bulk decoders against the typed classes ---------------------------------------


def _reference_tx_row(payload: bytes) -> tuple[str, str, int, int, int]:
    tx = decode_message("tx", payload).tx  # type: ignore[union-attr]
    base = tx.encode(with_witness=False)
    weight = 3 * len(base) + len(payload)
    return (
        display_hash(tx.txid),
        display_hash(tx.wtxid),
        (weight + 3) // 4,
        len(tx.inputs),
        len(tx.outputs),
    )


@st.composite
def tx_payloads(draw: st.DrawFn) -> bytes:
    n_in = draw(st.integers(0, 3))
    segwit = draw(st.booleans()) and n_in > 0
    inputs = tuple(
        TxIn(OutPoint(draw(st.binary(min_size=32, max_size=32)), draw(st.integers(0, 2**32 - 1))),
             draw(st.binary(max_size=300)), draw(st.integers(0, 2**32 - 1)))
        for _ in range(n_in)
    )  # fmt: skip
    outputs = tuple(
        TxOut(draw(st.integers(-(2**63), 2**63 - 1)), draw(st.binary(max_size=40)))
        for _ in range(draw(st.integers(0, 3)))
    )
    witnesses = (
        tuple(tuple(draw(st.lists(st.binary(max_size=80), max_size=3))) for _ in inputs)
        if segwit
        else ()
    )
    tx = Transaction(draw(st.integers(0, 2**32 - 1)), inputs, outputs if n_in else (),
                     witnesses, draw(st.integers(0, 2**32 - 1)), 1 if segwit else 0)  # fmt: skip
    payload = tx.encode()
    cut = draw(st.integers(0, len(payload)))
    return draw(
        st.sampled_from(
            [
                payload,
                payload[:cut],
                payload + b"\0",
                payload[:cut] + bytes([draw(st.integers(0, 255))]) + payload[cut + 1 :],
            ]
        )
    )


@settings(max_examples=400, deadline=None)
@given(st.one_of(tx_payloads(), st.binary(max_size=200)))
def test_tx_row_agrees_with_the_typed_transaction(payload: bytes) -> None:
    try:
        expected = _reference_tx_row(payload)
    except DecodeError:
        with pytest.raises(DecodeError):
            dataset.tx_row(payload)
        return
    assert dataset.tx_row(payload) == expected


def test_tx_row_on_real_transactions() -> None:
    payloads = [r[6] for r in file_records(PAIR) if r[4] == "tx"]
    assert len(payloads) == 6
    for payload in payloads:
        assert dataset.tx_row(payload) == _reference_tx_row(payload)
        assert dataset.tx_row(payload)[0] != dataset.tx_row(payload)[1]  # segwit


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(dataset.INV_MESSAGES)),
    st.one_of(
        st.lists(
            st.tuples(st.integers(0, 2**32 - 1), st.binary(min_size=32, max_size=32)), max_size=5
        ).map(lambda xs: Inv(tuple(Inventory(t, h) for t, h in xs)).encode()),
        st.binary(max_size=120),
    ),
    st.integers(0, 3),
)
def test_inv_entries_agree_with_the_typed_messages(msgtype: str, payload: bytes, cut: int) -> None:
    payload = payload[: len(payload) - cut] if cut < 3 else payload + b"\0"
    try:
        msg: Any = decode_message(msgtype, payload)
    except DecodeError:
        with pytest.raises(DecodeError):
            dataset.inv_entries(msgtype, payload)
        return
    assert dataset.inv_entries(msgtype, payload) == [(i.type, i.hash) for i in msg.inv]


@pytest.mark.parametrize(
    ("script", "height"),
    [
        (b"\x51", 1),
        (b"\x60\x00", 16),
        (b"\x01\x11\x00", 17),
        (b"\x03\x20\xa1\x07", 500_000),
        (b"\x03\x5f\x2d\x0d/pool/", 863_583),
        (b"\x01\x80", None),  # negative
        (b"\x00", None),
        (b"", None),
        (b"\x4c\x01\x11", None),  # not a minimal push
    ],
)
def test_bip34_height(script: bytes, height: int | None) -> None:
    header = BlockHeader(0x20000000, b"\0" * 32, b"\0" * 32, 0, 0, 0)
    coinbase = Transaction(2, (TxIn(OutPoint(b"\0" * 32, 0xFFFFFFFF), script, 0),), (), (), 0)
    assert dataset.bip34_height(header, coinbase) == height
    old = BlockHeader(1, b"\0" * 32, b"\0" * 32, 0, 0, 0)
    assert dataset.bip34_height(old, coinbase) is None


def test_inv_items_rows_are_the_entries_in_bulk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """inv_items is built from the entries in bulk (per partition, not per entry): its
    rows are still each entry's, in order, whatever the type (unknown ones as 0x%08x),
    across messages, partitions (a time past 9999 is the null partition) and files."""
    rng = random.Random(11)
    types = [1, 2, 5, 7, 0x40000001, 0x40000007, 0xFFFFFFFF]
    records: list[tuple[int, str, bytes]] = []
    for i in range(40):
        entries = tuple(
            Inventory(rng.choice(types), rng.randbytes(32)) for _ in range(rng.randrange(6))
        )
        t = T0 + i * 3_600_000_000 * 7 if i % 9 else 2**63 + i
        kind = rng.choice([Inv, GetData])
        records.append((t, kind.msgtype, kind(entries).encode()))
    records.append((T0, "inv", b"\x05\x00"))  # undecodable: counted, not in inv_items
    folder = tmp_path / "root" / "203.0.113.5_8333"
    write(folder / "msgs_recv.dat", records[::2])
    write(folder / "msgs_sent.dat", records[1::2])
    out = tmp_path / "out"
    status, _ = export(capsys, out, folder)
    assert status == 1  # the undecodable inv
    expected = []
    for path in sorted(folder.glob("*.dat")):
        with open(path, "rb") as f:
            for rec in read_records(f):
                assert not hasattr(rec, "reason"), rec
                try:
                    entries = dataset.inv_entries(rec.msgtype.label, rec.payload)
                except DecodeError:
                    continue
                for i, (t, h) in enumerate(entries):
                    expected.append(
                        (Direction.of_file(path).value, rec.msgtype.label, rec.offset, i,
                         InvType.name_of(t), t, display_hash(h))
                    )  # fmt: skip
    got = sql(
        out,
        'select direction, msgtype, file_offset, "index", inv_type, inv_type_id, hash '
        "from inv_items",
    )
    assert sorted(got) == sorted(expected)
    assert {r[4] for r in got} >= {"0x00000007", "0x40000007", "0xffffffff", "MSG_WTX"}
