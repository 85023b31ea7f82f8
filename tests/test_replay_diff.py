"""Differential replay against real Bitcoin Core: the same recording played into two
bitcoinds (``msgcap replay REC --to A --to B``) and the difference between them.

Two recordings, written by Core's own ``-capturemessages`` (a Core node syncing from a
Core miner): a 200-block sync, and a session with transactions (the sync, then wallet
transactions relayed and mined). The same build with the same options shows no
substantive difference; an option that changes P2P behaviour shows the differences it
must cause, by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.bitcoind import (
    MSGCAP,
    BitcoinNode,
    NodeFactory,
    copy_capture,
    free_port,
    record_sync,
    wait_mempools,
    wait_quiet,
    wait_until,
)

BLOCKS = 200
pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Recordings:
    sync: Path
    """The miner's side of a 200-block sync (the recording node started from genesis)."""
    txs: Path
    """The miner's side of a session with a node that already had the 200 blocks: three
    wallet transactions relayed."""
    chain: Path
    """The 200-block chain (``blocks``, ``chainstate``), to start nodes from for ``txs``."""
    txids: list[str]


def synced(nodes: NodeFactory, name: str, chain: Path, *extra: str) -> BitcoinNode:
    """A node that starts with the 200-block chain."""
    for part in ("blocks", "chainstate"):
        shutil.copytree(chain / part, nodes.workdir / name / "regtest" / part)
    return nodes(name, *extra)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recordings]:
    work = tmp_path_factory.mktemp("diff-recordings")
    with NodeFactory(work / "nodes") as nodes:  # skips (or fails) without bitcoind
        miner = nodes("miner")
        miner.create_wallet()
        miner.mine(BLOCKS)
        sync, syncer = record_sync(nodes, miner, work / "sync")
        chain = work / "chain"
        for part in ("blocks", "chainstate"):
            shutil.copytree(syncer.datadir / "regtest" / part, chain / part)

        second = synced(nodes, "second", chain, "-capturemessages", f"-connect={miner.address}")
        wait_until(lambda: second.peers(), 30, "the second node's connection")
        wait_quiet(miner, second, settle=0.5)
        txids = [miner.send(miner.new_address(), 1.5) for _ in range(3)]
        wait_mempools([second], txids, 30)
        wait_quiet(miner, second, settle=0.5)
        second.stop()
        txs = copy_capture(second, work / "txs")
    yield Recordings(sync.folder, txs, chain, txids)


def diff(recording: Path, *targets: str) -> tuple[int, dict[str, Any], str]:
    """``msgcap replay REC --to T1 --to T2 ... --json --timeout 5``."""
    to = [a for t in targets for a in ("--to", t)]
    started = time.monotonic()
    res = subprocess.run([str(MSGCAP), "replay", str(recording), *to, "--json", "--timeout", "5"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert res.stdout, res.stderr
    report = json.loads(res.stdout)
    print(f"{time.monotonic() - started:.1f}s")
    for d in report["substantive"]:
        print("  substantive:", d["name"], d["values"], d["items"][:3], len(d["items"]))
    for d in report["benign"]:
        print("  benign:", d["name"], d["values"], d["items"][:3], len(d["items"]))
    return res.returncode, report, res.stderr


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in report["substantive"]}


def test_same_build_same_options_sync(recordings: Recordings, nodes: NodeFactory) -> None:
    a, b = nodes("a"), nodes("b")
    status, report, err = diff(recordings.sync, a.address, b.address)
    assert status == 0, (report, err)
    assert report["substantive"] == [] and not report["diverged"]
    assert [n["reached"] for n in report["nodes"]] == [True, True]
    assert all(n["answered"]["getdata"] >= 1 for n in report["nodes"])
    assert a.height() == b.height() == BLOCKS


def test_same_build_same_options_transactions(recordings: Recordings, nodes: NodeFactory) -> None:
    a, b = synced(nodes, "a", recordings.chain), synced(nodes, "b", recordings.chain)
    status, report, err = diff(recordings.txs, a.address, b.address)
    assert status == 0, (report, err)
    assert report["substantive"] == [] and not report["diverged"]
    assert [n["reached"] for n in report["nodes"]] == [True, True]
    assert sorted(a.mempool()) == sorted(b.mempool()) == sorted(recordings.txids)


def test_listening_replayer_compares_its_clients(
    recordings: Recordings, nodes: NodeFactory
) -> None:
    """``--listen --connections 2 --diff``: two default nodes (v2) dial the replayer."""
    port = free_port()
    cmd = [str(MSGCAP), "replay", str(recordings.sync), "--listen", f"127.0.0.1:{port}",
           "--connections", "2", "--diff", "--play", "peer", "--json",
           "--timeout", "5"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        a = nodes("a", f"-connect=127.0.0.1:{port}")
        b = nodes("b", f"-connect=127.0.0.1:{port}")
        out, err = proc.communicate(timeout=90)
    report = json.loads(out)
    print(json.dumps(report["substantive"] + report["benign"], indent=1))
    assert proc.returncode == 0, (report, err)
    assert report["targets"] == ["client 1", "client 2"]
    assert [n["transport"] for n in report["nodes"]] == ["v2", "v2"]
    assert report["substantive"] == [] and not report["diverged"]
    wait_until(lambda: a.height() == b.height() == BLOCKS, 30, "both clients' tips")


def test_blocksonly_node_differs(recordings: Recordings, nodes: NodeFactory) -> None:
    """``-blocksonly`` says relay=0 in its version and drops a peer that announces
    transactions: the default node fetches the three transactions, it does not."""
    a = synced(nodes, "a", recordings.chain)
    b = synced(nodes, "b", recordings.chain, "-blocksonly")
    status, report, err = diff(recordings.txs, a.address, b.address)
    assert status == 1, (report, err)
    found = by_name(report)
    assert found["version.relay"]["values"] == {a.address: "1", b.address: "0"}
    assert found["disconnected"]["values"][a.address] == "no"
    assert found["disconnected"]["values"][b.address].startswith("disconnected")
    assert found["reached"]["values"] == {a.address: "yes", b.address: "no"}
    getdata = found["request getdata"]
    assert getdata["values"] == {a.address: "sent", b.address: "not sent"}
    wtxids = {a.rpc("getmempoolentry", t)["wtxid"] for t in recordings.txids}
    assert {i.removeprefix("wtx ") for i in getdata["items"]} == wtxids
    assert sorted(a.mempool()) == sorted(recordings.txids) and b.mempool() == []
    # Nothing else: the version's other fields, the handshake, the feefilter agree.
    assert {"version.services", "version.start_height", "version.user_agent"}.isdisjoint(found)


def test_peerbloomfilters_node_differs(
    recordings: Recordings, nodes: NodeFactory, msgcap_replay: Any
) -> None:
    """``-peerbloomfilters`` only adds NODE_BLOOM to the services it announces (through
    the pytest fixture, which takes several targets as the command line does)."""
    a, b = nodes("a"), nodes("b", "-peerbloomfilters")
    result = msgcap_replay(recordings.sync, to=[a.address, b.address], timeout=5)
    print(result.summary())
    assert result.diverged and result.names() == ["version.services"]
    services = result.substantive[0].values
    assert int(services[b.address], 16) == int(services[a.address], 16) | 4  # NODE_BLOOM
    assert a.tip() == b.tip()


def test_stopatheight_node_differs(recordings: Recordings, nodes: NodeFactory) -> None:
    """``-stopatheight=100`` shuts the node down at height 100: it disconnects and never
    asks for the blocks above 100."""
    a, b = nodes("a"), nodes("b", "-stopatheight=100")
    status, report, err = diff(recordings.sync, a.address, b.address)
    assert status == 1, (report, err)
    found = by_name(report)
    assert found["disconnected"]["values"][a.address] == "no"
    assert found["reached"]["values"] == {a.address: "yes", b.address: "no"}
    getdata = found["request getdata"]
    assert getdata["values"] == {a.address: "sent", b.address: "not sent"}
    heights = [a.rpc("getblockheader", i.removeprefix("block "))["height"]
               for i in getdata["items"]]  # fmt: skip
    assert heights and min(heights) > 100 and max(heights) == BLOCKS
    assert "version.services" not in found and "version.relay" not in found
