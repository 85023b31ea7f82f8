"""Replaying a 200-block sync that Bitcoin Core itself recorded (``-capturemessages``) into
fresh bitcoinds: dialing them (``--to``, v1 and BIP324) and letting a default node (v2 on)
dial the replayer (``--listen``). ``--strict`` passes for a faithful replay, which takes
seconds, and fails, naming the request, when one block is cut out of the recording."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture.framing import hash256
from msgcap.capture.records import Record, encode_record, read_records
from tests.bitcoind import (
    BURN,
    MSGCAP,
    BitcoinNode,
    NodeFactory,
    Recording,
    free_port,
    record_sync,
    wait_until,
)

BLOCKS = 200
FAST = 5.0
"""Seconds a faithful replay of the 200 blocks may take (it takes well under one)."""
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """A Core node syncs BLOCKS blocks from a Core miner over v2 and captures it."""
    work = tmp_path_factory.mktemp("core-recording")
    with NodeFactory(work / "nodes") as nodes:  # skips (or fails) without bitcoind
        miner = nodes("miner")
        miner.mine(BLOCKS, BURN)
        recorded, _ = record_sync(nodes, miner, work)
    assert recorded.transport == "v2" and recorded.height == BLOCKS
    yield recorded


def replay(*args: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """``msgcap replay ARGS --json --strict --timeout 5``: exit status, report, stderr."""
    res = subprocess.run([str(MSGCAP), "replay", *args, "--json", "--strict", "--timeout", "5"],
                         capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout), res.stderr


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_replay_to_fresh_node(recording: Recording, nodes: NodeFactory, transport: str) -> None:
    fresh = nodes("fresh")
    status, report, err = replay(str(recording.folder), "--to", fresh.address,
                                 "--transport", transport)  # fmt: skip
    print(f"--to over {transport}: {report['seconds']}s", json.dumps(report, indent=1))
    assert status == 0, (report, err)
    assert report["transport"] == transport and report["error"] is None
    assert report["reached"] and report["substantive"] == [] and not report["diverged"]
    assert report["answered"]["getdata"] >= 1 and report["answered"]["getheaders"] >= 1
    assert report["seconds"] < FAST
    wait_until(lambda: fresh.height() == recording.height, 30, "the fresh node's tip")
    assert fresh.tip() == recording.tip


def without_block(folder: Path, out: Path, index: int) -> str:
    """A copy of ``folder`` without the ``index``-th recorded block; its hash (RPC order)."""
    shutil.copytree(folder, out)
    with open(folder / "msgs_recv.dat", "rb") as f:
        records = [r for r in read_records(f) if isinstance(r, Record)]
    blocks = [i for i, r in enumerate(records) if r.msgtype.label == "block"]
    cut = records[blocks[index]]
    kept = (encode_record(r.time, r.msgtype, r.payload) for r in records if r is not cut)
    (out / "msgs_recv.dat").write_bytes(b"".join(kept))
    return hash256(cut.payload[:80])[::-1].hex()


def test_one_block_removed_fails_strict(
    recording: Recording, nodes: NodeFactory, tmp_path: Path
) -> None:
    missing = without_block(recording.folder, tmp_path / recording.folder.name, 56)
    fresh = nodes("fresh")
    status, report, err = replay(str(tmp_path / recording.folder.name), "--to", fresh.address)
    print(json.dumps(report, indent=1))
    assert status == 1, (report, err)
    assert report["diverged"] and report["error"] is None
    unanswered = [d for d in report["substantive"] if d["kind"] == "unanswerable"]
    assert unanswered == [
        {"kind": "unanswerable", "msgtype": "getdata", "count": 1, "items": [f"block {missing}"]}
    ]
    assert report["seconds"] < FAST
    assert fresh.rpc("getblockheader", missing)["height"] == fresh.height() + 1


def test_default_node_dials_the_replayer(recording: Recording, nodes: NodeFactory) -> None:
    port = free_port()
    result: dict[str, tuple[int, dict[str, Any], str]] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", replay(
        str(recording.folder), "--listen", f"127.0.0.1:{port}", "--play", "peer")))  # fmt: skip
    thread.start()
    # v2 on, Core's default; it retries -connect until the replayer listens.
    fresh: BitcoinNode = nodes("dialer", f"-connect=127.0.0.1:{port}")
    wait_until(lambda: fresh.height() == recording.height, 60, "the dialing node's tip")
    assert fresh.tip() == recording.tip
    thread.join(120)
    status, report, err = result["r"]
    print(f"--listen: {report['seconds']}s", json.dumps(report, indent=1))
    assert status == 0, (report, err)
    assert report["transport"] == "v2" and report["error"] is None
    assert report["reached"] and report["substantive"] == []
