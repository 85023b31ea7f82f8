"""Replaying a sync that Bitcoin Core itself recorded (``-capturemessages``) into a fresh
bitcoind, over BIP324: dialing it (``--to --transport v2``) and letting a default node
(v2 on) dial the replayer (``--listen``)."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bitcoind import MSGCAP, BitcoinNode, NodeFactory, free_port, wait_until

BLOCKS = 120
pytestmark = pytest.mark.e2e


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path / "nodes")  # skips (or fails) without bitcoind
    try:
        yield factory
    finally:
        factory.close()


def record_sync(nodes: NodeFactory) -> tuple[Path, str, int]:
    """A Core node syncs BLOCKS blocks from a miner over v2 and captures it: the capture
    folder of the miner (in the syncing node's capture), the tip hash and height."""
    miner = nodes("miner")
    tip = miner.mine(BLOCKS, "bcrt1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqdku202")[-1]
    syncer = nodes("syncer", "-capturemessages", f"-connect={miner.address}")
    wait_until(lambda: syncer.tip() == tip, 60, "the recording node did not sync")
    (peer,) = syncer.peers()
    assert peer["transport_protocol_type"] == "v2"
    syncer.stop()
    folders = [f for f in syncer.capture_dir.iterdir() if f.is_dir()]
    assert len(folders) == 1, folders
    return folders[0], tip, BLOCKS


def replay(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MSGCAP), "replay", *args, "--json", "--timeout", "3"],
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def test_replay_to_fresh_node_over_v2(nodes: NodeFactory) -> None:
    folder, tip, height = record_sync(nodes)
    fresh = nodes("fresh")
    res = replay(str(folder), "--to", fresh.address, "--transport", "v2")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["transport"] == "v2" and report["error"] is None, report
    wait_until(lambda: fresh.height() == height, 30, "the fresh node did not reach the tip")
    assert fresh.tip() == tip


def test_default_node_dials_the_replayer(nodes: NodeFactory) -> None:
    folder, tip, height = record_sync(nodes)
    port = free_port()
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", replay(
        str(folder), "--listen", f"127.0.0.1:{port}", "--play", "peer")))  # fmt: skip
    thread.start()
    # v2 on, Core's default; it retries -connect until the replayer listens.
    fresh: BitcoinNode = nodes("dialer", f"-connect=127.0.0.1:{port}")
    wait_until(lambda: fresh.height() == height, 60, "the dialing node did not reach the tip")
    assert fresh.tip() == tip
    (peer,) = fresh.peers()
    assert peer["transport_protocol_type"] == "v2"
    fresh.stop()
    thread.join(120)
    report = json.loads(result["r"].stdout)
    assert report["transport"] == "v2" and report["error"] is None, report
