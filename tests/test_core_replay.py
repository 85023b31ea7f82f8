"""Replaying a 200-block sync that Bitcoin Core itself recorded (``-capturemessages``) into
fresh bitcoinds: dialing them (``--to``, v1 and BIP324) and letting a default node (v2 on)
dial the replayer (``--listen``). ``--strict`` passes for a faithful replay, which takes
seconds, and fails, naming the request, when one block is cut out of the recording."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture.records import Record, encode_record, read_records
from tests.bitcoind import MSGCAP, BitcoinNode, NodeFactory, free_port, wait_until

BLOCKS = 200
FAST = 5.0
"""Seconds a faithful replay of the 200 blocks may take (it takes well under one)."""
pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Recording:
    folder: Path
    """The miner's capture folder in the syncing node's capture."""
    tip: str
    height: int


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """A Core node syncs BLOCKS blocks from a Core miner over v2 and captures it."""
    work = tmp_path_factory.mktemp("core-recording")
    nodes = NodeFactory(work / "nodes")  # skips (or fails) without bitcoind
    try:
        miner = nodes("miner")
        tip = miner.mine(BLOCKS, "bcrt1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqdku202")[-1]
        syncer = nodes("syncer", "-capturemessages", f"-connect={miner.address}")
        wait_until(lambda: syncer.tip() == tip, 60, "the recording node did not sync")
        (peer,) = syncer.peers()
        assert peer["transport_protocol_type"] == "v2"
        syncer.stop()
        folders = [f for f in syncer.capture_dir.iterdir() if f.is_dir()]
        assert len(folders) == 1, folders
        folder = shutil.copytree(folders[0], work / folders[0].name)
    finally:
        nodes.close()
    yield Recording(folder, tip, BLOCKS)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path / "nodes")
    try:
        yield factory
    finally:
        factory.close()


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
    return hashlib.sha256(hashlib.sha256(cut.payload[:80]).digest()).digest()[::-1].hex()


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
