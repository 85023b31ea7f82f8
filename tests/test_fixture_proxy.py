"""The ``msgcap_proxy`` fixture over real loopback sockets, with a scripted peer: typed
messages up to date as soon as they are forwarded, and a clean stop at teardown."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from contextlib import closing

import pytest

from msgcap.capture.errors import ConfigError
from msgcap.capture.framing import encode_frame
from msgcap.parser.messages import Verack, Version
from msgcap.parser.structures import AddressV1
from msgcap.proxy.server import StartupError
from msgcap.testing import ProxyFactory, RunningProxy
from tests.conftest import MAGIC, echo_server, recv_at_least, route_to

pytest_plugins = ["pytester"]

NOWHERE = AddressV1(None, 0, bytes(10) + b"\xff\xff" + bytes(4), 0)


def handshake(user_agent: str, nonce: int) -> bytes:
    """A v1 ``version`` then ``verack``, on the wire."""
    version = Version(70016, 1, 1_700_000_000, NOWHERE, NOWHERE, nonce, user_agent, 0, 1)
    return encode_frame(MAGIC, "version", version.encode()) + encode_frame(MAGIC, "verack", b"")


def connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """The scripted peer's listening socket."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(10)
        yield sock


def test_handshake_is_captured_typed(msgcap_proxy: ProxyFactory, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    proxy = msgcap_proxy({"route": route_to(port)})
    assert proxy.socks5 is None and len(proxy.routes) == 1
    assert proxy.routes[0].startswith("127.0.0.1:") and not proxy.routes[0].endswith(":0")
    assert proxy.address(0) == proxy.routes[0]
    assert proxy.messages() == [] and proxy.peers() == []

    node_says, peer_says = handshake("/node/", 1), handshake("/peer/", 2)
    with closing(connect(proxy.routes[0])) as node:
        node.sendall(node_says)
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(10)
            assert recv_at_least(peer, len(node_says)) == node_says
            peer.sendall(peer_says)
            assert recv_at_least(node, len(peer_says)) == peer_says
            # Forwarded, so captured: no waiting needed.
            messages = proxy.messages()

    assert [(m.direction, m.msgtype) for m in messages] == [
        ("sent", "version"),
        ("sent", "verack"),
        ("recv", "version"),
        ("recv", "verack"),
    ]
    versions = [m.message for m in messages if isinstance(m.message, Version)]
    assert [v.user_agent for v in versions] == ["/node/", "/peer/"]
    assert [v.nonce for v in versions] == [1, 2]
    assert isinstance(messages[1].message, Verack)
    assert [m.time for m in messages] == sorted(m.time for m in messages)

    peer_name = f"127.0.0.1_{port}"
    assert proxy.peers() == [peer_name]
    assert proxy.peer_dir(f"127.0.0.1:{port}") == proxy.capture_dir / peer_name
    assert proxy.messages(f"127.0.0.1:{port}") == messages == proxy.messages(peer_name)
    assert proxy.messages("127.0.0.1:1") == []
    assert (proxy.peer_dir(peer_name) / "msgs_sent.dat").is_file()

    assert [e["event"] for e in proxy.events()][:2] == ["listen", "open"]
    (opened,) = proxy.events("open")
    assert opened["peer"] == peer_name and opened["node"] == "client"

    proxy.stop()  # also safe to call again (the fixture does)
    assert not proxy.running
    assert proxy.messages() == messages  # read from the files once stopped
    close = proxy.events("close")
    assert len(close) == 1 and close[0]["sent"]["messages"] == 2
    assert proxy.events()[-1]["event"] == "stop"
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.routes[0]).close()


def test_options(msgcap_proxy: ProxyFactory, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keyword arguments, None for "leave out", a capture_dir of one's own, SOCKS5 with
    port 0, and several proxies in one test."""
    own = tmp_path_factory.mktemp("own")
    a = msgcap_proxy(socks5={"listen": "127.0.0.1:0"}, capture_dir=own, event_log=None)
    b = msgcap_proxy(
        {"route": [{"listen": "127.0.0.1:0", "node": "127.0.0.1:1"}] * 2, "socks5": None}
    )
    assert isinstance(a, RunningProxy) and a.capture_dir == own
    assert a.routes == [] and a.socks5 is not None and a.addresses == [a.socks5]
    assert not a.socks5.endswith(":0")
    assert len(b.routes) == 2 and b.socks5 is None and len(set(b.routes)) == 2
    assert b.capture_dir != a.capture_dir and b.capture_dir.is_dir()
    assert [e["event"] for e in b.events()] == ["listen", "listen"]


def test_startup_errors(msgcap_proxy: ProxyFactory, listener: socket.socket) -> None:
    with pytest.raises(ConfigError, match="nothing to listen on"):
        msgcap_proxy({})
    with pytest.raises(ConfigError, match="unknown key"):
        msgcap_proxy({"routes": []})
    taken = f"127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(StartupError, match=f"cannot listen on {taken} .*: Address already in use"):
        msgcap_proxy(route=[{"listen": taken, "peer": "127.0.0.1:1"}])


INNER = """
import os, socket, threading
from pathlib import Path

HELD = {}
NODE_SAYS = bytes.fromhex("%s")


def connect(address):
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_leave_everything_open(msgcap_proxy):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    peer_at = "127.0.0.1:%%d" %% listener.getsockname()[1]
    first = msgcap_proxy({"route": [{"listen": "127.0.0.1:0", "peer": peer_at}],
                          "socks5": {"listen": "127.0.0.1:0"}})
    second = msgcap_proxy(route=[{"listen": "127.0.0.1:0", "peer": peer_at}])
    node = connect(first.routes[0])
    node.sendall(NODE_SAYS)
    peer, _ = listener.accept()
    peer.settimeout(10)
    got = b""
    while len(got) < len(NODE_SAYS):
        got += peer.recv(65536)
    assert [m.msgtype for m in first.messages()] == ["version", "verack"]
    HELD.update(listener=listener, node=node, peer=peer, first=first, second=second)


def test_after_teardown():
    first, second = HELD["first"], HELD["second"]
    for address in first.addresses + second.addresses:
        try:
            connect(address).close()
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError(f"{address} still accepts")
    assert HELD["node"].recv(1) == b""  # the proxy closed both sides
    assert HELD["peer"].recv(1) == b""
    dirs = [str(p.capture_dir.resolve()) for p in (first, second)]
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        assert not target.startswith(tuple(dirs)), target
    threads = [t.name for t in threading.enumerate() if t.name.startswith("msgcap")]
    assert threads == []
    assert not first.running and not second.running
    assert first.events()[-1]["event"] == "stop" == second.events()[-1]["event"]
    assert [m.msgtype for m in first.messages()] == ["version", "verack"]
    for sock in ("node", "peer", "listener"):
        HELD[sock].close()
"""


def test_teardown_stops_every_proxy(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pytest run of its own, with warnings as errors and Python's dev mode: after
    the test, every listener is closed, every connection and file too, no thread is
    left, and nothing warned."""
    pytester.makepyfile(INNER % handshake("/node/", 1).hex())
    monkeypatch.setenv("PYTHONDEVMODE", "1")
    flags = ("-p", "no:cacheprovider", "-p", "no:asyncio", "-W", "error", "-rA")
    result = pytester.runpytest_subprocess(*flags)
    result.assert_outcomes(passed=2)
    assert "warning" not in result.stdout.str().lower(), result.stdout.str()
    assert textwrap.dedent(result.stderr.str()).strip() == ""


def test_several_nodes_behind_one_proxy(msgcap_proxy: ProxyFactory) -> None:
    """Two named nodes on one proxy: each node's messages, and all of them merged."""
    import asyncio

    async def scenario() -> tuple[str, RunningProxy]:
        server = await echo_server()
        port = server.sockets[0].getsockname()[1]
        peer = f"127.0.0.1:{port}"
        proxy = await asyncio.to_thread(msgcap_proxy, {"route": [
            {"listen": "127.0.0.1:0", "peer": peer, "node_name": "n1"},
            {"listen": "127.0.0.1:0", "peer": peer, "node_name": "n2"},
        ]})  # fmt: skip
        for i, listen in enumerate(proxy.routes):
            host, p = listen.rsplit(":", 1)
            r, w = await asyncio.open_connection(host, int(p))
            frame = handshake(f"/n{i + 1}/", i + 1)
            w.write(frame)
            await w.drain()
            assert await r.readexactly(len(frame)) == frame
            w.close()
        server.close()
        return peer, proxy

    peer, proxy = asyncio.run(scenario())
    for i, node in enumerate(("n1", "n2")):
        got = proxy.messages(peer, node=node)
        sent = [m.msgtype for m in got if m.direction == "sent"]
        assert sent == ["version", "verack"] and len(got) == 4  # and the echo
        assert isinstance(got[0].message, Version) and got[0].message.nonce == i + 1
        assert proxy.peers(node) == [proxy.peer_dir(peer).name]
    assert len(proxy.messages()) == 8 and proxy.peers() == []  # no unnamed node captured
