"""``msgcap export --parquet`` against ``msgcap parse --jsonl``, and DuckDB over the result.

Generates a capture (bench/gen_capture.py; 1 GB by default), then times, each in a fresh
process, with its peak RSS:

- ``msgcap parse --jsonl`` on it (the baseline);
- ``msgcap export --parquet`` on the same input into a new dataset;
- the same export again (nothing new: the incremental no-op), then after appending about
  1% more records (only those are added);
- ``msgcap sql`` with a group-by over the dataset (messages and bytes per peer, type and
  hour), and one that reads every payload.

    python bench/dataset_bench.py              # 1 GB
    python bench/dataset_bench.py --mb 200 --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
argv = json.loads(sys.argv[1])
t = time.perf_counter()
from msgcap.cli import main
status = main(argv)
assert status == 0, status
seconds = time.perf_counter() - t
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime,
                  "peak_rss": usage.ru_maxrss * 1024}}), file=sys.stderr)
"""


def measure(*argv: str) -> dict[str, float]:
    """Run one msgcap command in a fresh process (after writing back what earlier runs
    left in the page cache): its seconds, CPU seconds and peak RSS."""
    os.sync()
    code = CHILD.format(root=str(ROOT))
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(list(argv))],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"msgcap {' '.join(argv)} failed:\n{res.stderr[-3000:]}")
    result: dict[str, float] = json.loads(res.stderr.strip().splitlines()[-1])
    result["wall"] = wall
    result["stdout"] = res.stdout  # type: ignore[assignment]
    return result


def append_more(folder: Path, work: Path, megabytes: float) -> int:
    """Append the records of a small generated capture to the big one (later times)."""
    from bench.gen_capture import generate
    from msgcap.capture.records import Damage, encode_record, read_record_headers, read_records

    small = generate(work / "more", megabytes, seed=3)
    last = 0
    for name in ("msgs_recv.dat", "msgs_sent.dat"):
        with open(folder / name, "rb") as f:
            for entry in read_record_headers(f):
                if not isinstance(entry, Damage):
                    last = max(last, entry[1])
    added = 0
    for name in ("msgs_recv.dat", "msgs_sent.dat"):
        with open(small / name, "rb") as src, open(folder / name, "ab") as dst:
            for rec in read_records(src):
                if not isinstance(rec, Damage):
                    t = last + rec.time - 1_795_000_000_000_000
                    dst.write(encode_record(t, rec.msgtype, rec.payload))
                    added += 1
    shutil.rmtree(small.parent)
    return added


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=float, default=1000, help="size of the capture (default 1 GB)")
    ap.add_argument("--workdir", type=Path, help="keep inputs here (reused when present)")
    ap.add_argument("--rss-limit-mb", type=float, default=256, help="the goal for peak RSS")
    ap.add_argument("--repeat", type=int, default=3, help="runs of parse and export (medians)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.gen_capture import generate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="msgcap-dataset-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "capture" / "203.0.113.7_8333"
    t = time.perf_counter()
    if not (folder / "msgs_recv.dat").exists():
        generate(work / "capture", args.mb, seed=1)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"input: {size / 1e6:.1f} MB in {folder} (ready in {time.perf_counter() - t:.1f}s)")

    out = work / "dataset"
    shutil.rmtree(out, ignore_errors=True)
    jsonl = work / "out.jsonl"
    rows: dict[str, dict[str, float]] = {}
    runs: dict[str, list[dict[str, float]]] = {"parse": [], "export": []}
    for _ in range(args.repeat):  # interleaved, so that both see the same machine
        runs["parse"].append(measure("parse", "--jsonl", str(folder), "-o", str(jsonl)))
        jsonl.unlink()
        shutil.rmtree(out, ignore_errors=True)
        runs["export"].append(measure("export", "--parquet", str(out), str(folder)))
    for kind, name in (("parse", "msgcap parse --jsonl"), ("export", "msgcap export --parquet")):
        rows[name] = {
            k: statistics.median(r[k] for r in runs[kind]) for k in ("seconds", "cpu", "wall")
        }
        rows[name]["peak_rss"] = max(r["peak_rss"] for r in runs[kind])
        rows[name]["all"] = [r["seconds"] for r in runs[kind]]  # type: ignore[assignment]
    rows["export again (nothing new)"] = measure("export", "--parquet", str(out), str(folder))
    sizes = {f: f.stat().st_size for f in folder.iterdir()}
    try:
        added = append_more(folder, work, args.mb / 100)
        rows[f"export again (+{added:,} records)"] = measure(
            "export", "--parquet", str(out), str(folder)
        )
    finally:  # the input stays as generated, for the next run
        for f, n in sizes.items():
            os.truncate(f, n)
    group_by = (
        "select peer, msgtype, date_trunc('hour', time) as hour, count(*) as messages, "
        "sum(size) as bytes from messages group by all order by bytes desc"
    )
    rows["msgcap sql: group-by per peer/type/hour"] = measure("sql", str(out), group_by)
    payloads = "select msgtype, sum(octet_length(payload)) from messages group by all"
    rows["msgcap sql: group-by reading every payload"] = measure("sql", str(out), payloads)

    dataset_mb = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 1e6
    print(f"dataset: {dataset_mb:.1f} MB of Parquet in {out}")
    print(f"{'run':45} {'seconds':>8} {'CPU s':>7} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, r in rows.items():
        full = name in ("msgcap parse --jsonl", "msgcap export --parquet")
        rate = f"{size / 1e6 / r['seconds']:8.1f}" if full else f"{'':8}"
        print(
            f"{name:45} {r['seconds']:8.2f} {r['cpu']:7.2f} {rate} {r['peak_rss'] / 1e6:12.1f}"
            + (f"  (runs: {', '.join(f'{x:.2f}' for x in r['all'])})" if full else "")  # type: ignore[attr-defined]
        )
    parse, export = rows["msgcap parse --jsonl"], rows["msgcap export --parquet"]
    speed = parse["seconds"] / export["seconds"]
    peak = export["peak_rss"] / 1e6
    print(
        f"export --parquet / parse --jsonl speed (medians): {speed:.2f}x (goal: at least 1.0x) "
        f"— {'met' if speed >= 1 else 'NOT met'}; CPU time: "
        f"{parse['cpu'] / export['cpu']:.2f}x"
    )
    print(
        f"export --parquet peak RSS on {size / 1e9:.2f} GB: {peak:.0f} MB "
        f"(goal: at most {args.rss_limit_mb:.0f} MB) — "
        f"{'met' if peak <= args.rss_limit_mb else 'NOT met'}"
    )
    for name, r in rows.items():
        if "sql" in name:
            print(f"DuckDB {name[12:]}: {r['seconds']:.2f}s in the process ({r['wall']:.2f}s wall)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
