"""Hostile network conditions: SOCKS5 allow lists against real destinations, and file
descriptor exhaustion (idle metrics connections, a full descriptor table).

The allow-list decision is a plain object fed a destination (and, when it asks for
them, the addresses it resolves to); it is tested here directly, exhaustively, without
sockets. A few loopback cases check the same through a proxy end to end (reply 2, "not
allowed by ruleset"). Descriptor exhaustion runs ``msgcap proxy`` as a process with a
lowered ``RLIMIT_NOFILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import ipaddress
import os
import re
import resource
import socket
import socketserver
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from msgcap.capture.errors import ConfigError
from msgcap.proxy import server as server_module
from msgcap.proxy.config import (
    AllowEntry,
    NamePattern,
    OctetPattern,
    config_from_dict,
)
from msgcap.proxy.listener import Listener, RateLimit, bind
from msgcap.proxy.metrics import Metrics, respond
from msgcap.proxy.socks5 import AllowList, Dial, Refuse, Resolve, destination_address
from tests.conftest import (
    PING,
    VERSION,
    ProxyProcess,
    Upstream,
    echo_server,
    free_port,
    logged,
    read_events,
    recv_at_least,
    route_to,
    running_proxy,
    wait_until,
    wait_until_async,
)

# --- SOCKS5 allow lists: the syntax ------------------------------------------------------


def entry(text: str) -> AllowEntry:
    return AllowEntry.parse(text, "socks5.allow[0]")


def allow(*texts: str) -> AllowList:
    return AllowList([entry(t) for t in texts])


V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network


@pytest.mark.parametrize(
    "text,host,port",
    [
        ("*", None, None),
        ("*:*", None, None),
        ("*:8333", None, 8333),
        ("localhost", "localhost", None),
        ("LocalHost.:18444", "localhost", 18444),
        ("*.onion:8333", "*.onion", 8333),
        ("**.example.org", "**.example.org", None),
        ("seed?.bitcoin.test:8333", "seed?.bitcoin.test", 8333),
        ("203.0.113.7", V4("203.0.113.7/32"), None),
        ("203.0.113.7:8333", V4("203.0.113.7/32"), 8333),
        ("203.0.113.0/24:8333", V4("203.0.113.0/24"), 8333),
        ("203.0.113.*:8333", OctetPattern((203, 0, 113, None)), 8333),
        ("10.*.*.1", OctetPattern((10, None, None, 1)), None),
        ("[2001:db8::1]:8333", V6("2001:db8::1/128"), 8333),
        ("[2001:db8::/32]", V6("2001:db8::/32"), None),
        ("2001:db8::/32", V6("2001:db8::/32"), None),
        ("::1", V6("::1/128"), None),
        ("[::ffff:127.0.0.1]:1", V4("127.0.0.1/32"), 1),
        ("[::ffff:0:0/96]:*", V4("0.0.0.0/0"), None),
        ("0.0.0.0/0:8333", V4("0.0.0.0/0"), 8333),
    ],
)
def test_allow_entry_syntax(text: str, host: Any, port: int | None) -> None:
    e = entry(text)
    got = e.host.text if isinstance(e.host, NamePattern) else e.host
    assert (got, e.port) == (host, port)


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "no host"),
        (":8333", "no host"),
        ("host:port", "is not 0-65535"),
        ("host:65536", "is not 0-65535"),
        ("host:83*", "is not 0-65535"),
        ("[::1", "expected [IPV6]"),
        ("[::1]8333", "expected [IPV6]"),
        ("[10.0.0.1]:1", "brackets are for IPv6"),
        ("[fe80::1%lo]:1", "zone ids"),
        ("127.000.000.001", "usual form: 127.0.0.1"),
        ("0x7f.1:1", "usual form: 127.0.0.1"),
        ("2130706433:1", "usual form: 127.0.0.1"),
        ("010.0.0.1", "usual form: 8.0.0.1"),
        ("10.0.0.1/33", "not an IPv4 network"),
        ("10.0.0.1/8", "has host bits set"),
        ("[2001:db8::1/32]", "has host bits set"),
        ("10.1*.0.1", "IPv4 glob takes '*' for whole octets"),
        ("203.0.113.7*:8333", "IPv4 glob"),
        ("1.2.3.4.5", "IPv4 glob"),
        ("foo.123", "last label is never all digits"),
        ("a..b", "is not a DNS label"),
        ("a b:1", "is not a DNS label"),
        ("a/b:1", "not an IPv4 network"),
        ("a_b!:1", "is not a DNS label"),
        ("bü.example", "xn--"),
        ("a.**.b", "only the whole first label"),
        ("x**.b", "only the whole first label"),
        ("a" * 64 + ".example", "is not a DNS label"),
    ],
)
def test_allow_entry_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        entry(text)


def test_allow_list_in_config_names_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"socks5.allow\[1\]: '203.0.113.7\*:8333'"):
        config_from_dict({"socks5": {"listen": "127.0.0.1:1",
                                     "allow": ["*.onion:8333", "203.0.113.7*:8333"]}})  # fmt: skip


def test_documented_examples() -> None:
    """config.example.toml's allow list and the claims next to it."""
    text = (Path(__file__).parent.parent / "config.example.toml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("# allow = "))
    example = tomllib.loads(line.removeprefix("# "))["allow"]
    cfg = config_from_dict({"socks5": {"listen": "127.0.0.1:1", "allow": example}})
    assert len(cfg.socks5[0].allow) == 4
    onion, local = allow("*.onion"), allow("127.0.0.1")
    assert isinstance(onion.decide("abc.onion", 1), Dial)
    assert isinstance(onion.decide("onion", 1), Refuse)
    assert isinstance(onion.decide("a.b.onion", 1), Refuse)
    assert isinstance(allow("seed*.example").decide("seed1.example", 1), Dial)
    deep = allow("**.example")
    assert [isinstance(deep.decide(n, 1), Dial) for n in ("a.example", "a.b.example", "example")
            ] == [True, True, False]  # fmt: skip
    for form in ("127.000.000.001", "127.1", "0x7f.0.0.1", "2130706433", "::ffff:127.0.0.1"):
        assert local.decide(form, 1) == Dial(("127.0.0.1",)), form
    assert isinstance(local.decide("010.0.0.1", 1), Refuse)
    assert isinstance(allow("localhost").decide("127.1", 1), Refuse)
    assert local.decide("localhost", 1) == Resolve("localhost")


# --- SOCKS5 allow lists: the decision -------------------------------------------------


NAMES = ("localhost:18444", "*.onion:8333", "**.example.org", "seed?.bitcoin.test:8333")
ADDRESSES = ("203.0.113.7:8333", "198.51.100.0/24", "10.*.*.1:8333", "[2001:db8::/32]:8333")


@pytest.mark.parametrize(
    "entries,host,port,verdict",
    [
        # Name entries: label by label, case-insensitive, trailing dot ignored.
        (NAMES, "localhost", 18444, Dial(("localhost",))),
        (NAMES, "LOCALHOST.", 18444, Dial(("LOCALHOST.",))),
        (NAMES, "localhost", 18445, Refuse),
        (NAMES, "localhost.evil.example", 18444, Refuse),
        (NAMES, "evil-localhost", 18444, Refuse),
        (NAMES, "abcdef.onion", 8333, Dial(("abcdef.onion",))),
        (NAMES, "ABCDEF.ONION.", 8333, Dial(("ABCDEF.ONION.",))),
        (NAMES, "onion", 8333, Refuse),
        (NAMES, "a.b.onion", 8333, Refuse),
        (NAMES, "abc.onion.evil.example", 8333, Refuse),
        (NAMES, "abconion", 8333, Refuse),
        (NAMES, "abc.onion", 8334, Refuse),
        (NAMES, "a.example.org", 1, Dial(("a.example.org",))),
        (NAMES, "a.b.c.example.org", 1, Dial(("a.b.c.example.org",))),
        (NAMES, "example.org", 1, Refuse),
        (NAMES, "a.example.org.evil", 1, Refuse),
        (NAMES, "seed1.bitcoin.test", 8333, Dial(("seed1.bitcoin.test",))),
        (NAMES, "seed12.bitcoin.test", 8333, Refuse),
        (NAMES, "seed.bitcoin.test", 8333, Refuse),
        # A name entry never admits an address, whatever text it is in.
        (NAMES, "127.0.0.1", 18444, Refuse),
        (NAMES, "2130706433", 18444, Refuse),
        # Address entries: compared as addresses.
        (ADDRESSES, "203.0.113.7", 8333, Dial(("203.0.113.7",))),
        (ADDRESSES, "203.000.113.007", 8333, Dial(("203.0.113.7",))),
        (ADDRESSES, "0xcb.0.113.7", 8333, Dial(("203.0.113.7",))),
        (ADDRESSES, "3405803783", 8333, Dial(("203.0.113.7",))),
        (ADDRESSES, "203.0.28935", 8333, Dial(("203.0.113.7",))),
        (ADDRESSES, "::ffff:203.0.113.7", 8333, Dial(("203.0.113.7",))),
        (ADDRESSES, "0:0:0:0:0:FFFF:CB00:7107", 8333, Dial(("203.0.113.7",))),
        (ADDRESSES, "203.0.113.8", 8333, Refuse),
        (ADDRESSES, "203.0.113.7", 8334, Refuse),
        (ADDRESSES, "::203.0.113.7", 8333, Refuse),  # IPv4-compatible is not IPv4
        (ADDRESSES, "64:ff9b::cb00:7107", 8333, Refuse),  # NAT64 is not IPv4 either
        (ADDRESSES, "198.51.100.200", 1, Dial(("198.51.100.200",))),
        (ADDRESSES, "0306.063.0144.0310", 1, Dial(("198.51.100.200",))),  # octal
        (ADDRESSES, "198.51.101.1", 1, Refuse),
        (ADDRESSES, "10.20.30.1", 8333, Dial(("10.20.30.1",))),
        (ADDRESSES, "010.20.30.1", 8333, Refuse),  # octal 010 is 8
        (ADDRESSES, "10.20.30.2", 8333, Refuse),
        (ADDRESSES, "2001:db8::7", 8333, Dial(("2001:db8::7",))),
        (ADDRESSES, "2001:DB8:0:0::7", 8333, Dial(("2001:db8::7",))),
        (ADDRESSES, "2001:db9::7", 8333, Refuse),
        # A name only address entries could admit: look it up first.
        (ADDRESSES, "203.0.113.7.evil.example", 8333, Resolve("203.0.113.7.evil.example")),
        (ADDRESSES, "seed.example", 1, Resolve("seed.example")),
        (ADDRESSES, "127.0.0.1.", 8333, Resolve("127.0.0.1.")),  # a name: not the address
        (("203.0.113.7:8333",), "203.0.113.7.evil.example", 8334, Refuse),  # no entry on 8334
        # '*' admits everything on its port.
        (("*:8333",), "a.b.c", 8333, Dial(("a.b.c",))),
        (("*:8333",), "::ffff:127.0.0.1", 8333, Dial(("127.0.0.1",))),
        (("*:8333",), "a.b.c", 8334, Refuse),
        # Not a host name at all.
        (ADDRESSES, "../../etc", 8333, Refuse),
        (ADDRESSES, "fe80::1%lo", 8333, Refuse),
        (ADDRESSES, "127.0.0.1\n", 8333, Refuse),
        (NAMES, "seed1.bitcoin.test\n", 8333, Refuse),
        (ADDRESSES, "", 8333, Refuse),
        # No allow list: everything.
        ((), "anything.example", 1, Dial(("anything.example",))),
    ],
)
def test_allow_list_decides(entries: tuple[str, ...], host: str, port: int, verdict: Any) -> None:
    got = allow(*entries).decide(host, port)
    if verdict is Refuse:
        assert isinstance(got, Refuse), got
        assert "not in allow list" in got.reason
    else:
        assert got == verdict


@pytest.mark.parametrize(
    "addresses,verdict",
    [
        (["203.0.113.7"], Dial(("203.0.113.7",))),
        (["::ffff:203.0.113.7"], Dial(("203.0.113.7",))),
        (["10.0.0.2", "203.0.113.7"], Dial(("203.0.113.7",))),  # only what is admitted
        (["203.0.113.7", "2001:db8::1", "203.0.113.7"], Dial(("203.0.113.7", "2001:db8::1"))),
        (["10.0.0.2", "203.0.113.8"], Refuse),
        (["::1", "127.0.0.1"], Refuse),
        ([], Refuse),  # did not resolve
        (["not an address"], Refuse),
    ],
)
def test_allow_list_checks_what_a_name_resolves_to(addresses: list[str], verdict: Any) -> None:
    got = allow(*ADDRESSES).resolved("seed.example", 8333, addresses)
    if verdict is Refuse:
        assert isinstance(got, Refuse) and "not in allow list" in got.reason, got
    else:
        assert got == verdict


# Property tests: names against a reference matcher, addresses in every text form.

_label = st.from_regex(r"[ab1](?:[ab1-]{0,2}[ab1])?", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)
_glob_label = st.from_regex(r"[ab1*?-]{1,4}", fullmatch=True)


def reference_match(pattern: str, name: str) -> bool:
    """Label by label with fnmatch, ``**`` first: one or more labels."""
    p = pattern.lower().removesuffix(".").split(".")
    n = name.lower().removesuffix(".").split(".")
    if p[0] == "**":
        p = p[1:]
        if len(n) <= len(p):
            return False
        n = n[len(n) - len(p) :] if p else []
    return len(p) == len(n) and all(fnmatch.fnmatchcase(x, y) for x, y in zip(n, p, strict=True))


@settings(max_examples=400, deadline=None)
@given(
    pattern=st.tuples(st.booleans(), st.lists(_glob_label, min_size=1, max_size=3)),
    name=_names,
    upper=st.booleans(),
    dot=st.booleans(),
)
def test_name_patterns_match_whole_labels(
    pattern: tuple[bool, list[str]], name: str, upper: bool, dot: bool
) -> None:
    text = ".".join((["**"] if pattern[0] else []) + pattern[1])
    assume(text != "*")  # that is "any destination"
    try:
        e = entry(f"{text}:8333")
    except ConfigError:
        assume(False)
        raise
    request = (name.upper() if upper else name) + ("." if dot else "")
    want = reference_match(text, name) and not name.rpartition(".")[2].isdigit()
    got = AllowList([e]).decide(request, 8333)
    assert got == (Dial((request,)) if want else got), got
    assert isinstance(got, Dial) == want, (text, request, got)
    if want and not text.startswith("**"):  # a glob never crosses a dot
        assert name.count(".") == text.count(".")


def ipv4_forms(a: int) -> list[str]:
    """Text that the resolver reads as the IPv4 address ``a``."""
    o = a.to_bytes(4, "big")
    return [
        ".".join(str(x) for x in o),
        ".".join(f"0{x:o}" for x in o),
        ".".join(f"0x{x:x}" for x in o),
        ".".join(f"0X{x:X}" for x in o),
        str(a),
        f"0x{a:x}",
        f"0{a:o}",
        f"{o[0]}.{a & 0xFFFFFF}",
        f"{o[0]}.{o[1]}.{a & 0xFFFF}",
        f"::ffff:{ipaddress.IPv4Address(a)}",
        f"0:0:0:0:0:ffff:{a >> 16:x}:{a & 0xFFFF:x}",
        f"::FFFF:{a >> 16:X}:{a & 0xFFFF:X}",
    ]


_ipv4 = st.integers(0, 2**32 - 1)
_networks = st.tuples(_ipv4, st.integers(0, 32)).map(
    lambda t: ipaddress.IPv4Network((t[0], t[1]), strict=False)
)


@settings(max_examples=300, deadline=None)
@given(address=_ipv4, net=_networks, octets=st.lists(st.booleans(), min_size=4, max_size=4))
def test_addresses_are_compared_as_addresses(
    address: int, net: ipaddress.IPv4Network, octets: list[bool]
) -> None:
    a = ipaddress.IPv4Address(address)
    # An octet pattern from the address of the network, some octets '*'.
    stars = ".".join("*" if s else str(x) for s, x in zip(octets, net.network_address.packed,
                                                           strict=True))  # fmt: skip
    for text, admits in ((str(net), a in net), (stars, "*" in stars and all(
        s or x == y for s, x, y in zip(octets, net.network_address.packed, a.packed, strict=True)
    ))):  # fmt: skip
        if "*" not in text and "/" not in text:
            continue
        decision = AllowList([entry(f"{text}:8333")])
        for form in ipv4_forms(address):
            got = decision.decide(form, 8333)
            assert got == (Dial((str(a),)) if admits else got), (text, form, got)
            assert isinstance(got, Dial) == admits, (text, form, got)


@settings(max_examples=200, deadline=None)
@given(address=_ipv4)
def test_numeric_hosts_are_read_as_the_resolver_reads_them(address: int) -> None:
    """Every text form is the address for getaddrinfo too (without DNS: numeric only)."""
    for form in ipv4_forms(address):
        info = socket.getaddrinfo(form, 1, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        resolver = ipaddress.ip_address(info[0][4][0])
        ours = destination_address(form)
        assert ours is not None
        mapped = resolver.ipv4_mapped if isinstance(resolver, ipaddress.IPv6Address) else None
        assert ours == (mapped or resolver) == ipaddress.IPv4Address(address), form


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(host=st.text(st.characters(codec="ascii"), max_size=30), port=st.integers(0, 65535))
def test_arbitrary_hosts_never_reach_a_denied_address(host: str, port: int) -> None:
    """Whatever the text: with only 127.0.0.1 allowed, the proxy dials 127.0.0.1 or
    resolves the name first (and then dials only 127.0.0.1), or refuses."""
    decision = allow("127.0.0.1:*")
    got = decision.decide(host, port)
    if isinstance(got, Dial):
        assert got.hosts == ("127.0.0.1",)
        numeric = socket.getaddrinfo(host, 1, flags=socket.AI_NUMERICHOST)
        assert {ipaddress.ip_address(i[4][0]) for i in numeric} <= {
            ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::ffff:127.0.0.1"),
        }
    elif isinstance(got, Resolve):
        assert destination_address(host) is None
        after = decision.resolved(host, port, ["10.0.0.1", "::ffff:127.0.0.1", "::1"])
        assert after == Dial(("127.0.0.1",))
        assert isinstance(decision.resolved(host, port, ["10.0.0.1", "::1"]), Refuse)
    else:
        assert isinstance(got, Refuse)


# --- SOCKS5 allow lists, end to end -----------------------------------------------------


def socks_request(host: str | bytes, port: int) -> bytes:
    """Greeting (NOAUTH) and a CONNECT request: ``bytes`` is a raw IPv4 (4) or IPv6 (16)
    address, ``str`` is sent as ATYP DOMAINNAME (as Bitcoin Core sends everything)."""
    if isinstance(host, bytes):
        atyp, addr = (1 if len(host) == 4 else 4), host
    else:
        atyp, addr = 3, bytes((len(host),)) + host.encode()
    return b"\x05\x01\x00" + bytes((5, 1, 0, atyp)) + addr + port.to_bytes(2, "big")


async def socks_connect(socks_port: int, host: str | bytes, port: int) -> int:
    """The SOCKS5 reply code for CONNECT ``host:port``; on success, checks that the
    connection relays (a version frame comes back from the echo server)."""
    r, w = await asyncio.open_connection("127.0.0.1", socks_port)
    try:
        w.write(socks_request(host, port))
        head = await asyncio.wait_for(r.readexactly(2 + 10), 10)
        assert head[:2] == b"\x05\x00" and head[2] == 5, head
        code = head[3]
        if code == 0:
            w.write(VERSION)
            assert await asyncio.wait_for(r.readexactly(len(VERSION)), 5) == VERSION
        return code
    finally:
        w.close()


# (request host, which port: 1 to 4, expected reply). The listener allows the name
# localhost on port 1, the address 127.0.0.1 on port 2, 127.0.0.2 on port 3 (where
# nothing listens) and 127.0.0.* on port 4. An echo server listens on 1, 2 and 4.
E2E_CASES: dict[str, tuple[str | bytes, int, int]] = {
    "name entry: case does not matter": ("LocalHost", 1, 0),
    "name entry does not allow the address it resolves to": ("127.0.0.1", 1, 2),
    "glob does not cross a dot": ("localhost.evil.example", 1, 2),
    "address entry allows a name that resolves to it": ("localhost", 2, 0),
    "name that looks like an allowed address": ("127.0.0.1.evil.invalid", 2, 2),
    "name resolving to a denied address is refused": ("localhost", 3, 2),
    "address with leading zeros is that address": ("127.000.000.001", 2, 0),
    "one-number IPv4 form is that address": ("2130706433", 2, 0),
    "octal form of another address is refused": ("0177.0.0.2", 2, 2),
    "IPv4-mapped IPv6 (as text) is the IPv4 address": ("::ffff:127.0.0.1", 2, 0),
    "IPv4-mapped IPv6 (ATYP 4) is the IPv4 address": (bytes(10) + b"\xff\xff\x7f\0\0\1", 2, 0),
    "IPv4-mapped IPv6 of a denied address is refused": ("::ffff:7f00:2", 2, 2),
    "address on another port is refused": (b"\x7f\0\0\1", 3, 2),
    "IPv4 glob is compared with addresses": ("0x7f.0.0.1", 4, 0),
    "IPv4 glob does not match a name": ("127.0.0.1.evil.invalid", 4, 2),
}


@pytest.mark.parametrize("name", list(E2E_CASES))
async def test_socks_allow_list_end_to_end(tmp_path: Path, name: str) -> None:
    host, which, expected = E2E_CASES[name]
    servers = [await echo_server() for _ in range(3)]
    ports = [int(s.sockets[0].getsockname()[1]) for s in servers]
    ports.insert(2, free_port())
    allow = [f"localhost:{ports[0]}", f"127.0.0.1:{ports[1]}", f"127.0.0.2:{ports[2]}",
             f"127.0.0.*:{ports[3]}"]  # fmt: skip
    try:
        async with running_proxy(
            tmp_path,
            socks5={"listen": "127.0.0.1:0", "allow": allow},
            limits={"handshake_timeout": 5},
        ) as proxy:
            code = await socks_connect(proxy.addresses[0][1], host, ports[which - 1])
    finally:
        for s in servers:
            s.close()
    assert code == expected, f"reply {code}, expected {expected}"
    if expected == 2:
        refused = read_events(tmp_path / "cap", "socks_error")
        assert refused and refused[-1]["reply"] == "NOT_ALLOWED", refused


# --- descriptor exhaustion --------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        with contextlib.suppress(OSError):
            while data := sock.recv(1 << 16):
                sock.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def threaded_echo() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def relay_connection(port: int, timeout: float) -> socket.socket | None:
    """A connection through the proxy's route that relays (a version frame comes back
    from the echo server within ``timeout``), or None."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(VERSION)
        got = recv_at_least(s, len(VERSION))
    except OSError:
        got = b""
    if got != VERSION:
        s.close()
        return None
    return s


def relays(s: socket.socket, timeout: float = 5) -> bool:
    s.settimeout(timeout)
    try:
        s.sendall(PING)
        return recv_at_least(s, len(PING)) == PING
    except OSError:
        return False


def open_idle(port: int, n: int, budget: float = 3.0) -> list[socket.socket]:
    """Up to ``n`` connections that never send a byte, as many as connect within
    ``budget`` seconds (a server that stops accepting fills its backlog)."""
    out: list[socket.socket] = []
    deadline = time.monotonic() + budget
    while len(out) < n and time.monotonic() < deadline:
        s = socket.socket()
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        out.append(s)
    return out


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the other end closed ``s`` (EOF, after whatever it sent, or a reset);
    False while it is open."""
    try:
        while s.recv(1 << 16):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


METRICS_IDLE_TIMEOUT = 5.0
"""The metrics server's read timeout (msgcap.proxy.metrics.READ_TIMEOUT)."""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_descriptor_exhaustion_does_not_stall_the_relay(tmp_path: Path) -> None:
    with threaded_echo() as echo:
        route, metrics = free_port(), free_port()
        proxy = ProxyProcess(
            tmp_path,
            "--route", f"127.0.0.1:{route}=127.0.0.1:{echo}",
            "--socks5", "off",
            "--metrics", f"127.0.0.1:{metrics}",
            "--handshake-timeout", "5",
        )  # fmt: skip
        held: list[socket.socket] = []
        idle: list[socket.socket] = []
        try:
            honest = relay_connection(route, 5)
            assert honest is not None
            held.append(honest)
            pid = proxy.proc.pid
            limit = fd_count(pid) + 24
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))

            # 1. Hundreds of idle metrics connections: the relay goes on, new
            # connections are accepted.
            started = time.monotonic()
            idle = open_idle(metrics, 300)
            time.sleep(0.5)
            assert relays(honest), "the established connection stopped relaying"
            second = relay_connection(route, 5)
            assert second is not None, "no new connection accepted: " + proxy.stderr()
            held.append(second)
            assert fd_count(pid) < limit

            # 2. Fill the descriptor table with relay connections: the exhaustion is
            # logged, established connections keep relaying.
            extra: list[socket.socket] = []
            for _ in range(40):
                if read_events(proxy.capture_dir, "resource_exhausted"):
                    break
                s = relay_connection(route, 1.5)
                if s is not None:
                    extra.append(s)
            wait_until(lambda: read_events(proxy.capture_dir, "resource_exhausted"), 5,
                       f"a resource_exhausted event ({len(extra)} more connections)")  # fmt: skip
            assert all(relays(s) for s in held), "an established connection stopped"
            # 3. Descriptors free up: accepting resumes.
            for s in extra:
                s.close()
            later = wait_until(lambda: relay_connection(route, 2), 15, "a new connection")
            held.append(later)
            assert relays(honest)

            # 4. Idle metrics connections are closed after the read timeout; the
            # endpoint still answers.
            deadline = started + METRICS_IDLE_TIMEOUT + 5
            wait_until(lambda: all(closed_by_peer(s) for s in idle),
                       max(deadline - time.monotonic(), 0.5),
                       "every idle metrics connection closed", poll=0.2)  # fmt: skip
            with socket.create_connection(("127.0.0.1", metrics), timeout=5) as m:
                m.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while chunk := m.recv(1 << 16):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") or reply.startswith(b"HTTP/1.0 200")
            assert b"msgcap_open_connections" in reply
        finally:
            for s in held + idle:
                s.close()
            status = proxy.stop()
        assert status == 0
    events = read_events(proxy.capture_dir, "resource_exhausted")
    assert events and all("EMFILE" in e["error"] or "ENFILE" in e["error"] for e in events)
    assert len(events) <= 12, f"not rate-limited: {len(events)} events"
    assert "resource_exhausted" in proxy.stderr()


# --- descriptor exhaustion: the parts -----------------------------------------------------


def test_rate_limit_lets_one_report_through_per_interval() -> None:
    limit = RateLimit(5.0)
    assert limit.allow("a", 100.0) == 0
    assert limit.allow("a", 101.0) is None
    assert limit.allow("b", 101.0) == 0  # per place
    assert limit.allow("a", 104.9) is None
    assert limit.allow("a", 105.0) == 2  # two held back since the last one
    assert limit.allow("a", 105.1) is None
    assert limit.allow("a", 200.0) == 1


async def test_listener_accepts_again_after_running_out_of_descriptors() -> None:
    """accept() failing with EMFILE/ENFILE: reported each time, accepting pauses and
    resumes; the connection waiting in the backlog is accepted once it works again."""
    loop = asyncio.get_running_loop()
    real = loop.sock_accept
    failures = [errno.EMFILE, errno.ENFILE, errno.EMFILE, errno.ECONNABORTED]

    async def flaky(sock: socket.socket) -> tuple[socket.socket, Any]:
        if failures:
            await asyncio.sleep(0)
            code = failures.pop(0)
            raise OSError(code, os.strerror(code))
        return await real(sock)

    errors: list[int | None] = []
    accepted: list[socket.socket] = []

    async def on_accept(sock: socket.socket) -> None:
        accepted.append(sock)

    listener = Listener(bind("127.0.0.1", 0), on_accept, lambda e: errors.append(e.errno))
    loop.sock_accept = flaky  # type: ignore[method-assign]
    try:
        listener.start()
        port = listener.sockets[0].getsockname()[1]
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        await wait_until_async(lambda: accepted, 5, "the connection accepted")
        w.close()
    finally:
        del loop.sock_accept
        listener.close()
        await listener.wait_closed()
        for s in accepted:
            s.close()
    assert errors == [errno.EMFILE, errno.ENFILE, errno.EMFILE]  # ECONNABORTED is benign
    assert listener.sockets[0].fileno() == -1  # closed with the listener


async def test_upstream_connect_exhaustion_is_logged_rate_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dialing out fails with EMFILE (route and SOCKS5): upstream_error (or socks_error)
    for each, one resource_exhausted for all, and the proxy goes on."""

    async def no_descriptors(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async with Upstream(lambda r, w: asyncio.sleep(0)) as up, running_proxy(
        tmp_path, route=route_to(up.port), socks5={"listen": "127.0.0.1:0"}
    ) as proxy:  # fmt: skip
        monkeypatch.setattr(server_module, "connect_any", no_descriptors)
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", proxy.addresses[0][1])
            w.write(VERSION)
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        code = await socks_connect(proxy.addresses[1][1], b"\x7f\0\0\1", up.port)
        assert code == 1  # general failure
        await wait_until_async(logged(tmp_path / "cap", "upstream_error", 3), 5)
    exhausted = read_events(tmp_path / "cap", "resource_exhausted")
    assert [(e["where"], e["error"]) for e in exhausted] == [
        ("upstream connect", "EMFILE: Too many open files")
    ]
    socks = read_events(tmp_path / "cap", "socks_error")[-1]
    assert "Too many open files" in socks["error"] and socks["reply"] == "GENERAL_FAILURE"


def test_metrics_answers() -> None:
    m = Metrics()
    ok = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n\r\n", m.app)
    head, _, body = ok.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
    assert b"Content-Length: %d" % len(body) in head and b"msgcap_open_connections" in body
    assert respond(b"POST /metrics HTTP/1.1\r\n\r\n", m.app).startswith(b"HTTP/1.1 405")
    for bad in (b"\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x", b"\xff" * 30):
        assert respond(bad, m.app).startswith(b"HTTP/1.1 400"), bad


async def test_metrics_connections_are_bounded_and_time_out() -> None:
    m = Metrics()
    host, port = m.serve("127.0.0.1", 0, max_connections=2, read_timeout=0.5)
    try:
        idle = [await asyncio.open_connection(host, port) for _ in range(5)]
        await wait_until_async(lambda: m.rejected == 3, 5, "3 connections turned away")
        assert m.serving == 2
        for r, _w in idle[2:]:
            assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 503")
        # A slow sender is cut at the read timeout like an idle one.
        started = time.monotonic()
        for r, w in idle[:2]:
            w.write(b"GET /met")
            assert await asyncio.wait_for(r.read(), 5) == b""
        assert time.monotonic() - started < 2
        await wait_until_async(lambda: m.serving == 0, 5, "every connection closed")
        r, w = await asyncio.open_connection(host, port)
        w.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 200")
        w.close()
        for _r, idle_w in idle:
            idle_w.close()
    finally:
        m.close()
