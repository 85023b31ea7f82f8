"""``msgcap export --functional-test``: recordings become tests for Bitcoin Core's
functional test framework, run here against real bitcoind with verystable's copy of the
framework.

The harness puts what a Core source tree has around ``test/functional/``: a
``test_framework`` package (a link to ``verystable.core``, the framework's copy) beside
the generated test and ``config.ini`` one folder up; ``BITCOIND`` names the binary. The
generated files run unchanged."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bitcoind import BURN, NodeFactory, Recording, msgcap, record_sync, require_bitcoind
from tests.conftest import PAIR_A, PAIR_B

PAIR_TIP = "1ff0eaaee6265c7f316434a30c650fb524140a69f880fef8a54c45c1bdca7018"
"""Block 104, the tip both nodes of the pair reached."""
BLOCKS = 200
pytestmark = pytest.mark.e2e

CONFIG = """[environment]
PACKAGE_NAME=Bitcoin Core
PACKAGE_BUGREPORT=https://github.com/bitcoin/bitcoin/issues
SRCDIR={build}
BUILDDIR={build}
EXEEXT=
RPCAUTH=
[components]
ENABLE_WALLET=false
ENABLE_CLI=false
ENABLE_BITCOIN_UTIL=false
ENABLE_WALLET_TOOL=false
ENABLE_BITCOIND=true
ENABLE_FUZZ_BINARY=false
ENABLE_ZMQ=false
ENABLE_EXTERNAL_SIGNER=false
ENABLE_USDT_TRACEPOINTS=false
"""


def functional_dir(root: Path, bitcoind: Path) -> Path:
    """``root/config.ini`` and ``root/functional/test_framework`` (verystable.core)."""
    import verystable.core  # type: ignore[import-untyped]

    functional = root / "functional"
    functional.mkdir(parents=True)
    (functional / "test_framework").symlink_to(Path(verystable.core.__file__).parent)
    (root / "config.ini").write_text(CONFIG.format(build=bitcoind.parent.parent))
    return functional


def export(capture: Path, out: Path) -> None:
    res = msgcap("export", "--functional-test", str(out), str(capture))
    assert res.returncode == 0, res.stderr


def run_test(test: Path, bitcoind: Path) -> tuple[int, str, float]:
    """Run a generated test as Core's test runner would: exit status, output, seconds."""
    env = {**os.environ, "BITCOIND": str(bitcoind)}
    started = time.monotonic()
    tmpdir = test.parent / f"{test.stem}.run"
    res = subprocess.run([sys.executable, str(test), "--tmpdir", str(tmpdir)],
                         capture_output=True, text=True, timeout=180, check=False, env=env,
                         cwd=test.parent)  # fmt: skip
    seconds = time.monotonic() - started
    out = res.stdout + res.stderr
    print(f"{test.name}: exit {res.returncode} in {seconds:.1f}s\n{out[-3000:]}")
    return res.returncode, out, seconds


@pytest.fixture(scope="module")
def bitcoind() -> Path:
    return require_bitcoind()


@pytest.fixture(scope="module")
def sync_recording(tmp_path_factory: pytest.TempPathFactory) -> Recording:
    """A Core node syncs BLOCKS blocks from a Core miner and captures it."""
    work = tmp_path_factory.mktemp("ft-recording")
    with NodeFactory(work / "nodes") as nodes:
        miner = nodes("miner")
        miner.mine(BLOCKS, BURN)
        recorded, _ = record_sync(nodes, miner, work)
    return recorded


@pytest.fixture
def sync_test(sync_recording: Recording, tmp_path: Path, bitcoind: Path) -> Path:
    """The sync recording exported as ``functional/sync.py`` (its data in ``sync.json``)."""
    test = functional_dir(tmp_path, bitcoind) / "sync.py"
    export(sync_recording.folder, test)
    return test


def test_generated_file_imports_only_the_framework(tmp_path: Path) -> None:
    export(PAIR_B, tmp_path / "pair_b.py")
    tree = ast.parse((tmp_path / "pair_b.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    framework = {m for m in modules if m.startswith("test_framework.")}
    assert framework == {"test_framework.messages", "test_framework.p2p",
                         "test_framework.test_framework", "test_framework.util"}  # fmt: skip
    assert modules - framework <= set(sys.stdlib_module_names)
    text = (tmp_path / "pair_b.py").read_text()
    assert "msg_sendcmpct(announce=False, version=2)" in text
    assert "msg_inv([CInv(MSG_WTX" in text and "msg_feefilter(feerate=" in text
    assert (tmp_path / "pair_b.json").is_file()


def test_siphash_and_compact_blocks_match_the_framework() -> None:
    from verystable.core.crypto.siphash import siphash  # type: ignore[import-untyped]

    from msgcap.parser.functional_plan import _siphash24, plan

    for n in range(20):
        data = bytes(range(n))
        assert _siphash24(0x0706050403020100, 0x0F0E0D0C0B0A0908, data) == siphash(
            0x0706050403020100, 0x0F0E0D0C0B0A0908, data
        )
    # b received 97 of a's blocks as compact blocks only: each is rebuilt, block 102's
    # from the three recorded transactions its short ids name.
    recorded = plan([PAIR_B])
    assert len(recorded.cmpctblocks) == 97 and len(recorded.blocks) == 102 + 2  # b mined 2
    assert recorded.tip == PAIR_TIP and recorded.expected[5:] == [
        "tx ba6a72eef316a5fef59cca7845634953db4ef620bc1115638d07cf9f7edf3323",
        "tx 2037abbb1c41730c414187985d195ae2eecc97de69d0db321b8656e4a6698ad2",
        "tx b253f1cba6fbfa1035ccb29855c8f6567aab2b67f58f32a345af77113cb89ae5",
    ]


@pytest.mark.parametrize("capture", [PAIR_A, PAIR_B], ids=["a", "b"])
def test_pair_becomes_a_passing_test(capture: Path, tmp_path: Path, bitcoind: Path) -> None:
    """Both captures of tests/data/core-v30-pair: b's plays a to a fresh node, which gets
    a's 102 blocks and three transactions as b did (and b's two blocks by submitblock);
    a's plays b, and the fresh node gets a's own 102 blocks by submitblock, then asks b
    for its two. Both end on block 104."""
    functional = functional_dir(tmp_path, bitcoind)
    test = functional / f"pair_{capture.parent.name}.py"
    export(capture, test)
    assert f'node.getbestblockhash() == "{PAIR_TIP}"' in test.read_text()
    status, out, _ = run_test(test, bitcoind)
    assert status == 0 and "Tests successful" in out, out[-3000:]


def test_sync_becomes_a_passing_test(
    sync_recording: Recording, sync_test: Path, bitcoind: Path
) -> None:
    tip = sync_recording.tip
    data = json.loads(sync_test.with_suffix(".json").read_text())
    assert len(data["blocks"]) == BLOCKS and data["chain"][-1] == tip
    assert f'node.getbestblockhash() == "{tip}"' in sync_test.read_text()
    status, out, _ = run_test(sync_test, bitcoind)
    assert status == 0 and "Tests successful" in out, out[-3000:]


def test_one_block_removed_fails_naming_it(sync_test: Path, bitcoind: Path) -> None:
    data_file = sync_test.with_suffix(".json")
    data = json.loads(data_file.read_text())
    removed = data["chain"][56]
    del data["blocks"][removed]
    data_file.write_text(json.dumps(data))
    status, out, _ = run_test(sync_test, bitcoind)
    assert status == 1, out[-3000:]
    assert f"the node asked for block {removed}, which the recording does not hold" in out
