"""The proxy's configuration: one typed object, loaded from TOML, overridden by flags.

The TOML keys are the contract of DESIGN.md §8; ``config.example.toml`` documents every
key. Errors name the key and say what is wrong (exit status 2).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msgcap.capture.errors import ConfigError
from msgcap.capture.framing import parse_magic
from msgcap.capture.layout import Layout


class V2Policy(enum.Enum):
    DECRYPT = "decrypt"
    """End BIP324 on each leg (responder to the side that opened it, initiator to the
    other, v1 there if it only speaks v1) and capture the plaintext messages."""
    DOWNGRADE = "downgrade"
    """Close a BIP324 attempt before sending a byte; Core reconnects with v1."""
    PASSTHROUGH = "passthrough"
    """Relay the encrypted bytes untouched; the event log records the session."""


class CaptureErrorPolicy(enum.Enum):
    CONTINUE = "continue"
    """Keep forwarding without capture, logging the failure loudly."""
    STOP = "stop"
    """Close the connection: nothing crosses the proxy uncaptured."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str) -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        p = int(port)
        if not 0 <= p <= 65535:
            raise ConfigError(f"{key}: port {p} is out of range")
        return cls(host, p)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class Route:
    """A forward route: ``peer`` set for outbound (the node dials us), ``node`` for inbound."""

    listen: HostPort
    peer: HostPort | None = None
    node: HostPort | None = None
    """The address the proxy dials on an inbound route (not a label: see ``node_name``)."""
    node_name: str | None = None
    """The node this route serves: its captures go to ``<capture_dir>/<node_name>/``."""

    @property
    def kind(self) -> str:
        return "outbound" if self.peer is not None else "inbound"

    @property
    def upstream(self) -> HostPort:
        target = self.peer or self.node
        assert target is not None
        return target


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def canonical_address(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) is the IPv4 address it maps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _canonical_network(net: Network) -> Network:
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        first = int(net.network_address) & 0xFFFFFFFF
        return ipaddress.IPv4Network((first, net.prefixlen - 96))
    return net


@dataclass(frozen=True, slots=True)
class OctetPattern:
    """An IPv4 address with ``*`` for whole octets (``203.0.113.*``, ``10.*.*.1``),
    compared with addresses octet by octet, never with text."""

    octets: tuple[int | None, ...]

    @classmethod
    def parse(cls, text: str) -> OctetPattern | None:
        """None if ``text`` is not four dot-separated octets (0-255, no leading zeros) or
        ``*``, at least one ``*``."""
        parts = text.split(".")
        if len(parts) != 4 or "*" not in parts:
            return None
        octets: list[int | None] = []
        for p in parts:
            if p == "*":
                octets.append(None)
            elif p.isascii() and p.isdecimal() and str(int(p)) == p and int(p) <= 255:
                octets.append(int(p))
            else:
                return None
        return cls(tuple(octets))

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, ipaddress.IPv4Address):
            return False
        return all(o is None or o == a for o, a in zip(self.octets, address.packed, strict=True))


_GLOB_LABEL = re.compile(r"[a-z0-9_*?-]{1,63}")
_CHAR = "[a-z0-9_-]"
"""A character of a DNS label (names are matched in lower case): never a dot."""
_IPV4_LIKE = re.compile(r"[0-9*?]+(\.[0-9*?]+)*")


@dataclass(frozen=True, slots=True)
class NamePattern:
    """A DNS name pattern of an allow list, matched label by label: ``*`` is any run of
    characters and ``?`` one character *within* a label (a glob never crosses a dot);
    ``**`` as the whole first label stands for one or more labels. Lower case, without
    the trailing dot."""

    text: str
    regex: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        """Raises ValueError with the reason."""
        if not text.isascii():
            raise ValueError("write a non-ASCII name in its ASCII (xn--) form")
        name = (text[:-1] if text.endswith(".") else text).lower()
        if not name or len(name) > 253:
            raise ValueError("a DNS name is 1-253 characters")
        if _IPV4_LIKE.fullmatch(name) and any(c.isdigit() for c in name):
            raise ValueError(
                "an IPv4 glob takes '*' for whole octets only (203.0.113.*); or write a "
                "network with a prefix length (203.0.113.0/24)"
            )
        labels = name.split(".")
        parts = []
        for i, label in enumerate(labels):
            if not _GLOB_LABEL.fullmatch(label):
                raise ValueError(
                    f"label {label!r} is not a DNS label (letters, digits, '-', '_') or a "
                    "glob of one ('*', '?')"
                )
            if label == "**" and i == 0:
                parts.append(rf"{_CHAR}+(?:\.{_CHAR}+)*")
            elif "**" in label:
                raise ValueError("'**' (one or more labels) is only the whole first label")
            elif label == "*":
                parts.append(f"{_CHAR}+")
            else:
                parts.append("".join(
                    f"{_CHAR}*" if c == "*" else _CHAR if c == "?" else re.escape(c) for c in label
                ))  # fmt: skip
        if labels[-1].isdigit():
            raise ValueError("a DNS name's last label is never all digits")
        return cls(name, re.compile(r"\.".join(parts), re.ASCII))

    def matches(self, name: str) -> bool:
        """``name``: a DNS name in lower case, without the trailing dot."""
        return self.regex.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One entry of a SOCKS5 allow list, ``HOST[:PORT]`` (the syntax is documented in
    ``config.example.toml``). ``host`` None is ``*`` (any destination), ``port`` None
    any port."""

    text: str
    host: NamePattern | Network | OctetPattern | None
    port: int | None

    @classmethod
    def parse(cls, text: str, key: str) -> AllowEntry:
        try:
            host, port = _split_port(text)
            return cls(text, _allow_host(host), port)
        except ValueError as e:
            raise ConfigError(f"{key}: {text!r}: {e}") from None

    def _port(self, port: int) -> bool:
        return self.port is None or self.port == port

    def allows_name(self, name: str, port: int) -> bool:
        """Whether a name entry (or ``*``) admits the DNS name ``name`` (lower case,
        without the trailing dot)."""
        if not self._port(port):
            return False
        return self.host is None or (isinstance(self.host, NamePattern) and self.host.matches(name))

    def allows_address(self, address: Address, port: int) -> bool:
        """Whether an address entry (or ``*``) admits ``address`` (IPv4-mapped IPv6 is
        the IPv4 address)."""
        if not self._port(port):
            return False
        if self.host is None:
            return True
        if isinstance(self.host, NamePattern):
            return False
        return canonical_address(address) in self.host

    def admits_addresses(self, port: int) -> bool:
        """Whether some address on ``port`` could be admitted (an address entry or ``*``)."""
        return self._port(port) and not isinstance(self.host, NamePattern)


def _split_port(text: str) -> tuple[str, int | None]:
    """``HOST:PORT``, ``[IPV6]:PORT``, or a host alone (any port): an IPv6 address
    without brackets (two colons or more) has no port."""
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[: close + 1], text[close + 1 :]
        if close < 0 or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPV6] or [IPV6]:PORT")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError("no host (write '*' for any)")
    if port_text is None or port_text == "*":
        return host, None
    if port_text.isascii() and port_text.isdecimal() and int(port_text) <= 65535:
        return host, int(port_text)
    raise ValueError(f"port {port_text!r} is not 0-65535 or '*'")


def _allow_host(text: str) -> NamePattern | Network | OctetPattern | None:
    """The host part of an allow-list entry; raises ValueError with the reason."""
    if text == "*":
        return None
    if "%" in text:
        raise ValueError("IPv6 zone ids are not accepted")
    if ":" in text:
        inner = text[1:-1] if text.startswith("[") else text
        try:
            net = ipaddress.ip_network(inner)
        except ValueError as e:
            raise ValueError(f"not an IPv6 address or network ({e})") from None
        return _canonical_network(net)
    if text.startswith("["):
        raise ValueError("brackets are for IPv6 only: write IPv4 without them")
    try:
        return _canonical_network(ipaddress.ip_network(text))
    except ValueError as e:
        if "/" in text:
            raise ValueError(f"not an IPv4 network ({e})") from None
    octets = OctetPattern.parse(text)
    if octets is not None:
        return octets
    try:
        canonical = ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return NamePattern.parse(text)
    raise ValueError(f"write the IPv4 address in its usual form: {canonical}")


@dataclass(frozen=True, slots=True)
class Socks5:
    listen: HostPort
    username: str | None = None
    password: str | None = None
    allow: tuple[AllowEntry, ...] = ()
    """Destinations allowed (names, addresses, networks, each with a port or ``*``);
    empty allows all. Decided by :class:`msgcap.proxy.socks5.AllowList`."""
    node_name: str | None = None
    """The node that uses this listener: its captures go to ``<capture_dir>/<node_name>/``."""


DEFAULT_MARK = 0x6D63
"""SO_MARK of the transparent route's upstream connections ("mc"): the redirect rules
leave packets with it alone, so the proxy never dials itself."""


@dataclass(frozen=True, slots=True)
class Transparent:
    """A transparent route: connections the kernel redirected here (nftables/iptables
    REDIRECT or TPROXY), relayed to their original destination. A destination that is the
    node's address is inbound (the node is the upstream), anything else outbound."""

    listen: HostPort
    node: str | None = None
    """The node's address, when the proxy runs outside the node's network namespace (a
    router); None: the node's addresses are the local addresses of the proxy's own."""
    node_name: str | None = None
    """The node this route serves: its captures go to ``<capture_dir>/<node_name>/``."""
    mark: int = DEFAULT_MARK
    """SO_MARK on the upstream sockets (0: none)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 256
    capture_bytes_per_peer: int = 1 << 30
    capture_bytes_total: int = 16 << 30
    handshake_timeout: float = 30.0
    """Seconds for SOCKS5 negotiation, the upstream connect and the first bytes."""
    idle_timeout: float = 1200.0
    """Seconds without traffic in either direction (Core's own timeout is 20 minutes)."""
    frame_buffer_bytes: int = 256 << 20
    """Bytes of incomplete messages (above 64 KiB each) buffered over all connections; a
    connection whose next message would pass it waits, not reading, until there is room."""


@dataclass(frozen=True, slots=True)
class Config:
    magic: bytes
    network: str
    capture_dir: Path = Path("message_capture")
    layout: Layout = Layout.CORE
    v2: V2Policy = V2Policy.DECRYPT
    on_capture_error: CaptureErrorPolicy = CaptureErrorPolicy.CONTINUE
    routes: tuple[Route, ...] = ()
    socks5: tuple[Socks5, ...] = ()
    """``[socks5]``, or several as ``[[socks5]]``."""
    transparent: tuple[Transparent, ...] = ()
    """``[[transparent]]`` routes."""
    limits: Limits = field(default_factory=Limits)
    event_log: Path | None = None
    """Default: ``<capture_dir>/events.jsonl``."""
    live: bool = False
    metrics: HostPort | None = None
    """Serve Prometheus metrics here (off by default)."""

    @property
    def event_log_path(self) -> Path:
        return self.event_log or self.capture_dir / "events.jsonl"


DEFAULT_CONFIG: dict[str, Any] = {
    "network": "regtest",
    "route": [{"listen": "127.0.0.1:18555", "peer": "127.0.0.1:18444"}],
    "socks5": {"listen": "127.0.0.1:9050"},
}
"""The built-in default: regtest on loopback, a SOCKS5 listener and one outbound route."""


SCALAR_KEYS = ("network", "magic", "capture_dir", "layout", "v2", "on_capture_error",
               "event_log", "live", "metrics")  # fmt: skip
"""Top-level keys holding one value (each has a flag of the same name)."""
_TOP_KEYS = {*SCALAR_KEYS, "route", "socks5", "transparent", "limits"}


def _enum(cls: type[enum.Enum], value: Any, key: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None


def _typed(value: Any, kind: type | tuple[type, ...], key: str) -> Any:
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def config_from_dict(data: dict[str, Any]) -> Config:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown key {sorted(unknown)[0]!r}")
    network = _typed(data.get("network", "regtest"), str, "network")
    try:
        magic = parse_magic(_typed(data.get("magic", network), str, "magic"))
    except ValueError as e:
        raise ConfigError(f"network: {e}") from None
    routes = []
    for i, r in enumerate(_typed(data.get("route", []), list, "route")):
        key = f"route[{i}]"
        r = _typed(r, dict, key)
        extra = set(r) - {"listen", "peer", "node", "node_name"}
        if extra:
            raise ConfigError(f"{key}: unknown key {sorted(extra)[0]!r}")
        if "listen" not in r or ("peer" in r) == ("node" in r):
            raise ConfigError(f"{key}: needs 'listen' and exactly one of 'peer' or 'node'")
        listen = HostPort.parse(_typed(r["listen"], str, f"{key}.listen"), f"{key}.listen")
        peer = HostPort.parse(r["peer"], f"{key}.peer") if "peer" in r else None
        node = HostPort.parse(r["node"], f"{key}.node") if "node" in r else None
        routes.append(Route(listen, peer, node, _node_name(r, key)))
    socks5 = []
    for key, s in _listeners(data, "socks5", {"username", "password", "allow"}):
        if ("username" in s) != ("password" in s):
            raise ConfigError(f"{key}: set both 'username' and 'password', or neither")
        allow = tuple(
            AllowEntry.parse(_typed(a, str, f"{key}.allow[{j}]"), f"{key}.allow[{j}]")
            for j, a in enumerate(_typed(s.get("allow", []), list, f"{key}.allow"))
        )
        socks5.append(Socks5(
            HostPort.parse(_typed(s["listen"], str, f"{key}.listen"), f"{key}.listen"),
            s.get("username"),
            s.get("password"),
            allow,
            _node_name(s, key),
        ))  # fmt: skip
    transparent = _transparent(data)
    limits = Limits()
    if "limits" in data:
        lim = _typed(data["limits"], dict, "limits")
        names = {f.name: f.type for f in dataclasses.fields(Limits)}
        values: dict[str, Any] = {}
        for k, v in lim.items():
            if k not in names:
                raise ConfigError(f"limits: unknown key {k!r}")
            kind: type | tuple[type, ...] = (int, float) if "timeout" in k else int
            values[k] = _typed(v, kind, f"limits.{k}")
            if values[k] < 0:
                raise ConfigError(f"limits.{k}: must not be negative")
        limits = Limits(**values)
    cfg = Config(
        magic=magic,
        network=network,
        capture_dir=Path(_typed(data.get("capture_dir", "message_capture"), str, "capture_dir")),
        layout=_enum(Layout, data.get("layout", "core"), "layout"),
        v2=_enum(V2Policy, data.get("v2", "decrypt"), "v2"),
        on_capture_error=_enum(
            CaptureErrorPolicy, data.get("on_capture_error", "continue"), "on_capture_error"
        ),
        routes=tuple(routes),
        socks5=tuple(socks5),
        transparent=transparent,
        limits=limits,
        event_log=Path(_typed(data["event_log"], str, "event_log"))
        if "event_log" in data
        else None,
        live=_typed(data.get("live", False), bool, "live"),
        metrics=HostPort.parse(_typed(data["metrics"], str, "metrics"), "metrics")
        if "metrics" in data
        else None,
    )
    validate(cfg)
    return cfg


def _listeners(
    data: dict[str, Any], name: str, keys: set[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The tables ``[[name]]`` (or one ``[name]``), each with its key for messages; each
    has ``listen``, and only ``keys`` besides ``listen`` and ``node_name``."""
    tables = data.get(name, [])
    for i, t in enumerate(tables if isinstance(tables, list) else [tables]):
        key = f"{name}[{i}]" if isinstance(tables, list) else name
        t = _typed(t, dict, key)
        extra = set(t) - {"listen", "node_name", *keys}
        if extra:
            raise ConfigError(f"{key}: unknown key {sorted(extra)[0]!r}")
        if "listen" not in t:
            raise ConfigError(f"{key}: needs 'listen'")
        yield key, t


def _transparent(data: dict[str, Any]) -> tuple[Transparent, ...]:
    """``[[transparent]]`` (or one ``[transparent]`` table)."""
    out = []
    for key, t in _listeners(data, "transparent", {"node", "mark"}):
        listen = HostPort.parse(_typed(t["listen"], str, f"{key}.listen"), f"{key}.listen")
        node = None
        if "node" in t:
            text = _typed(t["node"], str, f"{key}.node")
            try:
                node = str(ipaddress.ip_address(text.removeprefix("[").removesuffix("]")))
            except ValueError:
                raise ConfigError(
                    f"{key}.node: {text!r} is not an IP address (the node's address, no port)"
                ) from None
        mark = _typed(t.get("mark", DEFAULT_MARK), int, f"{key}.mark")
        if not 0 <= mark <= 0xFFFFFFFF:
            raise ConfigError(f"{key}.mark: {mark} is not a 32-bit mark (0 for none)")
        out.append(Transparent(listen, node, _node_name(t, key), mark))
    return tuple(out)


def _node_name(table: dict[str, Any], key: str) -> str | None:
    """A listener's ``node_name``: one folder name, so it must be safe as one."""
    if "node_name" not in table:
        return None
    name: str = _typed(table["node_name"], str, f"{key}.node_name")
    if not NODE_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{key}.node_name: {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(it names a folder)"
        )
    return name


NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate(cfg: Config) -> None:
    if not cfg.routes and not cfg.socks5 and not cfg.transparent:
        raise ConfigError(
            "nothing to listen on: add a [[route]], a [socks5] or a [[transparent]] section"
        )
    listens = (
        [r.listen for r in cfg.routes]
        + [s.listen for s in cfg.socks5]
        + [t.listen for t in cfg.transparent]
    )
    fixed = [a for a in listens if a.port != 0]  # port 0: any free port
    if len(set(fixed)) != len(fixed):
        raise ConfigError("two listeners share one address")
    for s in cfg.socks5:
        if not s.listen.is_loopback and s.username is None and not s.allow:
            raise ConfigError(
                f"socks5.listen {s.listen} is not loopback: set username/password or an "
                "allow list, or anyone who reaches it can use it as an open proxy"
            )


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
