"""Bad input never gives a traceback: every subcommand answers it with a non-zero exit
status and one line ``msgcap: error: ...`` (DESIGN §10: 2 for bad usage or config, 1
otherwise).

One parametrized test drives every subcommand with bad paths (missing, a folder where a
file is expected, unreadable, a file where a folder is expected), bad values (numbers,
HOST:PORT, ports out of range, network names, time ranges) and outputs that cannot be
written or fill up (``/dev/full``, a folder under ``/proc``, a read-only ``/sys`` path).
Most cases run ``main([...])`` in-process; those that depend on the process itself (its
real stdout, asyncio and logging as configured by the command, the interpreter's exit-time
flush) run ``python -m msgcap`` as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from msgcap.cli import main
from tests.conftest import PAIR_A, free_port


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    """``{w}`` stands for the work folder (see :func:`work`)."""
    status: int | None = None
    """The exit status, or None for "1 or 2"."""
    says: str = ""
    """Text the error line must contain."""
    process: bool = False
    """Run as ``python -m msgcap``, not in-process."""
    stdout: str | None = None
    """With ``process``: ``"full"`` sends stdout to /dev/full."""
    unprivileged: bool = False
    """With ``process``: file modes apply even to root (for unreadable and read-only
    paths)."""


def case(*argv: str, status: int | None = None, says: str = "", process: bool = False,
         stdout: str | None = None, unprivileged: bool = False, id: str) -> object:  # fmt: skip
    c = Case(argv, status, says, process or unprivileged, stdout, unprivileged)
    return pytest.param(c, id=id)


# fmt: off
CASES = [
    # --- parse
    case("parse", "{w}/missing", status=2, says="missing", id="parse-missing"),
    case("parse", "{w}/empty", status=2, says="no .dat", id="parse-empty-folder"),
    case("parse", "{w}/loop", status=2, says="symbolic links", id="parse-symlink-loop"),
    case("parse", "{w}/cap", "-o", "{w}/empty", status=2, says="Is a directory",
         id="parse-out-is-folder"),
    case("parse", "{w}/cap", "-o", "{w}/file/x", status=2, says="Not a directory",
         id="parse-out-under-file"),
    case("parse", "{w}/cap", "-o", "/proc/msgcap/out.json", says="/proc/msgcap/out.json",
         id="parse-out-under-proc"),
    case("parse", "{w}/cap", "-o", "/sys/msgcap.json", says="/sys/msgcap.json",
         id="parse-out-read-only"),
    case("parse", "{w}/cap", "-o", "/dev/full", status=1, says="/dev/full: No space left",
         process=True, id="parse-out-dev-full"),
    case("parse", "{w}/cap", "--jsonl", status=1, says="standard output: No space left",
         process=True, stdout="full", id="parse-stdout-dev-full"),
    case("parse", "{w}/cap", "--since", "yesterday", status=2, says="--since",
         id="parse-bad-time"),
    case("parse", "{w}/cap", "--since", "2024-01-02", "--until", "2023-01-01", status=2,
         says="--since", id="parse-time-range-backwards"),
    case("parse", "{w}/cap", "--until=-5", status=2, says="--until", id="parse-negative-time"),
    case("parse", "{w}/unreadable.dat", status=2, says="unreadable.dat: Permission denied",
         unprivileged=True, id="parse-unreadable"),
    case("parse", "{w}/cap", "-o", "{w}/read-only/out.json", status=2, says="Permission denied",
         unprivileged=True, id="parse-out-read-only-folder"),
    # --- stats
    case("stats", "{w}/missing", status=2, says="missing", id="stats-missing"),
    case("stats", "{w}/loop", status=2, says="symbolic links", id="stats-symlink-loop"),
    case("stats", "{w}/cap", "--since", "2025-01-01T00:00:00", "--until", "1000", status=2,
         says="--since", id="stats-time-range-backwards"),
    case("stats", "{w}/cap", "--direction", "sideways", status=2, id="stats-bad-direction"),
    case("stats", "{w}/cap", status=1, says="standard output", process=True, stdout="full",
         id="stats-stdout-dev-full"),
    # --- replay
    case("replay", "{w}/missing", "--to", "127.0.0.1:1", status=2, says="missing",
         id="replay-missing"),
    case("replay", "{w}/empty", "--to", "127.0.0.1:1", status=2, says="no .dat",
         id="replay-empty-folder"),
    case("replay", "{w}/file", "--to", "127.0.0.1:1", status=2, id="replay-not-a-capture"),
    case("replay", "{w}/loop", "--to", "127.0.0.1:1", status=2, says="symbolic links",
         id="replay-symlink-loop"),
    case("replay", "{w}/unreadable.dat", "--to", "127.0.0.1:1", status=2,
         says="Permission denied", unprivileged=True, id="replay-unreadable"),
    case("replay", "{w}/cap", "--to", "127.0.0.1:99999", status=2, says="99999",
         id="replay-port-out-of-range"),
    case("replay", "{w}/cap", "--to", "127.0.0.1:²", status=2, says="HOST:PORT",
         id="replay-port-not-ascii"),
    case("replay", "{w}/cap", "--to", "nowhere", status=2, says="HOST:PORT",
         id="replay-no-port"),
    case("replay", "{w}/cap", "--listen", "127.0.0.1:-1", status=2, says="HOST:PORT",
         id="replay-listen-negative-port"),
    case("replay", "{w}/cap", "--to", "127.0.0.1:1", "--network", "moon", status=2,
         says="moon", id="replay-bad-network"),
    case("replay", "{w}/cap", "--to", "127.0.0.1:1", "--timeout", "nan", status=2,
         says="--timeout", id="replay-timeout-nan"),
    case("replay", "{w}/cap", "--to", "127.0.0.1:1", "--timeout", "-1", status=2,
         says="--timeout", id="replay-timeout-negative"),
    case("replay", "{w}/cap", "--to", "127.0.0.1:1", "--timeout", "soon", status=2,
         says="--timeout", id="replay-timeout-not-a-number"),
    case("replay", "{w}/cap", "--listen", "127.0.0.1:0", "--connections", "0", status=2,
         says="--connections", id="replay-zero-connections"),
    case("replay", "{w}/cap", "--to", "127.0.0.1:{closed}", status=1,
         says="cannot connect to 127.0.0.1:", id="replay-refused"),
    case("replay", "{w}/cap", "--listen", "192.0.2.1:1", status=1,
         says="cannot listen on 192.0.2.1:1", id="replay-listen-elsewhere"),
    # --- export
    case("export", "--pcap", "{w}/out.pcap", "{w}/10.0.0.5_99999", says="99999",
         id="export-pcap-port-out-of-range"),
    case("export", "--pcap", "{w}/out.pcap", "{w}/10.0.0.5_99999", says="99999", process=True,
         id="export-pcap-port-out-of-range-process"),
    case("export", "--pcap", "/dev/full", "{w}/cap", status=1, says="/dev/full: No space left",
         id="export-pcap-dev-full"),
    case("export", "--pcap", "{w}/empty", "{w}/cap", says="{w}/empty", id="export-pcap-folder"),
    case("export", "--pcap", "/proc/msgcap/x.pcap", "{w}/cap", says="/proc/msgcap/x.pcap",
         id="export-pcap-under-proc"),
    case("export", "--pcap", "/sys/x.pcap", "{w}/cap", says="/sys/x.pcap",
         id="export-pcap-read-only"),
    case("export", "--pcap", "{w}/o.pcap", "{w}/missing", status=2, says="missing",
         id="export-pcap-missing-input"),
    case("export", "--pcap", "{w}/o.pcap", "{w}/cap", "--network", "moon", status=2,
         says="moon", id="export-bad-network"),
    case("export", "--fuzz", "{w}/file", "{w}/cap", says="{w}/file", id="export-fuzz-to-file"),
    case("export", "--fuzz", "/proc/msgcap-fuzz", "{w}/cap", says="/proc/msgcap-fuzz",
         id="export-fuzz-under-proc"),
    case("export", "--fuzz", "{w}/fz", "{w}/loop", status=2, says="symbolic links",
         id="export-fuzz-symlink-loop"),
    case("export", "--fuzz", "{w}/read-only/fz", "{w}/cap", says="read-only/fz: Permission denied",
         unprivileged=True, id="export-fuzz-read-only-folder"),
    case("export", "--pcap", "{w}/o.pcap", "{w}/unreadable.dat", status=2,
         says="Permission denied", unprivileged=True, id="export-pcap-unreadable"),
    case("export", "--parquet", "{w}/file", "{w}/cap", status=2, says="{w}/file",
         id="export-parquet-to-file"),
    case("export", "--parquet", "/proc/msgcap-pq", "{w}/cap", says="/proc/msgcap-pq",
         id="export-parquet-under-proc"),
    case("export", "--parquet", "{w}/pq", "{w}/missing", status=2, says="missing",
         id="export-parquet-missing-input"),
    # --- sql
    case("sql", "{w}/missing", "select 1", status=2, says="missing", id="sql-missing"),
    case("sql", "{w}/file", "select 1", status=2, says="{w}/file", id="sql-file-not-folder"),
    case("sql", "{w}/empty", "select 1", status=2, says="not a msgcap dataset",
         id="sql-not-a-dataset"),
    case("sql", "{w}/ds", "selec", status=2, id="sql-bad-query"),
    case("sql", "{w}/ds", "select * from nosuch", status=2, says="nosuch", id="sql-no-table"),
    case("sql", "{w}/ds", "select 1", "--format", "yaml", status=2, id="sql-bad-format"),
    case("sql", "{w}/ds", "select * from messages", status=1, says="standard output",
         process=True, stdout="full", id="sql-stdout-dev-full"),
    # --- compare
    case("compare", "{w}/missing", "{w}/cap", status=2, says="missing", id="compare-missing"),
    case("compare", "{w}/cap", "{w}/file", status=2, says="{w}/file", id="compare-file"),
    case("compare", "{w}/cap", "{w}/loop", status=2, says="{w}/loop", id="compare-loop"),
    case("compare", "{w}/cap", "{w}/unreadable", status=2, says="Permission denied",
         unprivileged=True, id="compare-unreadable"),
    case("stats", "{w}/locked", status=2, says="locked: Permission denied", unprivileged=True,
         id="stats-folder-locked"),
    case("compare", "{w}/cap", "{w}/cap", "--json", status=1, says="standard output",
         process=True, stdout="full", id="compare-stdout-dev-full"),
    # --- proxy (only cases that stop before it listens)
    case("proxy", "--config", "{w}/missing.toml", status=2, says="missing.toml",
         id="proxy-config-missing"),
    case("proxy", "--config", "{w}/empty", status=2, says="Is a directory",
         id="proxy-config-folder"),
    case("proxy", "--config", "{w}/loop", status=2, says="symbolic links",
         id="proxy-config-loop"),
    case("proxy", "--config", "{w}/file", status=2, says="{w}/file", id="proxy-config-not-toml"),
    case("proxy", "--config", "{w}/unreadable.dat", status=2, says="Permission denied",
         unprivileged=True, id="proxy-config-unreadable"),
    case("proxy", "--config", "{w}/latin1.toml", status=2, says="latin1.toml",
         id="proxy-config-not-utf8"),
    case("proxy", "--config", "{w}/latin1.toml", status=2, says="latin1.toml", process=True,
         id="proxy-config-not-utf8-process"),
    case("proxy", "--network", "moon", status=2, says="moon", id="proxy-bad-network"),
    case("proxy", "--route", "127.0.0.1:99999=127.0.0.1:1", status=2, says="99999",
         id="proxy-port-out-of-range"),
    case("proxy", "--route", "127.0.0.1:²=127.0.0.1:1", status=2, says="²",
         id="proxy-port-not-ascii"),
    case("proxy", "--route", "nowhere", status=2, says="nowhere", id="proxy-bad-route"),
    case("proxy", "--metrics", "127.0.0.1", status=2, says="HOST:PORT", id="proxy-bad-metrics"),
    case("proxy", "--max-connections", "many", status=2, says="--max-connections",
         id="proxy-bad-number"),
    case("proxy", "--handshake-timeout", "nan", status=2, says="handshake", process=True,
         id="proxy-nan"),
    case("proxy", "--idle-timeout", "-3", status=2, says="idle_timeout",
         id="proxy-negative-timeout"),
    # --- no, unknown or help
    case("--help", status=1, says="standard output: No space left", process=True,
         stdout="full", id="help-stdout-dev-full"),
    case(status=2, id="no-subcommand"),
    case("frobnicate", status=2, says="frobnicate", id="unknown-subcommand"),
]
# fmt: on


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cap`` (a capture folder), ``10.0.0.5_99999`` (the same, its name's port out of
    range), ``empty`` (a folder), ``file`` (a text file), ``loop`` (a symlink to itself),
    ``latin1.toml`` (not UTF-8), ``ds`` (a Parquet dataset of ``cap``), ``unreadable.dat``
    (mode 000), ``read-only`` (a folder, mode 555), ``unreadable`` (a capture folder, one
    file mode 000) and ``locked`` (a capture folder, mode 000)."""
    w = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(PAIR_A, w / "cap", ignore=shutil.ignore_patterns("*.json"))
    shutil.copytree(w / "cap", w / "10.0.0.5_99999")
    (w / "empty").mkdir()
    (w / "file").write_text("not a capture, not TOML, not a folder\n")
    (w / "loop").symlink_to(w / "loop")
    (w / "latin1.toml").write_bytes('network = "r\xe9gtest"\n'.encode("latin-1"))
    assert main(["export", "--parquet", str(w / "ds"), str(w / "cap")]) == 0
    shutil.copy(w / "cap" / "msgs_recv.dat", w / "unreadable.dat")
    (w / "unreadable.dat").chmod(0o000)
    (w / "read-only").mkdir(mode=0o555)
    shutil.copytree(w / "cap", w / "unreadable")
    (w / "unreadable" / "msgs_sent.dat").chmod(0o000)
    shutil.copytree(w / "cap", w / "locked")
    (w / "locked").chmod(0o000)
    return w


def run(c: Case, w: Path, capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    closed = str(free_port())  # nothing listens on it once it is closed
    argv = [a.replace("{w}", str(w)).replace("{closed}", closed) for a in c.argv]
    if c.process:
        cmd = [sys.executable, "-m", "msgcap", *argv]
        if c.unprivileged and os.geteuid() == 0:  # root ignores file modes: drop that power
            if not shutil.which("setpriv"):
                pytest.skip("needs setpriv to drop root's file-permission override")
            cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
        with open("/dev/full" if c.stdout == "full" else os.devnull, "wb") as out:
            res = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True,
                                 timeout=20, check=False)  # fmt: skip
        return res.returncode, res.stderr
    capsys.readouterr()
    try:
        status: object = main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("c", CASES)
def test_bad_input_is_one_line_error(
    c: Case, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(c, work, capsys)
    print(err)
    assert "Traceback" not in err
    assert status in ((1, 2) if c.status is None else (c.status,)), (status, err)
    lines = err.strip().splitlines()
    assert lines, "no error line"
    errors = [x for x in lines if x.startswith("msgcap: error:")]
    assert errors == lines[-1:], f"the last line, and only it, is the error:\n{err}"
    assert c.says.replace("{w}", str(work)) in lines[-1]
    assert "[Errno" not in lines[-1]  # the reason as words, with the file it concerns


@pytest.mark.parametrize("argv", [["parse", "{w}/cap"], ["stats", "{w}/cap"],
                                  ["sql", "{w}/ds", "select * from messages"]])  # fmt: skip
def test_a_closed_pipe_ends_quietly(argv: list[str], work: Path) -> None:
    """``msgcap ... | head -c 10``: the reader went away, as Unix tools do: no message."""
    argv = [a.replace("{w}", str(work)) for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "msgcap", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(60)
    assert err == "" and proc.returncode == 0, (proc.returncode, err)


def test_an_unexpected_exception_is_one_line_too(
    monkeypatch: pytest.MonkeyPatch, work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bug deep in a command (here: the pcap writer raising what it should not) still
    ends in one line, naming the exception and where it was raised, and exit status 1."""
    import msgcap.capture.export

    def broken(*args: object, **kwargs: object) -> int:
        raise ValueError("something deep went wrong")

    monkeypatch.setattr(msgcap.capture.export, "export_pcap", broken)
    status = main(["export", "--pcap", str(work / "x.pcap"), str(work / "cap")])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    [line] = err.strip().splitlines()
    assert line.startswith("msgcap: error: unexpected ValueError: something deep went wrong ")
    assert "(at test_cli_errors.py:" in line and line.endswith(" in broken)")
