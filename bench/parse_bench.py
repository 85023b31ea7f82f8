"""msgcap parse against Core's message-capture-parser.py loop, in the same run.

Generates a capture with a realistic mix (bench/gen_capture.py), then times, each in a
fresh process, with its peak RSS:

- baseline: Core's parser loop on Core's test framework classes (tests/core_reference.py,
  verystable), writing its JSON array;
- ``msgcap parse`` (JSON array) and ``msgcap parse --jsonl`` on the same input;
- ``msgcap parse --jsonl`` on an input 10 times smaller, to show memory stays flat.

    python bench/parse_bench.py --mb 200
"""

from __future__ import annotations

import argparse
import json
import os
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


def measure(kind: str, folder: Path, out: Path) -> dict[str, float]:
    code = CHILD.format(root=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", code, kind, str(folder), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    result["output_bytes"] = out.stat().st_size
    out.unlink()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=float, default=200, help="size of the large capture")
    ap.add_argument("--workdir", type=Path, help="where to put inputs (default: a temp dir)")
    ap.add_argument("--skip-baseline", action="store_true", help="only time msgcap")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.gen_capture import generate
    from msgcap.parser.fastjson import NATIVE

    work = args.workdir or Path(tempfile.mkdtemp(prefix="msgcap-bench-"))
    t = time.perf_counter()
    big = generate(work / "big", args.mb, seed=1)
    small = generate(work / "small", args.mb / 10, seed=2)
    size_big = sum(f.stat().st_size for f in big.iterdir())
    size_small = sum(f.stat().st_size for f in small.iterdir())
    print(
        f"inputs: {size_big / 1e6:.1f} MB and {size_small / 1e6:.1f} MB "
        f"(generated in {time.perf_counter() - t:.1f}s); native renderer: {NATIVE}"
    )
    out = work / "out.json"
    rows = {}
    if not args.skip_baseline:
        rows["baseline (Core's loop, verystable)"] = measure("baseline", big, out)
    rows["msgcap parse"] = measure("array", big, out)
    rows["msgcap parse --jsonl"] = measure("jsonl", big, out)
    rows["msgcap parse --jsonl, input / 10"] = measure("jsonl", small, out)
    print(f"{'run':38} {'seconds':>9} {'MB/s':>8} {'peak RSS MB':>12}")
    for name, r in rows.items():
        size = size_small if "/ 10" in name else size_big
        print(
            f"{name:38} {r['seconds']:9.2f} {size / 1e6 / r['seconds']:8.1f} "
            f"{r['peak_rss'] / 1e6:12.1f}"
        )
    array, jsonl, jsonl_small = (
        rows["msgcap parse"],
        rows["msgcap parse --jsonl"],
        rows["msgcap parse --jsonl, input / 10"],
    )
    if not args.skip_baseline:
        base = rows["baseline (Core's loop, verystable)"]
        print(
            f"speed-up, array: {base['seconds'] / array['seconds']:.1f}x; "
            f"--jsonl: {base['seconds'] / jsonl['seconds']:.1f}x (goal: 20x)"
        )
        print(f"peak memory, baseline / msgcap array: {base['peak_rss'] / array['peak_rss']:.1f}x")
    print(
        f"--jsonl peak RSS, 10x input / 1x input: "
        f"{jsonl['peak_rss'] / jsonl_small['peak_rss']:.2f} (flat is 1.0)"
    )
    if not args.workdir:
        for folder in (big, small):
            for f in folder.iterdir():
                f.unlink()
        os.system(f"rm -rf {work}")


if __name__ == "__main__":
    main()
