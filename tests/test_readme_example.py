"""The README's example tests, as written there (keeps the README true)."""

import pytest

from tests.bitcoind import NodeFactory, wait_until
from tests.conftest import PAIR_A

CAPTURE = PAIR_A
"""The README's ``CAPTURE``: node a's capture of its peer b, written by Bitcoin Core."""


def test_recorded_handshake(msgcap_capture):  # type: ignore[no-untyped-def]
    messages = msgcap_capture(CAPTURE)  # typed messages, in time order
    sent = [m.msgtype for m in messages if m.direction == "sent"]
    assert sent[:4] == ["version", "wtxidrelay", "sendaddrv2", "verack"]
    assert messages[0].message.user_agent == "/Satoshi:30.99.0/"


@pytest.fixture
def regtest_nodes(nodes: NodeFactory) -> NodeFactory:
    """``regtest_nodes(name, *bitcoind_args)`` starts a regtest bitcoind (skips without
    one: see tests/bitcoind.py); all are stopped when the test ends. The README's name
    for tests/conftest.py's ``nodes``."""
    return nodes


def test_node_behind_the_proxy(msgcap_proxy, regtest_nodes):  # type: ignore[no-untyped-def]
    peer = regtest_nodes("peer")
    proxy = msgcap_proxy({"route": [{"listen": "127.0.0.1:0", "peer": peer.address}]})
    node = regtest_nodes("node", f"-connect={proxy.routes[0]}")  # dials the peer via the proxy
    block_hash = peer.rpc("generatetodescriptor", 1, "raw(51)")[0]
    wait_until(lambda: node.tip() == block_hash, timeout=15)

    messages = proxy.messages()  # typed, time order; "sent" by the node, "recv" from the peer
    handshake = [(m.direction, m.msgtype) for m in messages[:2]]
    assert handshake == [("sent", "version"), ("recv", "version")]
    assert messages[0].message.user_agent.startswith("/Satoshi:")
    blocks = [m.message.block for m in messages if m.msgtype == "block"]
    assert [b.hash[::-1].hex() for b in blocks] == [block_hash]  # RPC shows hashes reversed
