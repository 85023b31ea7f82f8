"""Real Bitcoin Core carries large messages through ``msgcap proxy`` under ``v2 = decrypt``.

BIP324 packets past 64 KiB: a v2 packet's length field is 3 bytes, so a ``tx`` of 90 kB
or a ``block`` of 950 kB is one packet the proxy must decrypt on one leg, capture, and
encrypt again on the other. Both nodes speak v2 (``-v2transport=1``, the default); the
node reaches its peer only through the proxy's outbound route, and every node runs
``-capturemessages``.

- :func:`test_large_transactions_relay` relays a transaction of more than 64 KiB each way
  (OP_RETURN data outputs) and mines each into a block;
- :func:`test_sync_near_1mb_blocks` has a fresh node sync a chain whose last blocks are
  each near 1 MB (about ten 95 kB transactions), through the proxy, after it was built.

Checked: both mempools hold each big transaction before it is mined, both nodes reach
the same tip, ``getpeerinfo`` on both nodes says v2 for the proxied connection (with the
session ids the proxy logged), the proxy's event log holds one connection that stayed
open until the proxy was stopped, the proxy's capture equals each node's own capture
message for message (``msgcap compare``; ``--mirror`` for the far node), and the
captured ``tx``/``block`` payloads are byte for byte what ``getrawtransaction`` and
``getblock HASH 0`` return.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture.framing import hash256
from tests.bitcoind import (
    BURN,
    CAPTURE,
    FAST_RELAY,
    MATURITY,
    BitcoinNode,
    CaptureRecord,
    Laps,
    NodeFactory,
    ProxyProcess,
    capture_folder_name,
    compare_captures,
    free_port,
    handshaken,
    only_capture_folder,
    only_peer,
    read_capture,
    wait_quiet,
    wait_until,
)

pytestmark = pytest.mark.e2e

V2_BIG = 1 << 16  # 65,536: the payload size past which v2 packets once broke
FEE_RATE = 2  # sat/vB, well above Core's minimum relay fee

# Near-1 MB blocks: TXS_PER_BLOCK transactions of DATA_PER_TX bytes of OP_RETURN data. A
# 95 kB data output is a 95,006-byte script (OP_RETURN OP_PUSHDATA4 len data), under
# -datacarriersize (100,000, all data outputs of a transaction together); the
# transaction weighs about 380,500 WU, under the 400,000 WU standardness limit; ten of
# them and a coinbase weigh about 3.81 M WU, under the 4 M WU block limit.
DATA_PER_TX = 95_000
TXS_PER_BLOCK = 10
BIG_BLOCKS = 3
MIN_BLOCK_SIZE = 900_000


# --- building large transactions -------------------------------------------------------


def send_data_tx(
    node: BitcoinNode,
    data_size: int,
    *,
    inputs: list[dict[str, Any]] | None = None,
    pay: dict[str, float] | None = None,
) -> str:
    """A wallet transaction with one OP_RETURN output of ``data_size`` random bytes (and
    the payments in ``pay``), funded by the wallet (from exactly ``inputs`` if given),
    signed and sent; returns its txid."""
    outputs: list[dict[str, Any]] = [{"data": os.urandom(data_size).hex()}]
    outputs += [{address: amount} for address, amount in (pay or {}).items()]
    raw = node.wallet_rpc("createrawtransaction", inputs or [], outputs)
    funded = node.wallet_rpc(
        "fundrawtransaction", raw, {"fee_rate": FEE_RATE, "add_inputs": inputs is None}
    )
    signed = node.wallet_rpc("signrawtransactionwithwallet", funded["hex"])
    assert signed["complete"], signed
    txid: str = node.rpc("sendrawtransaction", signed["hex"], timeout=60)
    return txid


def raw_tx(node: BitcoinNode, txid: str) -> bytes:
    """The transaction as the node serializes it (with witness), from its mempool."""
    return bytes.fromhex(node.rpc("getrawtransaction", txid))


def block_hash(payload: bytes) -> str:
    """The hash of a serialized block (its 80-byte header), as RPC prints it."""
    return hash256(payload[:80])[::-1].hex()


# --- the proxied pair -------------------------------------------------------------------


def proxied_pair(
    nodes: NodeFactory,
    start_proxy: Callable[..., ProxyProcess],
    far: BitcoinNode,
    name: str,
    *extra: str,
) -> tuple[BitcoinNode, ProxyProcess, str]:
    """A proxy under ``decrypt`` with an outbound route to ``far``, and a new node
    ``name`` dialing its listener (and nothing else). Returns the node, the proxy and the
    listener address."""
    listen = f"127.0.0.1:{free_port()}"
    proxy = start_proxy("--route", f"{listen}={far.address}", "--socks5", "off", "--v2", "decrypt")
    node = nodes(name, CAPTURE, *extra, f"-connect={listen}")
    return node, proxy, listen


def diagnose(proxy: ProxyProcess) -> str:
    """What the proxy logged beyond the usual (the first few), for assertion messages."""
    usual = {"listen", "v2_session", "open"}
    unusual = [e for e in proxy.events() if e["event"] not in usual]
    return (
        f"proxy events beyond the usual ({len(unusual)}): {json.dumps(unusual[:4])}\n"
        f"proxy stderr: {proxy.stderr()[-3000:]}"
    )


def wait_proxied(
    proxy: ProxyProcess, predicate: Callable[[], bool], timeout: float, what: str
) -> None:
    """:func:`wait_until` ``predicate``, failing at once (with the proxy's events) if the
    proxy logs a ``close``: the one connection must stay open until the proxy stops."""

    def step() -> bool:
        if any(e["event"] == "close" for e in proxy.events()):
            raise AssertionError(f"{what}: the proxy closed the connection\n{diagnose(proxy)}")
        return predicate()

    try:
        wait_until(step, timeout, what, poll=0.2)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{diagnose(proxy)}") from None


def in_mempools(group: list[BitcoinNode], txid: str) -> Callable[[], bool]:
    return lambda: all(txid in n.mempool() for n in group)


def at_tip(group: list[BitcoinNode], tip: str) -> Callable[[], bool]:
    return lambda: all(n.tip() == tip for n in group)


def wait_connected(proxy: ProxyProcess, *group: BitcoinNode, timeout: float = 30) -> None:
    """Until each node has exactly one peer whose version handshake is done."""
    wait_proxied(proxy, handshaken(*group), timeout, f"one handshaken peer on each of {group}")


def relay_and_mine(
    proxy: ProxyProcess,
    sender: BitcoinNode,
    miner: BitcoinNode,
    data_size: int,
    pay: dict[str, float] | None = None,
) -> tuple[str, bytes, str]:
    """``sender`` sends a transaction with ``data_size`` bytes of data (and ``pay``); both
    mempools hold it, byte for byte the same; ``miner`` mines it and both nodes reach that
    block. Returns the txid, the raw transaction and the block hash."""
    group = [sender, miner]
    txid = send_data_tx(sender, data_size, pay=pay)
    wait_proxied(proxy, in_mempools(group, txid), 30, f"{txid} in both mempools")
    raw = raw_tx(sender, txid)
    assert raw_tx(miner, txid) == raw
    (block,) = miner.mine(1, BURN)
    wait_proxied(proxy, at_tip(group, block), 30, f"both at {block}")
    return txid, raw, block


def check_v2_peers(node: BitcoinNode, far: BitcoinNode, proxy: ProxyProcess, listen: str) -> None:
    """Both ends of the proxied connection are v2, each with the session id the proxy
    logged for its leg; the node's peer is the listener, the far node's the proxy."""
    near_peer, far_peer = only_peer(node), only_peer(far)
    assert near_peer["addr"] == listen and not near_peer["inbound"], near_peer
    assert far_peer["inbound"] and far_peer["addrbind"] == far.address, far_peer
    assert far_peer["addr"] != near_peer["addrbind"], (far_peer, near_peer)  # the proxy's
    for peer in (near_peer, far_peer):
        assert peer["transport_protocol_type"] == "v2", peer
        assert len(peer["session_id"]) == 64, peer
    sessions = {e["leg"]: e for e in proxy.events() if e["event"] == "v2_session"}
    assert sessions["client"]["role"] == "responder", sessions
    assert sessions["client"]["session_id"] == near_peer["session_id"], sessions
    assert sessions["upstream"]["session_id"] == far_peer["session_id"], sessions
    assert near_peer["session_id"] != far_peer["session_id"]


def stop_all(proxy: ProxyProcess, *group: BitcoinNode) -> None:
    """Nothing in flight, then the proxy (exit 0), then the nodes (exit 0)."""
    wait_quiet(*group)
    assert proxy.stop() == 0, proxy.stderr()
    for node in group:
        assert node.stop() == 0, node.name


def check_events(proxy: ProxyProcess, folder: Path) -> None:
    """One connection, open until the proxy stopped, every message captured; the
    ``close`` counts match the capture files."""
    events = proxy.events()
    kinds = Counter(e["event"] for e in events)
    assert set(kinds) == {"listen", "v2_session", "open", "close", "stop"}, diagnose(proxy)
    assert kinds["open"] == kinds["close"] == 1 and kinds["v2_session"] == 2, diagnose(proxy)
    (closed,) = [e for e in events if e["event"] == "close"]
    assert events.index(closed) == len(events) - 2, diagnose(proxy)  # just before "stop"
    for direction in ("recv", "sent"):
        stats = closed[direction]
        records = len(read_capture(folder / f"msgs_{direction}.dat"))
        assert stats["messages"] == stats["captured"] == records, (direction, stats, records)
        assert stats["invalid"] == 0, (direction, stats)


def check_captures(
    proxy: ProxyProcess, proxy_folder: str, near: BitcoinNode, near_folder: str, far: BitcoinNode
) -> Path:
    """The proxy's capture is its only folder and equals ``near``'s own capture, and,
    mirrored, ``far``'s; returns the proxy's folder."""
    ours = proxy.capture_dir / proxy_folder
    assert sorted(p.name for p in proxy.capture_dir.iterdir()) == sorted(
        [proxy_folder, "events.jsonl"]
    )
    for node, mirror, expected in ((near, False, near_folder), (far, True, None)):
        folder = only_capture_folder(node)
        if expected is not None:
            assert folder.name == expected, (node.name, folder)
        rc, results, text = compare_captures(folder, ours, mirror=mirror)
        assert rc == 0 and all(r["identical"] for r in results), f"{node.name}: {text}"
        assert all(r["a_count"] == r["b_count"] > 0 for r in results), f"{node.name}: {text}"
    return ours


def publish(
    record_property: Callable[[str, object], None],
    key: str,
    what: str,
    laps: Laps,
    **sizes: list[int],
) -> None:
    """The test's sizes and the seconds each phase took: a property ``key`` (in the JUnit
    XML) and a line printed as ``what``."""
    report = {**sizes, "seconds": laps.total()}
    record_property(key, report)
    print(f"\n{what}: {json.dumps(report)}")


def by_type(records: list[CaptureRecord], msgtype: str) -> list[bytes]:
    return [r.payload for r in records if r.msgtype == msgtype]


# --- the tests --------------------------------------------------------------------------


def test_large_transactions_relay(
    nodes: NodeFactory,
    start_proxy: Callable[..., ProxyProcess],
    record_property: Callable[[str, object], None],
) -> None:
    """A (the proxy's node) and B relay a > 64 KiB transaction each way under decrypt."""
    laps = Laps()
    b = nodes("b", CAPTURE, FAST_RELAY)
    a, proxy, listen = proxied_pair(nodes, start_proxy, b, "a", FAST_RELAY)
    wait_connected(proxy, a, b)
    a.create_wallet()
    b.create_wallet()
    a.mine(MATURITY)
    wait_proxied(proxy, at_tip([b], a.tip()), 30, "b at a's tip")
    laps.lap("setup")

    # A -> B: 90 kB of data, and 1 BTC to B so that B can send one back; B mines it, so
    # the block goes B -> A.
    tx_ab, raw_ab, block_ab = relay_and_mine(proxy, a, b, 90_000, pay={b.new_address(): 1.0})
    laps.lap("tx_a_to_b")

    # B -> A: 70 kB of data, from the coin A sent (one confirmation); A mines it.
    tx_ba, raw_ba, block_ba = relay_and_mine(proxy, b, a, 70_000)
    laps.lap("tx_b_to_a")

    # Each transaction is in its block on both nodes.
    for node in (a, b):
        assert tx_ab in node.rpc("getblock", block_ab, 1)["tx"]
        assert tx_ba in node.rpc("getblock", block_ba, 1)["tx"]
    assert a.tip() == b.tip() == block_ba and a.height() == b.height() == MATURITY + 2
    assert a.mempool() == b.mempool() == []
    check_v2_peers(a, b, proxy, listen)
    stop_all(proxy, a, b)

    ours = check_captures(proxy, capture_folder_name(b.address), a, capture_folder_name(listen), b)
    check_events(proxy, ours)
    # A sent the first transaction and received the second: each exactly once, whole.
    sent_txs = by_type(read_capture(ours / "msgs_sent.dat"), "tx")
    recv_txs = by_type(read_capture(ours / "msgs_recv.dat"), "tx")
    assert len(raw_ab) > V2_BIG and len(raw_ba) > V2_BIG, (len(raw_ab), len(raw_ba))
    assert sent_txs == [raw_ab], [len(t) for t in sent_txs]
    assert recv_txs == [raw_ba], [len(t) for t in recv_txs]

    publish(record_property, "large_tx", "large transactions", laps,
            tx_sizes=[len(raw_ab), len(raw_ba)])  # fmt: skip


def test_sync_near_1mb_blocks(
    nodes: NodeFactory,
    start_proxy: Callable[..., ProxyProcess],
    record_property: Callable[[str, object], None],
) -> None:
    """M builds a chain ending in near-1 MB blocks alone; then S, started only then,
    syncs it from M through the proxy under decrypt."""
    laps = Laps()
    m = nodes("m", CAPTURE)
    m.create_wallet()
    # TXS_PER_BLOCK mature coinbases; each block's change outputs fund the next one.
    m.mine(MATURITY - 1 + TXS_PER_BLOCK)
    big: list[str] = []
    for _ in range(BIG_BLOCKS):
        coins = sorted(
            m.wallet_rpc("listunspent", 1), key=lambda u: float(u["amount"]), reverse=True
        )[:TXS_PER_BLOCK]
        assert len(coins) == TXS_PER_BLOCK, coins
        txids = [
            send_data_tx(m, DATA_PER_TX, inputs=[{"txid": c["txid"], "vout": c["vout"]}])
            for c in coins
        ]
        assert set(m.mempool()) == set(txids)
        (block,) = m.mine(1, BURN)
        assert m.mempool() == [], "not every transaction fit in the block"
        info = m.rpc("getblock", block, 1)
        assert info["nTx"] == TXS_PER_BLOCK + 1, info["nTx"]
        assert info["size"] >= MIN_BLOCK_SIZE, info["size"]
        big.append(block)
    tip, height = m.tip(), m.height()
    assert tip == big[-1]
    laps.lap("build_chain")

    s, proxy, listen = proxied_pair(nodes, start_proxy, m, "s")
    wait_proxied(proxy, at_tip([s], tip), 60, f"{s.name} at {m.name}'s tip {tip}")
    assert s.height() == height
    laps.lap("sync")
    check_v2_peers(s, m, proxy, listen)
    raw_blocks = {h: bytes.fromhex(m.rpc("getblock", h, 0, timeout=60)) for h in big}
    stop_all(proxy, s, m)

    ours = check_captures(proxy, capture_folder_name(m.address), s, capture_folder_name(listen), m)
    check_events(proxy, ours)
    # S downloaded every block of the chain exactly once, the big ones byte for byte.
    payloads = by_type(read_capture(ours / "msgs_recv.dat"), "block")
    received = {block_hash(p): p for p in payloads}
    assert len(payloads) == len(received) == height, (len(payloads), len(received), height)
    for h, raw in raw_blocks.items():
        assert len(raw) >= MIN_BLOCK_SIZE
        assert received[h] == raw, (h, len(received[h]), len(raw))

    publish(record_property, "near_1mb_blocks", "near-1 MB blocks", laps,
            block_sizes=[len(r) for r in raw_blocks.values()])  # fmt: skip
