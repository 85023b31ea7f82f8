"""Real regtest nodes (bcoin) through the real ``msgcap proxy`` process, over loopback.

Node A mines; node B reaches A only through the proxy (outbound route, inbound route,
SOCKS5). After B has A's blocks, the captures are checked against what the nodes report
over RPC: block hashes, heights, peer counts; and for internal consistency: every payload
decodes, recv/sent are on the node's side, timestamps strictly increase, the event log
agrees with the files.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgcap.capture.records import Record, read_records
from msgcap.parser.messages import BlockMsg, CmpctBlock, Headers, Version, decode_message
from msgcap.parser.wire import display_hash
from tests.bcoin import BcoinNode, require_bcoin, wait_listening
from tests.conftest import ProxyProcess, free_port

pytestmark = pytest.mark.e2e

PRE_MINED = 5
MINED = 60


@pytest.fixture
def miner(tmp_path: Path) -> Iterator[BcoinNode]:
    require_bcoin()
    node = BcoinNode(tmp_path, "a")
    try:
        node.mine(PRE_MINED)
        wait_listening(node.port)
        yield node
    finally:
        node.stop()


def records(path: Path) -> list[Record]:
    with open(path, "rb") as f:
        out = list(read_records(f))
    assert all(isinstance(r, Record) for r in out), f"damage in {path}"
    return out  # type: ignore[return-value]


def check_capture(
    folder: Path, miner: BcoinNode, node_is_b: bool, events: list[dict[str, object]]
) -> None:
    """Check one connection's capture against the nodes and the event log."""
    recv = records(folder / "msgs_recv.dat")
    sent = records(folder / "msgs_sent.dat")
    decoded = {}
    for r in recv + sent:
        msgtype = r.msgtype.name.decode()
        decoded[(id(r))] = decode_message(msgtype, r.payload)  # raises if it does not decode
    # Handshake, from the node's point of view.
    assert recv[0].msgtype.name == b"version" and sent[0].msgtype.name == b"version"
    assert b"verack" in {r.msgtype.name for r in recv}
    assert b"verack" in {r.msgtype.name for r in sent}
    v_recv, v_sent = decoded[id(recv[0])], decoded[id(sent[0])]
    assert isinstance(v_recv, Version) and isinstance(v_sent, Version)
    # B starts empty, A had PRE_MINED blocks: the heights say who sent which version.
    b_version, a_version = (v_sent, v_recv) if node_is_b else (v_recv, v_sent)
    assert b_version.start_height == 0 and a_version.start_height == PRE_MINED
    # Every block hash A reports is in a block, cmpctblock or headers message that went
    # from A to B.
    from_a = recv if node_is_b else sent
    seen = set()
    for r in from_a:
        m = decoded[id(r)]
        if isinstance(m, BlockMsg):
            seen.add(display_hash(m.block.hash))
        elif isinstance(m, CmpctBlock):
            seen.add(display_hash(m.header_and_shortids.header.hash))
        elif isinstance(m, Headers):
            seen.update(display_hash(h.hash) for h in m.headers)
    reported = {miner.rpc("getblockhash", h) for h in range(1, PRE_MINED + MINED + 1)}
    assert reported <= seen, f"{len(reported - seen)} block hashes missing"
    # Timestamps strictly increase across both directions.
    times = sorted(r.time for r in recv + sent)
    assert len(set(times)) == len(times)
    assert [r.time for r in recv] == sorted(r.time for r in recv)
    assert [r.time for r in sent] == sorted(r.time for r in sent)
    # The event log agrees with the files.
    closes = [e for e in events if e["event"] == "close" and e.get("peer") == folder.name]
    assert len(closes) == 1, closes
    close = closes[0]
    for direction, recs in (("recv", recv), ("sent", sent)):
        stats = close[direction]
        assert isinstance(stats, dict)
        assert stats["captured"] == stats["messages"] == len(recs)
        assert stats["bytes"] == sum(24 + len(r.payload) for r in recs)
        assert stats["invalid"] == 0


def sync_through_proxy(miner: BcoinNode, b: BcoinNode) -> None:
    b.wait_height(PRE_MINED, timeout=60)
    miner.mine(MINED)
    b.wait_height(PRE_MINED + MINED, timeout=90)
    assert b.rpc("getbestblockhash") == miner.rpc("getbestblockhash")
    assert len(b.rpc("getpeerinfo")) == 1
    assert len(miner.rpc("getpeerinfo")) == 1


def run_route(
    tmp_path: Path, miner: BcoinNode, proxy_flags: list[str], b_flags: list[str]
) -> tuple[ProxyProcess, list[dict[str, object]]]:
    """A proxy with ``proxy_flags``, node B with ``b_flags`` syncing from the miner
    through it; both stopped afterwards. Returns the proxy and its events."""
    with ProxyProcess(tmp_path, *proxy_flags) as proxy:
        b = BcoinNode(tmp_path, "b", *b_flags, listen=False)
        try:
            sync_through_proxy(miner, b)
        finally:
            b.stop()
            assert proxy.stop() == 0
    return proxy, proxy.events()


def run_one_route(
    tmp_path: Path, miner: BcoinNode, flag: str
) -> tuple[ProxyProcess, list[dict[str, object]], int]:
    """:func:`run_route` with one route (``flag``: ``--route`` or ``--inbound``) from a
    free port to the miner, which B dials (and nothing else); also that port."""
    listen = free_port()
    proxy, events = run_route(
        tmp_path, miner,
        [flag, f"127.0.0.1:{listen}=127.0.0.1:{miner.port}", "--socks5", "off"],
        [f"--only=127.0.0.1:{listen}"],
    )  # fmt: skip
    return proxy, events, listen


def test_outbound_route(tmp_path: Path, miner: BcoinNode) -> None:
    proxy, events, _ = run_one_route(tmp_path, miner, "--route")
    folder = proxy.capture_dir / f"127.0.0.1_{miner.port}"
    check_capture(folder, miner, node_is_b=True, events=events)


def test_inbound_route(tmp_path: Path, miner: BcoinNode) -> None:
    proxy, events, listen = run_one_route(tmp_path, miner, "--inbound")
    # The node is A; the folder is named after the connecting peer, B.
    opens = [e for e in events if e["event"] == "open"]
    assert len(opens) == 1 and opens[0]["node"] == "upstream"
    folder = proxy.capture_dir / str(opens[0]["peer"])
    assert folder.name.startswith("127.0.0.1_") and folder.name != f"127.0.0.1_{listen}"
    check_capture(folder, miner, node_is_b=False, events=events)


def test_socks5(tmp_path: Path, miner: BcoinNode) -> None:
    socks = free_port()
    proxy, events = run_route(
        tmp_path, miner,
        ["--socks5", f"127.0.0.1:{socks}", "--route", f"127.0.0.1:{free_port()}=127.0.0.1:1"],
        [f"--proxy=127.0.0.1:{socks}", f"--only=127.0.0.1:{miner.port}"],
    )  # fmt: skip
    opens = [e for e in events if e["event"] == "open"]
    assert len(opens) == 1 and opens[0]["route"] == "socks5"
    folder = proxy.capture_dir / f"127.0.0.1_{miner.port}"
    check_capture(folder, miner, node_is_b=True, events=events)


def test_default_config_banner(tmp_path: Path) -> None:
    """`msgcap proxy` with no config listens on loopback and says how to use it."""
    if any(_in_use(p) for p in (9050, 18555)):
        pytest.skip("default ports 9050/18555 are taken on this machine")
    proc = subprocess.Popen(
        [sys.executable, "-m", "msgcap", "proxy"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert proc.stdout is not None
    banner = [proc.stdout.readline() for _ in range(4)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    text = "".join(banner)
    assert "127.0.0.1:18555 -> 127.0.0.1:18444" in text
    assert "-proxy=127.0.0.1:9050" in text
    assert (tmp_path / "message_capture" / "events.jsonl").exists()


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
