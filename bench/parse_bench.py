"""msgcap parse against Core's message-capture-parser.py loop, in the same run.

Two generated captures (bench/gen_capture.py): a block-heavy one (a node syncing and
relaying; ``--mb``) and a message-heavy one (Core's own small records from
tests/data/core-v30-pair repeated; ``--messages-mb``). On each it times, each in a fresh
process, with its peak RSS:

- baseline: Core's parser loop on Core's test framework classes (tests/core_reference.py,
  verystable), writing its JSON array (once: it is slow);
- ``msgcap parse`` (JSON array) and ``msgcap parse --jsonl`` (``--rounds`` times each,
  the median is reported: the machines this runs on are noisy);

and ``msgcap parse --jsonl`` on a block-heavy input 10 times smaller, to show memory
stays flat. It prints the ratios to the baseline (the goal is 20x on both captures).

    python bench/parse_bench.py --mb 200 --messages-mb 40
"""

from __future__ import annotations

import argparse
import json
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
kind, folder, out = sys.argv[1:4]
t = time.perf_counter()
if kind == "baseline":
    from tests.core_reference import parse_files
    files = [f"{{folder}}/msgs_recv.dat", f"{{folder}}/msgs_sent.dat"]
    with open(out, "w") as f:
        f.write(parse_files(files))
else:
    from msgcap.cli import main
    extra = ["--jsonl"] if kind == "jsonl" else []
    status = main(["parse", *extra, folder, "-o", out])
    assert status == 0, status
seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"seconds": seconds, "peak_rss": rss}}))
"""

Result = dict[str, float]


def measure(kind: str, folder: Path, out: Path) -> Result:
    code = CHILD.format(root=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", code, kind, str(folder), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: Result = json.loads(res.stdout.strip().splitlines()[-1])
    result["output_bytes"] = out.stat().st_size
    out.unlink()
    return result


def median_of(rounds: int, kind: str, folder: Path, out: Path) -> Result:
    """The run with the median time of ``rounds``, with the fastest and slowest times."""
    runs = sorted((measure(kind, folder, out) for _ in range(rounds)), key=lambda r: r["seconds"])
    result = dict(runs[len(runs) // 2])
    result["seconds"] = statistics.median(r["seconds"] for r in runs)
    result["fastest"], result["slowest"] = runs[0]["seconds"], runs[-1]["seconds"]
    return result


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--mb", type=float, default=200, help="size of the block-heavy capture (0: none)"
    )
    ap.add_argument(
        "--messages-mb", type=float, default=40, help="size of the message-heavy capture (0: none)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="runs of each msgcap measurement")
    ap.add_argument("--workdir", type=Path, help="where to put inputs (default: a temp dir)")
    ap.add_argument("--skip-baseline", action="store_true", help="only time msgcap")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.gen_capture import generate, generate_messages
    from msgcap.parser.fastjson import NATIVE

    work = args.workdir or Path(tempfile.mkdtemp(prefix="msgcap-bench-"))
    t = time.perf_counter()
    captures = {}
    if args.mb:
        captures["block-heavy"] = generate(work / "blocks", args.mb, seed=1)
        small = generate(work / "blocks-small", args.mb / 10, seed=2)
    if args.messages_mb:
        captures["message-heavy"] = generate_messages(work / "messages", args.messages_mb)
    print(f"inputs generated in {time.perf_counter() - t:.1f}s; native renderer: {NATIVE}")
    out = work / "out.json"
    print(
        f"{'capture':27} {'run':28} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12} "
        f"{'x baseline':>10}"
    )
    ratios: list[str] = []
    for name, folder in captures.items():
        size = folder_size(folder)
        messages = _count_messages(folder)
        label = f"{name} {size / 1e6:.0f} MB"
        rows: dict[str, Result] = {}
        if not args.skip_baseline:
            rows["baseline (Core's loop)"] = measure("baseline", folder, out)
        rows["msgcap parse"] = median_of(args.rounds, "array", folder, out)
        rows["msgcap parse --jsonl"] = median_of(args.rounds, "jsonl", folder, out)
        base = rows.get("baseline (Core's loop)")
        for run, r in rows.items():
            ratio = f"{base['seconds'] / r['seconds']:9.1f}x" if base and r is not base else ""
            print(
                f"{label:27} {run:28} {r['seconds']:8.2f} {size / 1e6 / r['seconds']:7.1f} "
                f"{r['peak_rss'] / 1e6:12.1f} {ratio:>10}"
            )
            label = f"  ({messages:,} messages)" if run == next(iter(rows)) else ""
        if base:
            for run in ("msgcap parse", "msgcap parse --jsonl"):
                r = rows[run]
                ratios.append(
                    f"{name}, {run.removeprefix('msgcap parse').strip() or 'array'}: "
                    f"{base['seconds'] / r['seconds']:.1f}x (runs "
                    f"{base['seconds'] / r['slowest']:.1f}-{base['seconds'] / r['fastest']:.1f}x)"
                )
        if name == "block-heavy":
            flat = measure("jsonl", small, out)
            ratio = rows["msgcap parse --jsonl"]["peak_rss"] / flat["peak_rss"]
            print(
                f"{'':27} {'--jsonl, input / 10':28} {flat['seconds']:8.2f} "
                f"{folder_size(small) / 1e6 / flat['seconds']:7.1f} "
                f"{flat['peak_rss'] / 1e6:12.1f}"
            )
            print(f"{'':27} --jsonl peak RSS, 10x input / 1x input: {ratio:.2f} (flat is 1.0)")
    if ratios:
        print("speed-up over Core's loop (goal: 20x on both captures):")
        for line in ratios:
            print(f"  {line}")
    if not args.workdir:
        shutil.rmtree(work)


def _count_messages(folder: Path) -> int:
    from msgcap.capture.conversation import CaptureFile, merged_batches, warn_damage
    from msgcap.capture.records import RecordFilter

    files = [CaptureFile.at(f) for f in sorted(folder.glob("*.dat"))]
    return sum(
        n
        for batch in merged_batches(files, warn_damage)
        for counts in batch.tally(RecordFilter())
        for n, _ in counts.values()
    )


if __name__ == "__main__":
    main()
