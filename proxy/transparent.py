"""The transparent route's kernel side: where a redirected connection was going, whether
an address is the node's, and the nftables rules that redirect a node's traffic here.

A node needs no flag at all when the kernel sends its P2P connections to the proxy:
nftables (or iptables) ``redirect`` rewrites the destination of a new connection to the
proxy's listener and keeps the original in the connection tracking entry, which
:func:`original_destination` reads back (``SO_ORIGINAL_DST``, ``IP6T_SO_ORIGINAL_DST``);
under ``tproxy`` nothing is rewritten and the accepted socket's own local address is the
original destination. :func:`classify` then decides, per connection, which side the node
is on: a destination that is the node's own address is an inbound connection (the node is
the upstream), anything else is the node's outbound connection (the node is the client);
a destination that is the proxy's own listener is a loop and is refused.

The proxy's own upstream connections carry ``SO_MARK`` (:func:`set_mark`); the rules
:func:`nft_rules` prints leave marked packets alone, so the proxy never dials itself.
Everything here but the socket calls is plain data in, data out.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import shlex
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from msgcap.capture.layout import peer_folder_name
from msgcap.proxy.config import DEFAULT_MARK, HostPort, canonical_address

SO_ORIGINAL_DST: Final = 80
"""``getsockopt(SOL_IP, ...)``: the IPv4 destination before a NAT redirect (netfilter)."""
IP6T_SO_ORIGINAL_DST: Final = 80
"""``getsockopt(SOL_IPV6, ...)``: the same for IPv6."""
IP_TRANSPARENT: Final = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT: Final = 75

_SOCKADDR_IN: Final = 16
_SOCKADDR_IN6: Final = 28


def original_destination(sock: Any) -> HostPort:
    """Where the client of an accepted connection was going: the destination kept by the
    connection tracking entry of a NAT redirect, else the socket's local address (TPROXY,
    or a connection made straight to the listener). ``sock``: a socket, or the socket-like
    object an asyncio transport gives (``getsockopt``, ``getsockname``, ``family``)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
            (port,) = struct.unpack_from("!H", raw, 2)
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:
            raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
            (port,) = struct.unpack_from("!H", raw, 2)
            host = socket.inet_ntop(socket.AF_INET, raw[4:8])
    except OSError as e:
        # ENOENT: no NAT entry (TPROXY, or not redirected); ENOPROTOOPT: no netfilter.
        if e.errno not in (errno.ENOENT, errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        local = sock.getsockname()
        host, port = str(local[0]), int(local[1])
    return HostPort(canonical_host(host), port)


def canonical_host(host: str) -> str:
    """An address as text in its usual form; an IPv4-mapped IPv6 address as IPv4."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    return str(canonical_address(address))


def is_local(host: str) -> bool:
    """Whether ``host`` is an address of this network namespace: the kernel lets a socket
    bind to it (any local address, on any interface, loopback included)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(address), 0))
    except OSError:
        return False
    return True


class Kind(enum.Enum):
    OUTBOUND = "outbound"
    """The node dialed a peer: the node is the client, the folder is the destination."""
    INBOUND = "inbound"
    """A peer dialed the node: the node is the upstream, the folder is the peer."""
    LOOP = "loop"
    """The destination is the proxy's own listener: refused."""


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    upstream: HostPort
    """Whom the proxy dials: always the original destination."""
    reason: str = ""
    """Why a :attr:`Kind.LOOP` connection is refused."""

    def peer(self, client: tuple[str, int]) -> str:
        """The capture folder's peer name: the destination the node dialed (outbound),
        else the connection's ``client`` (host, port)."""
        if self.kind is Kind.OUTBOUND:
            return peer_folder_name(self.upstream.host, self.upstream.port)
        return peer_folder_name(*client)


def same_host(a: str, b: str) -> bool:
    """Two addresses are one (``::ffff:10.0.0.1`` is ``10.0.0.1``); names compare as text."""
    return canonical_host(a) == canonical_host(b)


def classify(
    destination: HostPort,
    listener_port: int,
    node: str | None,
    local: Callable[[str], bool] = is_local,
) -> Decision:
    """The perspective of one redirected connection.

    ``listener_port``: the port the connection was accepted on; ``node``: the node's
    address when the proxy runs outside the node's network namespace (a router, a
    gateway), else None: then the node's addresses are this namespace's (``local``)."""
    dest_local = local(destination.host)
    if destination.port == listener_port and dest_local:
        return Decision(
            Kind.LOOP,
            destination,
            f"the original destination {destination} is this proxy's own listener (a "
            "connection made straight to it, or a redirect rule that does not exclude "
            "the proxy's mark)",
        )
    inbound = same_host(destination.host, node) if node is not None else dest_local
    return Decision(Kind.INBOUND if inbound else Kind.OUTBOUND, destination)


def set_mark(sock: socket.socket, mark: int) -> None:
    """Tag ``sock``'s packets with ``mark`` (SO_MARK; needs CAP_NET_ADMIN); 0 sets none."""
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def check_mark(mark: int) -> None:
    """Raise the OSError of setting ``mark`` (EPERM without CAP_NET_ADMIN) at start-up,
    rather than on every connection."""
    with socket.socket() as s:
        set_mark(s, mark)


def allow_tproxy(sock: socket.socket) -> None:
    """Let a listener accept connections TPROXY steers to it for addresses that are not
    local (IP_TRANSPARENT; needs CAP_NET_ADMIN). Without the privilege only REDIRECT
    works, which needs no socket option: then nothing is set."""
    level, option = (
        (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
        if sock.family == socket.AF_INET6
        else (socket.IPPROTO_IP, IP_TRANSPARENT)
    )
    try:
        sock.setsockopt(level, option, 1)
    except OSError:
        pass


TABLE: Final = "msgcap"


def nft_rules(
    *,
    node_port: int,
    listen_port: int,
    mark: int = DEFAULT_MARK,
    peer_ports: Sequence[int] = (),
    node: str | None = None,
    netns: str | None = None,
) -> str:
    """nftables rules (``nft -f``) that send a node's P2P connections to a transparent
    listener on ``listen_port``: its outbound connections to ``peer_ports`` (default: the
    node's own port, as on a network where every node uses the default port) and inbound
    connections to its ``node_port``. Packets with ``mark`` (the proxy's own upstream
    connections) are left alone. The table ``inet msgcap`` is replaced as a whole, so
    applying the rules twice is the same as once.

    ``node`` None: msgcap runs in the node's own network namespace (the node itself, a
    Kubernetes sidecar). ``node`` an address: msgcap runs where the node's traffic passes
    through (a router namespace) and the rules match the node's address. ``netns``: the
    output is a shell command that applies the rules inside that network namespace."""
    ports = sorted(set(peer_ports or (node_port,)))
    peer_set = str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"
    to = f"redirect to :{listen_port}"
    skip = f"meta mark 0x{mark:x} return" if mark else ""
    head = [
        f"# msgcap transparent route: node port {node_port}, peer ports {peer_set}, "
        f"listener :{listen_port}, proxy mark 0x{mark:x}",
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
    ]
    body: list[str] = []
    if node is None:
        body += [
            "  # the node's outbound connections (made in this namespace)",
            "  chain output {",
            "    type nat hook output priority -100; policy accept;",
            *([f"    {skip}"] if skip else []),
            f"    tcp dport {peer_set} {to}",
            "  }",
            "  # peers' connections to the node's P2P port",
            "  chain prerouting {",
            "    type nat hook prerouting priority -100; policy accept;",
            *([f"    {skip}"] if skip else []),
            f"    tcp dport {node_port} {to}",
            "  }",
        ]
    else:
        family = "ip6" if ipaddress.ip_address(node).version == 6 else "ip"
        body += [
            f"  # traffic of the node {node} passing through this namespace",
            "  chain prerouting {",
            "    type nat hook prerouting priority -100; policy accept;",
            *([f"    {skip}"] if skip else []),
            f"    {family} saddr {node} tcp dport {peer_set} {to}",
            f"    {family} daddr {node} tcp dport {node_port} {to}",
            "  }",
        ]
    text = "\n".join([*head, *body, "}"]) + "\n"
    if netns is None:
        return text
    return f"ip netns exec {shlex.quote(netns)} nft -f - <<'EOF'\n{text}EOF\n"
