"""msgcap installs as one package and does not shadow anybody's ``capture``, ``parser`` or
``proxy`` modules, while its pytest plugin loads everywhere it is installed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("msgcap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"msgcap"}
    for module in ("msgcap/cli.py", "msgcap/capture/framing.py", "msgcap/parser/messages.py",
                   "msgcap/proxy/server.py", "msgcap/py.typed"):  # fmt: skip
        assert module in names
    # Every module of the three folders, subpackages included, once, under msgcap/.
    source = {
        f"msgcap/{p.relative_to(ROOT).as_posix()}"
        for folder in ("capture", "parser", "proxy")
        for p in (ROOT / folder).rglob("*.py")
    }
    assert source <= set(names), sorted(source - set(names))
    assert len(names) == len(set(names))
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "msgcap = msgcap.cli:main" in text and "msgcap = msgcap.pytest_plugin" in text


def test_unrelated_project_with_its_own_capture_parser_proxy(tmp_path: Path) -> None:
    """The report of issue 9: a project with its own capture.py runs its tests with msgcap
    installed, and msgcap's plugin is loaded there."""
    for name in ("capture", "parser", "proxy"):
        (tmp_path / f"{name}.py").write_text(f"def grab() -> str:\n    return {name!r}\n")
    (tmp_path / "test_own.py").write_text(
        "from capture import grab\n"
        "from parser import grab as parse\n"
        "from proxy import grab as relay\n\n\n"
        "def test_own(msgcap_capture):\n"
        "    assert (grab(), parse(), relay()) == ('capture', 'parser', 'proxy')\n"
        "    assert callable(msgcap_capture)  # msgcap's plugin gave its fixture\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_own.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "1 passed" in res.stdout


def test_module_and_script_entry_points() -> None:
    for cmd in ([sys.executable, "-m", "msgcap", "--help"],
                [str(Path(sys.executable).parent / "msgcap"), "--help"]):  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0 and "proxy" in res.stdout, res.stderr


def test_the_pytest_plugin_imports_nothing_heavy() -> None:
    """pytest loads msgcap's plugin in every project where msgcap is installed: importing
    it loads no msgcap layer and no cryptography until a test uses a fixture. Prints what
    it costs against importing pytest itself (``-X importtime``, cumulative)."""
    code = (
        "import sys, pytest; before = set(sys.modules); import msgcap.pytest_plugin; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    added = res.stdout.split()
    heavy = [m for m in added if m.split(".")[0] in ("coincurve", "cryptography", "orjson")
             or m.startswith(("msgcap.capture", "msgcap.parser", "msgcap.proxy"))]  # fmt: skip
    assert "msgcap.pytest_plugin" in added and not heavy, heavy

    def cumulative_us(module: str) -> int:
        out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                             capture_output=True, text=True).stderr  # fmt: skip
        rows = [line.split("|") for line in out.splitlines() if line.startswith("import time:")]
        return next(int(r[1]) for r in rows if r[2].strip() == module)

    pytest_us = min(cumulative_us("pytest") for _ in range(3))
    plugin_us = min(cumulative_us("msgcap.pytest_plugin") for _ in range(3))
    print(f"\nimport pytest: {pytest_us} us; msgcap.pytest_plugin on top of it: "
          f"{plugin_us - pytest_us} us ({(plugin_us - pytest_us) / pytest_us:.2f}x)")  # fmt: skip
