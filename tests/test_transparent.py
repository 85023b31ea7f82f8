"""The transparent route: capture a node that has no proxy flag at all.

Unit tests (everywhere): the perspective decision, the original-destination lookup's
fallback, the nftables rules text, the config keys and flags.

With real Bitcoin Core in network namespaces of its own (root, ``ip`` and ``nft``; skipped
visibly otherwise, required when ``MSGCAP_REQUIRE_NETNS`` is set, as CI does):

- three namespaces, A linked to B (10.213.1.1 - 10.213.1.2) and to C (10.213.2.1 -
  10.213.2.2); bitcoind A, B and C, with ``-capturemessages`` and no proxy flag;
- ``msgcap proxy --transparent 0.0.0.0:PORT`` runs in A's namespace, and the rules
  ``msgcap transparent-rules`` prints are applied there: A's connections to B's port and
  peers' connections to A's port go to the proxy; its own (marked) connections do not;
- A dials B by its private address (``addnode``), B mines, A syncs; C dials A by A's
  address, and syncs from A;
- every node reports v2 for every connection (two BIP324 sessions per proxied
  connection, one per leg, as the event log says);
- the proxy's folders are named as Core names peers: B's address and port (exactly A's
  own folder), and C's address and port (C's ``addrbind``); each equals A's own
  ``-capturemessages`` message for message, and mirrors B's and C's;
- a connection made straight to the proxy's listener is refused with an event.
"""

from __future__ import annotations

import asyncio
import ctypes
import http.client
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture.errors import ConfigError
from msgcap.capture.framing import encode_frame
from msgcap.cli import build_parser as _build_parser
from msgcap.cli import main, proxy_config
from msgcap.proxy.config import DEFAULT_MARK, HostPort, config_from_dict
from msgcap.proxy.transparent import (
    Kind,
    classify,
    is_local,
    nft_rules,
    original_destination,
)
from tests.bitcoind import (
    RPC_HEADERS,
    BitcoinNode,
    ProxyProcess,
    compare_captures,
    msgcap,
    require_bitcoind,
    wait_synced,
    wait_until,
)
from tests.conftest import logged, read_events, recv_at_least, running_proxy, wait_until_async

ENV_REQUIRE = "MSGCAP_REQUIRE_NETNS"

# --- the decision, without sockets ------------------------------------------------------

LOCAL = {"10.213.1.1", "10.213.2.1", "127.0.0.1"}


def local(host: str) -> bool:
    return host in LOCAL


def test_classify_outbound_inbound_loop() -> None:
    out = classify(HostPort("10.213.1.2", 18444), 8338, None, local)
    assert out.kind is Kind.OUTBOUND and out.upstream == HostPort("10.213.1.2", 18444)
    inbound = classify(HostPort("10.213.2.1", 18445), 8338, None, local)
    assert inbound.kind is Kind.INBOUND and inbound.upstream == HostPort("10.213.2.1", 18445)
    loop = classify(HostPort("127.0.0.1", 8338), 8338, None, local)
    assert loop.kind is Kind.LOOP and "own listener" in loop.reason
    # A remote peer that happens to listen on the proxy's port is no loop.
    assert classify(HostPort("10.213.1.2", 8338), 8338, None, local).kind is Kind.OUTBOUND


def test_classify_with_node_address() -> None:
    """msgcap in a router: the node's address decides, not the router's own."""
    node = "10.213.1.1"
    assert classify(HostPort(node, 18444), 8338, node, lambda h: False).kind is Kind.INBOUND
    assert classify(HostPort("::ffff:10.213.1.1", 1), 8338, node, lambda h: False).kind is (
        Kind.INBOUND
    )
    peer = HostPort("198.51.100.7", 8333)
    assert classify(peer, 8338, node, lambda h: False).kind is Kind.OUTBOUND


def test_is_local() -> None:
    assert is_local("127.0.0.1")
    assert not is_local("192.0.2.1")  # TEST-NET-1: nobody's
    assert not is_local("not-an-address")


def test_original_destination_without_redirect() -> None:
    """No NAT entry (TPROXY, or a connection straight to the listener): the local
    address is the destination."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, _ = server.accept()
            with conn:
                assert original_destination(conn) == HostPort("127.0.0.1", port)


def test_rules_text() -> None:
    text = nft_rules(node_port=18444, listen_port=8338)
    assert "tcp dport 18444 redirect to :8338" in text
    assert text.count(f"meta mark 0x{DEFAULT_MARK:x} return") == 2
    assert "hook output" in text and "hook prerouting" in text
    router = nft_rules(node_port=18445, listen_port=8338, mark=7, peer_ports=[18444, 8333],
                       node="10.213.1.1", netns="r 1")  # fmt: skip
    assert router.startswith("ip netns exec 'r 1' nft -f - <<'EOF'\n")
    assert "ip saddr 10.213.1.1 tcp dport { 8333, 18444 } redirect to :8338" in router
    assert "ip daddr 10.213.1.1 tcp dport 18445 redirect to :8338" in router
    assert "meta mark 0x7 return" in router and "hook output" not in router
    assert "meta mark" not in nft_rules(node_port=1, listen_port=2, mark=0)


def test_rules_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["transparent-rules", "--listen-port", "8338", "--node-port", "18444",
                 "--mark", "0x10"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out == nft_rules(node_port=18444, listen_port=8338, mark=0x10)
    assert main(["transparent-rules", "--listen-port", "8338", "--node-port", "0"]) == 2
    assert main(["transparent-rules", "--listen-port", "1", "--node-port", "2",
                 "--node", "x"]) == 2  # fmt: skip


def test_config_and_flags(tmp_path: Path) -> None:
    table = {"listen": "0.0.0.0:8338", "node": "10.213.1.1", "mark": 0x10, "node_name": "a"}
    cfg = config_from_dict({"transparent": [table]})
    (tp,) = cfg.transparent
    assert (tp.listen, tp.node, tp.mark, tp.node_name) == (
        HostPort("0.0.0.0", 8338), "10.213.1.1", 0x10, "a")  # fmt: skip
    assert config_from_dict({"transparent": {"listen": "[::]:1"}}).transparent[0].mark == (
        DEFAULT_MARK
    )
    for bad, message in (
        ({"listen": "0.0.0.0:1", "node": "10.0.0.1:5"}, "not an IP address"),
        ({"listen": "0.0.0.0:1", "mark": -1}, "32-bit"),
        ({"listen": "0.0.0.0:1", "peer": "a:1"}, "unknown key"),
        ({"node": "10.0.0.1"}, "needs 'listen'"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"transparent": [bad]})
    # `--transparent` alone is a whole config: no default forward route or SOCKS5.
    args = _build_parser().parse_args(["proxy", "--transparent", "0.0.0.0:8338@n1",
                                       "--transparent-mark", "0x20"])  # fmt: skip
    cfg = proxy_config(args)
    assert cfg.routes == () and cfg.socks5 == ()
    assert [(t.listen.port, t.node_name, t.mark) for t in cfg.transparent] == [(8338, "n1", 0x20)]
    with pytest.raises(ConfigError, match="needs a transparent route"):
        proxy_config(_build_parser().parse_args(["proxy", "--transparent-node", "10.0.0.1"]))


async def test_loop_is_refused(tmp_path: Path) -> None:
    """A connection straight to the transparent listener (its original destination is the
    listener itself) is refused and logged, never dialed. No redirect, no root: mark 0."""
    transparent = [{"listen": "127.0.0.1:0", "mark": 0}]
    async with running_proxy(tmp_path, transparent=transparent) as proxy:
        ((host, port),) = proxy.addresses
        reader, writer = await asyncio.open_connection(host, port)
        try:
            assert await asyncio.wait_for(reader.read(1), 10) == b""
        except ConnectionResetError:
            pass
        writer.close()
        await wait_until_async(logged(tmp_path / "cap", "upstream_error"), 10)
    (event,) = read_events(tmp_path / "cap", "upstream_error")
    assert event["upstream"] == f"127.0.0.1:{port}" and "own listener" in event["error"]
    assert not read_events(tmp_path / "cap", "open")
    (listen,) = read_events(tmp_path / "cap", "listen")
    assert listen["route"] == "transparent"


# --- network namespaces -----------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def require_netns() -> None:
    """Root, ``ip`` and ``nft``; else skip with the reason (fail under MSGCAP_REQUIRE_NETNS)."""
    reason = None
    if os.geteuid() != 0:
        reason = "network namespaces need root"
    else:
        missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
        if missing:
            reason = f"{' and '.join(missing)} not installed (Debian: iproute2, nftables)"
    if reason is None:
        return
    if os.environ.get(ENV_REQUIRE) not in (None, "", "0"):
        pytest.fail(f"{reason} ({ENV_REQUIRE} is set)", pytrace=False)
    pytest.skip(reason)


def run(*cmd: str, stdin: str | None = None) -> str:
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30,
                         check=False)  # fmt: skip
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr}"
    return res.stdout


def ns_socket(ns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket that lives in network namespace ``ns`` (made in a thread that entered
    it: the namespace is a thread's, and a socket keeps the one it was made in)."""
    out: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            out.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    (result,) = out
    if isinstance(result, BaseException):
        raise result
    return result


class Netns:
    """Namespaces ``<prefix>a``, ``b``, ``c``: A-B on 10.213.1.0/24 and A-C on
    10.213.2.0/24 (veth pairs made straight inside them). :meth:`close` deletes them."""

    A_B, B = "10.213.1.1", "10.213.1.2"
    A_C, C = "10.213.2.1", "10.213.2.2"
    A_B6, B6 = "fd00:213:1::1", "fd00:213:1::2"

    def __init__(self) -> None:
        pid = os.getpid()
        self.prefix = f"msgcap-t-{pid}-"
        self.names = {k: f"{self.prefix}{k}" for k in "abc"}
        self.made: list[str] = []
        try:
            for name in self.names.values():
                run("ip", "netns", "add", name)
                self.made.append(name)
                run("ip", "-n", name, "link", "set", "lo", "up")
            tag = pid % 10_000_000
            for x, y, ax, ay in (("a", "b", self.A_B, self.B), ("a", "c", self.A_C, self.C)):
                ix, iy = f"mt{tag}{x}{y}", f"mt{tag}{y}{x}"
                run("ip", "link", "add", ix, "netns", self.names[x], "type", "veth",
                    "peer", "name", iy, "netns", self.names[y])  # fmt: skip
                for ns, dev, addr in ((self.names[x], ix, ax), (self.names[y], iy, ay)):
                    run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                    run("ip", "-n", ns, "link", "set", dev, "up")
            for ns, addr in ((self.names["a"], self.A_B6), (self.names["b"], self.B6)):
                dev = f"mt{tag}ab" if ns == self.names["a"] else f"mt{tag}ba"
                run("ip", "-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for name in self.made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                           check=False)  # fmt: skip
        self.made = []


@pytest.fixture
def netns() -> Iterator[Netns]:
    require_netns()
    spaces = Netns()
    try:
        yield spaces
    finally:
        spaces.close()


class NsNode(BitcoinNode):
    """A :class:`BitcoinNode` run inside a network namespace (``ip netns exec``), its RPC
    reached through a socket made in that namespace."""

    def __init__(self, ns: str, workdir: Path, name: str, extra: list[str]) -> None:
        self.ns = ns
        wrapper = workdir / f"bitcoind-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {ns} {require_bitcoind()} "$@"\n')
        wrapper.chmod(0o755)
        super().__init__(workdir, name, extra, binary=wrapper)

    def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        sock = ns_socket(self.ns)
        try:
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", self.rpc_port))
            conn = http.client.HTTPConnection("127.0.0.1", self.rpc_port, timeout=timeout)
            conn.sock = sock
            conn.request("POST", path, body, RPC_HEADERS)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            sock.close()


def ns_proxy(ns: str, workdir: Path, *flags: str) -> ProxyProcess:
    """``msgcap proxy`` inside namespace ``ns``; started once its banner is out."""
    return ProxyProcess(workdir, *flags, prefix=("ip", "netns", "exec", ns))


LISTEN_PORT = 8338
CAPTURE = "-capturemessages"
NOBAN = "-whitelist=noban@10.213.0.0/16"


def v2_peers(node: BitcoinNode, n: int) -> list[dict[str, Any]]:
    """``n`` peers, all past the version handshake, or raise after a while."""

    def ready() -> list[dict[str, Any]] | None:
        peers = node.peers()
        return peers if len(peers) == n and all(p.get("version") for p in peers) else None

    return wait_until(ready, 30, f"{n} handshaken peers on {node.name}", poll=0.1)


def test_transparent_ipv6_outbound(netns: Netns, tmp_path: Path) -> None:
    """IPv6: the original destination comes from IP6T_SO_ORIGINAL_DST; Core's folder name
    for an IPv6 peer (``[fd00_213_1__2]_18555``)."""
    ns_a, ns_b = netns.names["a"], netns.names["b"]
    proxy = ns_proxy(ns_a, tmp_path / "proxy", "--transparent", f"0.0.0.0:{LISTEN_PORT}",
                     "--transparent", f"[::]:{LISTEN_PORT}")  # fmt: skip
    try:
        rules = msgcap("transparent-rules", "--listen-port", str(LISTEN_PORT), "--node-port",
                       "18444", "--peer-port", "18555", "--netns", ns_a)  # fmt: skip
        run("sh", stdin=rules.stdout)
        magic = bytes.fromhex("fabfb5da")
        version = encode_frame(magic, "version", bytes(range(100)))
        verack = encode_frame(magic, "verack", b"")
        with ns_socket(ns_b, socket.AF_INET6) as server:
            server.bind((netns.B6, 18555))
            server.listen()
            server.settimeout(10)
            with ns_socket(ns_a, socket.AF_INET6) as node:
                node.settimeout(10)
                node.connect((netns.B6, 18555))
                node.sendall(version)
                peer, (source, *_) = server.accept()
                with peer:
                    peer.settimeout(10)
                    assert source == netns.A_B6  # the proxy, from A's address
                    assert recv_at_least(peer, len(version)) == version
                    peer.sendall(verack)
                    assert recv_at_least(node, len(verack)) == verack
        wait_until(logged(proxy.capture_dir, "close"), 10, "close")
    finally:
        assert proxy.stop() == 0, proxy.stderr()
    folder = "[fd00_213_1__2]_18555"
    assert sorted(p.name for p in proxy.capture_dir.iterdir()) == [folder, "events.jsonl"]
    (opened,) = read_events(proxy.capture_dir, "open")
    assert opened["peer"] == folder and opened["node"] == "client"
    assert opened["route"] == "transparent"
    res = msgcap("parse", "--jsonl", str(proxy.capture_dir / folder))
    assert [(m["direction"], m["msgtype"]) for m in map(json.loads, res.stdout.splitlines())] == [
        ("sent", "version"), ("recv", "verack")]  # fmt: skip


def test_transparent_core_in_namespaces(netns: Netns, tmp_path: Path) -> None:
    require_bitcoind()
    started = time.monotonic()
    nodes: list[BitcoinNode] = []
    proxy: ProxyProcess | None = None
    took: dict[str, float] = {}
    try:
        ns_a, ns_b, ns_c = (netns.names[k] for k in "abc")
        b = NsNode(ns_b, tmp_path / "nodes", "b", [CAPTURE, NOBAN, f"-bind={netns.B}"])
        nodes.append(b)
        # A: no proxy flag, no peer on its command line; it listens on its C-side address.
        a = NsNode(ns_a, tmp_path / "nodes", "a", [CAPTURE, NOBAN, f"-bind={netns.A_C}"])
        nodes.append(a)
        proxy = ns_proxy(ns_a, tmp_path / "proxy", "--transparent", f"0.0.0.0:{LISTEN_PORT}",
                         "--v2", "decrypt")  # fmt: skip
        assert "transparent 0.0.0.0:8338" in proxy.stdout_path.read_text()
        rules = msgcap("transparent-rules", "--listen-port", str(LISTEN_PORT),
                       "--node-port", str(a.port), "--peer-port", str(b.port),
                       "--netns", ns_a)  # fmt: skip
        assert rules.returncode == 0, rules.stderr
        run("sh", stdin=rules.stdout)
        assert "redirect to :8338" in run("ip", "netns", "exec", ns_a, "nft", "list", "ruleset")
        took["setup"] = round(time.monotonic() - started, 2)

        # A dials B by its private address; the kernel hands the connection to msgcap.
        a.rpc("addnode", f"{netns.B}:{b.port}", "add")
        (a_to_b,) = v2_peers(a, 1)
        b.create_wallet()
        b.mine(5)
        wait_synced([a, b])
        # C dials A by A's address: an inbound connection of A, through msgcap too.
        c = NsNode(ns_c, tmp_path / "nodes", "c",
                   [CAPTURE, NOBAN, f"-connect={netns.A_C}:{a.port}"])  # fmt: skip
        nodes.append(c)
        wait_synced([a, b, c])
        assert a.height() == c.height() == 5
        took["sync"] = round(time.monotonic() - started - took["setup"], 2)

        # A connection straight to the listener (from A's namespace) is a loop: refused.
        direct = ns_socket(ns_a)
        with direct:
            direct.settimeout(10)
            direct.connect(("127.0.0.1", LISTEN_PORT))
            try:
                assert direct.recv(1) == b""
            except ConnectionResetError:
                pass

        a_peers = v2_peers(a, 2)
        (b_peer,) = v2_peers(b, 1)
        (c_peer,) = v2_peers(c, 1)
        a_to_b = next(p for p in a_peers if not p["inbound"])
        a_from_c = next(p for p in a_peers if p["inbound"])
        for p in (*a_peers, b_peer, c_peer):
            assert p["transport_protocol_type"] == "v2", p
        # A believes it talks to B itself; C believes it talks to A itself.
        assert a_to_b["addr"] == f"{netns.B}:{b.port}" and a_to_b["connection_type"] == "manual"
        assert c_peer["addr"] == f"{netns.A_C}:{a.port}"
        # Each leg is its own BIP324 session: the ids differ across the proxy.
        assert a_to_b["session_id"] != b_peer["session_id"]
        assert a_from_c["session_id"] != c_peer["session_id"]

        time.sleep(1.0)  # let the last pings settle before stopping the proxy first
        assert proxy.stop() == 0, proxy.stderr()
        for node in nodes:
            assert node.stop() == 0
        took["total"] = round(time.monotonic() - started, 2)

        out_folder = f"{netns.B}_{b.port}"  # Core's own name for B, in A's capture
        in_folder = c_peer["addrbind"].replace(":", "_")  # C's address and port
        assert in_folder.startswith(f"{netns.C}_")
        ours = sorted(p.name for p in proxy.capture_dir.iterdir())
        assert ours == sorted([out_folder, in_folder, "events.jsonl"]), ours

        events = proxy.events()
        kinds = Counter(e["event"] for e in events)
        assert set(kinds) == {"listen", "v2_session", "open", "close", "upstream_error",
                              "stop"}, events  # fmt: skip
        opens = {e["peer"]: e for e in events if e["event"] == "open"}
        assert set(opens) == {out_folder, in_folder}, events
        assert opens[out_folder]["route"] == opens[in_folder]["route"] == "transparent"
        assert opens[out_folder]["node"] == "client"
        assert opens[in_folder]["node"] == "upstream"
        assert opens[in_folder]["client"] == c_peer["addrbind"]
        (loop,) = [e for e in events if e["event"] == "upstream_error"]
        assert loop["upstream"] == f"127.0.0.1:{LISTEN_PORT}" and "own listener" in loop["error"]
        sessions = {e["session_id"] for e in events if e["event"] == "v2_session"}
        assert sessions == {a_to_b["session_id"], b_peer["session_id"],
                            a_from_c["session_id"], c_peer["session_id"]}  # fmt: skip

        # Message for message: A's own capture, and the other end mirrored.
        a_folders = {p.name for p in a.capture_dir.iterdir()}
        a_in = a_from_c["addr"].replace(":", "_")  # A sees the proxy's socket
        assert a_folders == {out_folder, a_in}, a_folders
        pairs = [
            (a.capture_dir / out_folder, out_folder, False),
            (a.capture_dir / a_in, in_folder, False),
            (b.capture_dir / b_peer["addr"].replace(":", "_"), out_folder, True),
            (c.capture_dir / c_peer["addr"].replace(":", "_"), in_folder, True),
        ]
        counts = {}
        for core, folder, mirror in pairs:
            rc, results, text = compare_captures(core, proxy.capture_dir / folder, mirror)
            assert rc == 0 and all(r["identical"] and r["a_count"] > 0 for r in results), text
            counts[f"{core.parent.parent.parent.name}:{folder}"] = sum(
                r["a_count"] for r in results
            )
        took["total_with_checks"] = round(time.monotonic() - started, 2)
        print(f"\ntransparent: seconds {took}, messages compared {counts}")
    finally:
        if proxy is not None:
            proxy.stop()
        for node in reversed(nodes):
            node.stop()
