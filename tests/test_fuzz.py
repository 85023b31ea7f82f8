"""Bounded coverage-guided fuzzing runs (atheris) of the frame decoder, the capture reader,
every message decoder, the JSON renderer and SOCKS host name checks.

Each target runs for MSGCAP_FUZZ_SECONDS (default 8) in its own process; a crash fails
the test with libFuzzer's report. The hypothesis property tests in the other files cover
the same code on every run without atheris.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "fuzz_atheris.py"
SECONDS = int(os.environ.get("MSGCAP_FUZZ_SECONDS", "8"))


@pytest.mark.parametrize("target", ["framing", "records", "messages", "render", "hostnames"])
def test_fuzz(tmp_path: Path, target: str) -> None:
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("MSGCAP_REQUIRE_ATHERIS"):
            pytest.fail("atheris is not installed")
        pytest.skip("atheris is not installed (pip install atheris)")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), target, f"-max_total_time={SECONDS}", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=SECONDS + 120, check=False,
    )  # fmt: skip
    tail = res.stderr[-3000:]
    assert res.returncode == 0, tail
    assert "Done" in tail, tail
    runs = [line for line in tail.splitlines() if line.startswith("Done")]
    print(f"{target}: {runs[-1] if runs else tail[-200:]}")
