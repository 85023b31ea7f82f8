"""Many real bitcoind nodes behind one ``msgcap proxy``: each named node's captures equal
its own ``-capturemessages``, and two unnamed nodes reaching one peer at the same time
are never captured into one file."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bitcoind import (
    BURN,
    NodeFactory,
    ProxyProcess,
    compare_captures,
    msgcap,
    only_capture_folder,
    wait_synced,
)

pytestmark = pytest.mark.e2e


def sent_versions(folder: Path) -> int:
    res = msgcap("parse", "--jsonl", "--direction", "sent", "--type", "version",
                 str(folder / "msgs_sent.dat"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    return len(res.stdout.splitlines())


@pytest.mark.parametrize("route", ["socks5", "forward"])
def test_named_nodes_equal_their_own_captures(
    nodes: NodeFactory, start_proxy: Callable[..., ProxyProcess], route: str
) -> None:
    peer_port: list[int] = []

    def dial(name: str) -> list[str]:
        i = int(name[1:]) - 1
        if route == "socks5":
            return [f"-proxy={proxy_addrs[i]}", f"-connect=localhost:{peer_port[0]}"]
        return [f"-connect={proxy_addrs[i]}"]

    # The peer's port is needed before the proxy starts: start n0 first through the factory.
    n0 = nodes("n0")
    peer_port.append(n0.port)
    if route == "socks5":
        proxy = start_proxy("--socks5", "127.0.0.1:0@n1", "--socks5", "127.0.0.1:0@n2")
    else:
        proxy = start_proxy("--socks5", "off",
                            "--route", f"127.0.0.1:0={n0.address}@n1",
                            "--route", f"127.0.0.1:0={n0.address}@n2")  # fmt: skip
    proxy_addrs = _listeners(proxy, "SOCKS5" if route == "socks5" else "outbound route")
    n1 = nodes("n1", "-capturemessages", *dial("n1"))
    n2 = nodes("n2", "-capturemessages", *dial("n2"))
    n0.mine(12, BURN)
    wait_synced([n0, n1, n2], 60)
    for n in (n1, n2):
        (p,) = n.peers()
        assert p["transport_protocol_type"] == "v2"  # decrypt, the default
        n.stop()
    assert proxy.stop() == 0
    peer = f"localhost_{n0.port}" if route == "socks5" else f"127.0.0.1_{n0.port}"
    for name, node in (("n1", n1), ("n2", n2)):
        ours = proxy.capture_dir / name / peer
        rc, _, text = compare_captures(only_capture_folder(node), ours)
        assert rc == 0, text
    events = proxy.events()
    opens = [e for e in events if e["event"] == "open"]
    assert sorted(e["node_name"] for e in opens) == ["n1", "n2"]
    assert not [e for e in events if e["event"] == "capture_apart"]
    assert "node n1" in proxy.banner and "node n2" in proxy.banner


def test_unnamed_nodes_to_one_peer_are_captured_apart(
    nodes: NodeFactory, start_proxy: Callable[..., ProxyProcess]
) -> None:
    n0 = nodes("n0")
    proxy = start_proxy("--socks5", "127.0.0.1:0")
    (socks,) = _listeners(proxy, "SOCKS5")
    dial = [f"-proxy={socks}", f"-connect=localhost:{n0.port}"]
    n1 = nodes("n1", "-capturemessages", *dial)
    n2 = nodes("n2", "-capturemessages", *dial)
    n0.mine(12, BURN)
    wait_synced([n0, n1, n2], 60)
    n1.stop()
    n2.stop()
    assert proxy.stop() == 0
    main = proxy.capture_dir / f"localhost_{n0.port}"
    folders = sorted({p.parent for p in main.rglob("msgs_sent.dat")})
    assert len(folders) == 2 and main in folders, folders
    for folder in folders:  # each file holds one conversation: one version sent
        assert sent_versions(folder) == 1, folder
    (apart,) = [e for e in proxy.events() if e["event"] == "capture_apart"]
    assert apart["live_capture"] == str(main) and Path(apart["capture"]) in folders
    for node in (n1, n2):  # each node's own capture equals one of the two folders
        results = [compare_captures(only_capture_folder(node), f)[0] for f in folders]
        assert sorted(results) == [0, 1], (node, results)


def _listeners(proxy: ProxyProcess, kind: str) -> list[str]:
    """The bound ``host:port`` of each ``kind`` listener (``SOCKS5`` or ``outbound
    route``), in config order, as the banner prints them."""
    return re.findall(rf"{kind} (\S+?):? ", proxy.banner)
