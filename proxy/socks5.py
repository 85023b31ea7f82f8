"""The SOCKS5 server side (RFC 1928 CONNECT, RFC 1929 username/password).

Bitcoin Core sends ATYP DOMAINNAME (an IP literal or a name as text), offers NOAUTH and,
for stream isolation, USER_PASS with random credentials: any credentials are accepted
unless the config sets some.

The negotiation is :class:`Negotiation`, a plain object with no sockets (like h11 or
socksio): fed the client's bytes it answers what to send, then the parsed
:class:`Request` or a :class:`Fail` with the reason to log; the server only moves bytes.

Whether a destination may be dialed is decided by :class:`AllowList`, a plain object
with no sockets: fed the requested host and port it answers :class:`Dial` (these hosts),
:class:`Refuse` (reply 2, "not allowed by ruleset") or :class:`Resolve` (look the name
up, then feed it the addresses: only those it admits are dialed).
"""

from __future__ import annotations

import enum
import errno
import hmac
import ipaddress
import re
import socket
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from msgcap.capture.errors import MsgcapError
from msgcap.proxy.config import Address, AllowEntry, HostPort, Socks5, canonical_address

VERSION = 5
NO_AUTH = 0x00
USER_PASS = 0x02
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


class Reply(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class SocksError(MsgcapError):
    """Negotiation failed; ``reply`` is the code to send (None: just close)."""

    def __init__(self, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Request:
    host: str
    port: int
    atyp: int
    username: str | None


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to send to the client now (a method choice, an auth status, a reply)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Fail:
    """Negotiation failed: log ``reason`` and close. ``reply``: the code already sent to
    the client (in the :class:`Send` before this), or None if no reply was sent."""

    reason: str
    reply: Reply | None = None


Command = Send | Request | Fail
"""What :class:`Negotiation` answers: sends, then a :class:`Request` or a :class:`Fail`."""

_Steps = Generator[tuple[int, str], bytes, Request]


class Negotiation:
    """The server side of greeting, authentication and the CONNECT request, fed bytes.

    No sockets: :meth:`receive_data` takes whatever arrived and answers the commands it
    leads to (:class:`Send`, then finally the :class:`Request` or a :class:`Fail`);
    :meth:`receive_eof` and :meth:`timed_out` answer a :class:`Fail`. :attr:`wanted` is
    how many bytes the current step still lacks, so a reader asking for no more never
    reads past the request; bytes fed after it are kept in :attr:`trailing`. The reply
    to the request is the caller's, once the destination is reached (:func:`reply`).
    """

    def __init__(self, cfg: Socks5) -> None:
        self.cfg = cfg
        self.result: Request | Fail | None = None
        """The outcome once there is one."""
        self.trailing = b""
        """Bytes received after the request (the initiator's first bytes, if it did not
        wait for the reply)."""
        self._buffer = bytearray()
        self._out: list[Command] = []
        self._steps = self._negotiate()
        self._need, self._during = next(self._steps)

    @property
    def wanted(self) -> int:
        """Bytes still missing for the current step (0 once there is an outcome)."""
        return 0 if self.result is not None else self._need - len(self._buffer)

    def receive_data(self, data: bytes) -> list[Command]:
        if self.result is not None:
            self.trailing += data
            return []
        self._buffer += data
        while self.result is None and len(self._buffer) >= self._need:
            chunk = bytes(self._buffer[: self._need])
            del self._buffer[: self._need]
            try:
                self._need, self._during = self._steps.send(chunk)
            except StopIteration as done:
                self._finish(done.value)
                self.trailing = bytes(self._buffer)
            except SocksError as e:
                if e.reply is not None:
                    self._out.append(Send(reply_bytes(e.reply)))
                self._finish(Fail(str(e), e.reply))
        out, self._out = self._out, []
        return out

    def receive_eof(self) -> list[Command]:
        """The client closed (or half-closed) before the negotiation ended."""
        return self._stop(f"client closed during {self._during}")

    def timed_out(self) -> list[Command]:
        """``handshake_timeout`` passed before the negotiation ended."""
        return self._stop("timeout during negotiation")

    def _stop(self, reason: str) -> list[Command]:
        if self.result is not None:
            return []
        self._steps.close()
        self._finish(Fail(reason))
        return [Fail(reason)]

    def _finish(self, result: Request | Fail) -> None:
        self.result = result
        self._out.append(result)

    def _negotiate(self) -> _Steps:
        """The protocol as straight-line code: each ``yield`` asks for that many bytes
        (and says what they are for); a :class:`SocksError` ends it."""
        cfg = self.cfg
        ver, n_methods = yield 2, "greeting"
        if ver != VERSION:
            raise SocksError(f"not SOCKS5: version byte {ver:#04x}")
        methods = set((yield n_methods, "greeting"))
        if cfg.username is not None:
            method = USER_PASS if USER_PASS in methods else NO_ACCEPTABLE
        elif NO_AUTH in methods:
            method = NO_AUTH
        elif USER_PASS in methods:
            method = USER_PASS
        else:
            method = NO_ACCEPTABLE
        self._out.append(Send(bytes((VERSION, method))))
        if method == NO_ACCEPTABLE:
            raise SocksError(f"no acceptable auth method among {sorted(methods)}")
        username = None
        if method == USER_PASS:
            sub_ver, ulen = yield 2, "authentication"
            if sub_ver != 1:
                raise SocksError(f"bad auth sub-negotiation version {sub_ver}")
            user = yield ulen, "authentication"
            (plen,) = yield 1, "authentication"
            password = yield plen, "authentication"
            ok = cfg.username is None or (
                hmac.compare_digest(user, cfg.username.encode())
                and hmac.compare_digest(password, (cfg.password or "").encode())
            )
            self._out.append(Send(bytes((1, 0 if ok else 1))))
            if not ok:
                raise SocksError("wrong username or password")
            username = user.decode("utf-8", "replace")
        ver, cmd, _rsv, atyp = yield 4, "request"
        if ver != VERSION:
            raise SocksError(f"bad request version {ver}", Reply.GENERAL_FAILURE)
        if atyp == ATYP_IPV4:
            host = socket.inet_ntoa((yield 4, "request"))
        elif atyp == ATYP_IPV6:
            host = str(ipaddress.IPv6Address((yield 16, "request")))
        elif atyp == ATYP_DOMAIN:
            (n,) = yield 1, "request"
            raw = yield n, "request"
            try:
                host = raw.decode("ascii")
            except UnicodeDecodeError:
                raise SocksError(f"non-ASCII host name {raw!r}", Reply.GENERAL_FAILURE) from None
            problem = host_name_problem(host)
            if problem is not None:
                raise SocksError(f"refused host name {raw!r}: {problem}", Reply.HOST_UNREACHABLE)
        else:
            raise SocksError(f"address type {atyp} not supported", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        port = int.from_bytes((yield 2, "request"), "big")
        if cmd != CMD_CONNECT:
            raise SocksError(f"command {cmd} not supported", Reply.COMMAND_NOT_SUPPORTED)
        return Request(host, port, atyp, username)


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def host_name_problem(host: str) -> str | None:
    """Why ``host`` (from ATYP DOMAINNAME) is not an IP literal or a DNS name, or None.

    Checked before any lookup, so a hostile name never reaches the resolver or a path.
    """
    if "%" in host:
        return "IPv6 zone ids are not accepted"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return f"length {len(host)} is not that of a DNS name (1-253)"
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return f"label {label[:20]!r} is not a DNS label"
    return None


# --- the allow list ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to the first of ``hosts`` that answers: the requested name (resolved as
    usual), or address literals (and then nothing else)."""

    hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Resolve:
    """Only address entries could admit this name: look ``host`` up, then ask
    :meth:`AllowList.resolved` with its addresses."""

    host: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Not allowed: reply 2 with this reason."""

    reason: str
    reply: ClassVar[Reply] = Reply.NOT_ALLOWED


_NUMERIC = re.compile(r"[0-9A-Fa-fXx.]+")


def destination_address(host: str) -> Address | None:
    """The address ``host`` (a SOCKS request's host) stands for without a lookup, as the
    resolver reads it: an IPv4 or IPv6 literal, or a legacy IPv4 form that ``inet_aton``
    and so ``getaddrinfo`` take as an address (``127.1``, ``0x7f.1``, ``2130706433``,
    ``127.000.000.001``, ``0177.0.0.1`` in octal); IPv4-mapped IPv6 is the IPv4 address.
    None for a name."""
    try:
        return canonical_address(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _NUMERIC.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    return None


class AllowList:
    """A SOCKS5 listener's allow list deciding on destinations (no sockets, no lookups).

    - A name entry admits a requested DNS name it matches (label by label, case-
      insensitive, with or without the trailing dot); the name is then dialed as it
      resolves. It never admits an address, whatever text it is written in.
    - An address or network entry admits an address: the requested one (``127.1`` and
      ``::ffff:127.0.0.1`` are 127.0.0.1), or, for a name no name entry admits, the
      addresses it resolves to; only those are dialed, so a name that resolves to an
      address outside the list is refused.
    - ``*`` admits everything; the port must match too (``*``: any).
    - No entries: everything is allowed.
    """

    def __init__(self, entries: Sequence[AllowEntry]) -> None:
        self.entries = tuple(entries)

    def decide(self, host: str, port: int) -> Dial | Resolve | Refuse:
        """The verdict on a request for ``host:port``, before any lookup."""
        if not self.entries:
            return Dial((host,))
        dest = HostPort(host, port)
        problem = host_name_problem(host)
        if problem is not None:
            return Refuse(f"destination {dest} not in allow list: {problem}")
        address = destination_address(host)
        if address is not None:
            if any(e.allows_address(address, port) for e in self.entries):
                return Dial((str(address),))
            return Refuse(f"destination {dest} ({address}) not in allow list")
        name = (host[:-1] if host.endswith(".") else host).lower()
        # A last label of digits is no DNS name (RFC 3696 2): only '*' admits it by name.
        dns_name = not name.rpartition(".")[2].isdigit()
        if any((dns_name or e.host is None) and e.allows_name(name, port) for e in self.entries):
            return Dial((host,))
        if any(e.admits_addresses(port) for e in self.entries):
            return Resolve(host)
        return Refuse(f"destination {dest} not in allow list")

    def resolved(self, host: str, port: int, addresses: Iterable[str]) -> Dial | Refuse:
        """The verdict once ``host`` (answered :class:`Resolve`) resolved to
        ``addresses``: dial the admitted ones, in order, or refuse."""
        seen = list(addresses)
        admitted: list[str] = []
        for text in seen:
            try:
                address = canonical_address(ipaddress.ip_address(text))
            except ValueError:
                continue
            if str(address) not in admitted and any(
                e.allows_address(address, port) for e in self.entries
            ):
                admitted.append(str(address))
        if admitted:
            return Dial(tuple(admitted))
        found = ", ".join(dict.fromkeys(seen)) or "no address"
        return Refuse(f"destination {HostPort(host, port)} ({found}) not in allow list")


def reply_bytes(code: Reply) -> bytes:
    """A reply with an all-zero IPv4 bound address (clients ignore it)."""
    return bytes((VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0))


def reply_for(error: BaseException) -> Reply:
    """The SOCKS5 reply code for a failed connect (or a refusal)."""
    if isinstance(error, SocksError) and error.reply is not None:
        return error.reply
    if isinstance(error, TimeoutError):
        return Reply.TTL_EXPIRED
    if isinstance(error, ConnectionRefusedError):
        return Reply.CONNECTION_REFUSED
    if isinstance(error, socket.gaierror):
        return Reply.HOST_UNREACHABLE
    if isinstance(error, OSError):
        if error.errno in (errno.ENETUNREACH,):
            return Reply.NETWORK_UNREACHABLE
        if error.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
            return Reply.HOST_UNREACHABLE
        if error.errno == errno.ECONNREFUSED:
            return Reply.CONNECTION_REFUSED
    return Reply.GENERAL_FAILURE
