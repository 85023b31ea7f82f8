"""Hostile data (issue "Hostile conditions"): capture files out of time order are merged in
memory and work proportional to their disorder, and a damaged or tampered Parquet manifest
never costs committed data."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgcap.capture import conversation, records
from msgcap.capture.conversation import CaptureFile, merged, merged_runs
from msgcap.capture.errors import MsgcapError
from msgcap.capture.records import Damage, encode_record

# --- class 8: one out-of-order record is cheap -------------------------------------------


@pytest.fixture(params=["native", "python"])
def walker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with the native record walker (when built) and with its Python twins."""
    if request.param == "python":
        monkeypatch.setattr(records, "scan", records.python_scan)
        monkeypatch.setattr(conversation, "scan", records.python_scan)
        monkeypatch.setattr(conversation, "_plan", conversation.python_plan)
        monkeypatch.setattr(conversation, "_tally", conversation.python_tally)
    elif not records.NATIVE:
        pytest.skip("the native walker is not built")
    yield request.param


def _write(path: Path, recs: list[tuple[int, bytes]], tail: bytes = b"") -> None:
    with open(path, "wb") as f:
        for t, payload in recs:
            f.write(encode_record(t, "ping", payload))
        f.write(tail)


def _expected(files: list[list[tuple[int, bytes]]]) -> list[tuple[int, int, int, bytes]]:
    """Core's order: a stable sort by time of the files' records, concatenated."""
    rows = []
    for k, recs in enumerate(files):
        offset = 0
        for t, payload in recs:
            rows.append((k, offset, t, payload))
            offset += 24 + len(payload)
    return sorted(rows, key=lambda r: r[2])


records_st = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 6), st.integers(0, 2**64 - 1)),
        st.binary(max_size=40),
    ),
    max_size=30,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    files=st.lists(records_st, min_size=1, max_size=3),
    tails=st.lists(
        st.sampled_from([b"", b"\x01" * 7, bytes(20) + b"\xff" * 4]), min_size=3, max_size=3
    ),
    chunk=st.sampled_from([1, 40, 100, 1 << 20]),
)
def test_disordered_files_merge_in_cores_stable_order(
    tmp_path_factory: pytest.TempPathFactory,
    walker: str,
    monkeypatch: pytest.MonkeyPatch,
    files: list[list[tuple[int, bytes]]],
    tails: list[bytes],
    chunk: int,
) -> None:
    monkeypatch.setattr(conversation, "RUN_CHUNK", chunk, raising=False)
    folder = tmp_path_factory.mktemp("disorder")
    sources = []
    for k, recs in enumerate(files):
        path = folder / f"{k}_msgs_recv.dat"
        _write(path, recs, tails[k])
        sources.append(CaptureFile.at(path))
    damaged: list[tuple[Path, int]] = []

    def on_damage(source: CaptureFile, d: Damage) -> None:
        damaged.append((source.path, d.offset))

    got = [
        (sources.index(it.source), it.record.offset, it.record.time, it.record.payload)
        for it in merged(sources, on_damage)
    ]
    assert got == _expected(files)
    want_damage = []
    for k, recs in enumerate(files):
        if tails[k]:
            want_damage.append((sources[k].path, sum(24 + len(p) for _, p in recs)))
    assert sorted(damaged) == sorted(want_damage)


N_LARGE = 200_000


def _large(path: Path, out_of_order: int | None, when: int) -> None:
    """N_LARGE empty ``ping`` records 1 µs apart; the one at ``out_of_order`` has ``when``."""
    header = struct.Struct("<Q12sI")
    raw = b"ping".ljust(12, b"\0")
    buf = bytearray(header.size * N_LARGE)
    for i in range(N_LARGE):
        t = when if i == out_of_order else 1_000_000 + i
        header.pack_into(buf, i * header.size, t, raw, 0)
    path.write_bytes(buf)


def _cost(path: Path) -> tuple[int, list[int]]:
    """tracemalloc peak while reading ``path`` as a conversation, and the records' times."""
    tracemalloc.start()
    try:
        n = 0
        for run in merged_runs([CaptureFile.at(path)], conversation.warn_damage):
            n += (run.end - run.start) // 24  # every record is 24 bytes: count, keep none
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    order = [
        r.time
        for r in (it.record for it in merged([CaptureFile.at(path)], conversation.warn_damage))
    ]
    assert len(order) == n
    return peak, order


@pytest.mark.parametrize("where,when", [(N_LARGE // 2, 0), (N_LARGE // 2, 2**63), (N_LARGE - 1, 5)])
def test_one_record_out_of_order_costs_about_what_an_ordered_file_costs(
    tmp_path: Path, walker: str, where: int, when: int
) -> None:
    ordered = tmp_path / "ordered_msgs_recv.dat"
    disordered = tmp_path / "disordered_msgs_recv.dat"
    _large(ordered, None, 0)
    _large(disordered, where, when)
    base_peak, base_order = _cost(ordered)
    peak, order = _cost(disordered)
    assert base_order == list(range(1_000_000, 1_000_000 + N_LARGE))
    expected = sorted(1_000_000 + i if i != where else when for i in range(N_LARGE))
    assert order == expected
    # counting memory, not the clock: the index of every record (before) took >10x
    assert peak < 2 * base_peak + (256 << 10), (peak, base_peak)


# --- class 10: a damaged manifest never destroys data --------------------------------------

T0 = 1_795_000_000_000_000


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks as their target) and its SHA-256."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file() and p.name != "_msgcap.lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run_export(capsys: pytest.CaptureFixture[str], out: Path, src: Path) -> tuple[int, str]:
    """``msgcap export --parquet`` as the command line runs it: (exit status, stderr)."""
    from msgcap.parser import dataset

    capsys.readouterr()
    try:
        dataset.export_parquet([src], out, report=dataset.Report(__import__("sys").stderr))
        status = 0
    except MsgcapError as e:
        assert "\n" not in str(e)
        print(f"msgcap: error: {e}", file=__import__("sys").stderr)
        status = e.exit_status
    return status, capsys.readouterr().err


@pytest.fixture
def exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    """A real dataset of two runs: (capture folder, dataset folder)."""
    pytest.importorskip("pyarrow")
    src = tmp_path / "cap" / "203.0.113.7_8333"
    src.mkdir(parents=True)
    (src / "msgs_recv.dat").write_bytes(
        b"".join(encode_record(T0 + i, "ping", struct.pack("<Q", i)) for i in range(50))
    )
    out = tmp_path / "ds"
    assert _run_export(capsys, out, src.parent)[0] == 0
    with open(src / "msgs_recv.dat", "ab") as f:
        f.write(encode_record(T0 + 100, "pong", struct.pack("<Q", 1)))
    assert _run_export(capsys, out, src.parent)[0] == 0
    assert len(list(out.rglob("part-*.parquet"))) == 2
    return src.parent, out


def _manifest(out: Path) -> dict[str, Any]:
    from msgcap.parser import dataset

    return dict(json.loads((out / dataset.MANIFEST_NAME).read_text()))


def _save(out: Path, m: Any) -> None:
    from msgcap.parser import dataset

    (out / dataset.MANIFEST_NAME).write_text(json.dumps(m))


def _committed_run(m: dict[str, Any]) -> str:
    return str(m["last_run"]["id"])


TAMPERINGS: list[tuple[str, Any]] = [
    ("pending_is_committed", lambda m: {**m, "pending_run": _committed_run(m)}),
    (
        "pending_is_committed_old_manifest",
        lambda m: {
            **{k: v for k, v in m.items() if k != "committed_runs"},
            "pending_run": _committed_run(m),
        },
    ),
    ("pending_path", lambda m: {**m, "pending_run": "../../etc"}),
    ("pending_absolute", lambda m: {**m, "pending_run": "/tmp/x"}),
    ("pending_empty", lambda m: {**m, "pending_run": ""}),
    ("pending_int", lambda m: {**m, "pending_run": 5}),
    ("files_list", lambda m: {**m, "files": []}),
    ("file_not_object", lambda m: {**m, "files": {k: 1 for k in m["files"]}}),
    (
        "offset_string",
        lambda m: {**m, "files": {k: {**v, "offset": "x"} for k, v in m["files"].items()}},
    ),
    (
        "offset_negative",
        lambda m: {**m, "files": {k: {**v, "offset": -5} for k, v in m["files"].items()}},
    ),
    (
        "offset_bool",
        lambda m: {**m, "files": {k: {**v, "offset": True} for k, v in m["files"].items()}},
    ),
    (
        "node_missing",
        lambda m: {
            **m,
            "files": {
                k: {kk: vv for kk, vv in v.items() if kk != "node"} for k, v in m["files"].items()
            },
        },
    ),
    (
        "relative_key",
        lambda m: {**m, "files": dict.fromkeys(["../x"], next(iter(m["files"].values())))},
    ),
    ("runs_string", lambda m: {**m, "runs": "many"}),
    ("payload_string", lambda m: {**m, "payload": "no"}),
    ("last_run_list", lambda m: {**m, "last_run": [1]}),
    ("committed_not_list", lambda m: {**m, "committed_runs": "x"}),
    ("committed_path", lambda m: {**m, "committed_runs": ["../x"]}),
    ("unknown_version", lambda m: {**m, "schema_version": 99}),
    ("foreign", lambda m: {"format": "something else", "files": {}}),
    ("not_an_object", lambda m: [m]),
    ("null", lambda m: None),
]


def _refused_untouched(capsys: pytest.CaptureFixture[str], out: Path, src: Path) -> None:
    """Exporting ``src`` into ``out`` fails with one error line and touches nothing."""
    before = _tree(out)
    status, err = _run_export(capsys, out, src)
    assert status != 0
    assert err.startswith("msgcap: error: ") and err.count("\n") == 1, err
    assert _tree(out) == before


@pytest.mark.parametrize("name,tamper", TAMPERINGS, ids=[t[0] for t in TAMPERINGS])
def test_a_damaged_manifest_is_one_error_and_nothing_is_touched(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str], name: str, tamper: Any
) -> None:
    src, out = exported
    _save(out, tamper(_manifest(out)))
    _refused_untouched(capsys, out, src)


def test_unparseable_manifest(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from msgcap.parser import dataset

    src, out = exported
    (out / dataset.MANIFEST_NAME).write_bytes(b'{"format": "msgcap parquet dataset", "fi')
    _refused_untouched(capsys, out, src)


def test_pending_run_rolls_back_only_its_own_parts(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = exported
    m = _manifest(out)
    committed = sorted(str(p.relative_to(out)) for p in out.rglob("part-*.parquet"))
    pending = "20261206T000000Z-abcdef"
    m["pending_run"] = pending
    _save(out, m)
    folder = out / "messages" / "node=203.0.113.7_8333" / "date=2026-11-18"
    folder.mkdir(parents=True, exist_ok=True)
    leftover = folder / f"part-{pending}-0.parquet"
    leftover.write_bytes(b"PAR1")
    # a symlinked table folder elsewhere, with a file of the pending run's name
    outside = out.parent / "outside"
    outside.mkdir()
    bait = outside / f"part-{pending}-1.parquet"
    bait.write_bytes(b"keep")
    (out / "messages" / "elsewhere").symlink_to(outside)
    status, err = _run_export(capsys, out, src)
    assert status == 0, err
    assert not leftover.exists()
    assert bait.read_bytes() == b"keep"
    after = sorted(
        str(p.relative_to(out)) for p in out.rglob("part-*.parquet") if "elsewhere" not in str(p)
    )
    assert set(committed) <= set(after)
    assert _manifest(out)["pending_run"] is None
