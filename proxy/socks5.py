"""The SOCKS5 server side (RFC 1928 CONNECT, RFC 1929 username/password).

Bitcoin Core sends ATYP DOMAINNAME (an IP literal or a name as text), offers NOAUTH and,
for stream isolation, USER_PASS with random credentials: any credentials are accepted
unless the config sets some.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import fnmatch
import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass

from msgcap.proxy.config import Socks5
from msgcap.proxy.conn import Conn

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


class SocksError(Exception):
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


async def _read(conn: Conn, n: int, what: str) -> bytes:
    try:
        return await conn.readexactly(n)
    except asyncio.IncompleteReadError:
        raise SocksError(f"client closed during {what}") from None


async def negotiate(conn: Conn, cfg: Socks5) -> Request:
    """Greeting, authentication and the CONNECT request; the reply is sent by the caller
    once the destination is reached (:func:`reply`)."""
    ver, n_methods = await _read(conn, 2, "greeting")
    if ver != VERSION:
        raise SocksError(f"not SOCKS5: version byte {ver:#04x}")
    methods = set(await _read(conn, n_methods, "greeting"))
    if cfg.username is not None:
        method = USER_PASS if USER_PASS in methods else NO_ACCEPTABLE
    elif NO_AUTH in methods:
        method = NO_AUTH
    elif USER_PASS in methods:
        method = USER_PASS
    else:
        method = NO_ACCEPTABLE
    conn.write(bytes((VERSION, method)))
    if method == NO_ACCEPTABLE:
        raise SocksError(f"no acceptable auth method among {sorted(methods)}")
    username = None
    if method == USER_PASS:
        sub_ver, ulen = await _read(conn, 2, "authentication")
        if sub_ver != 1:
            raise SocksError(f"bad auth sub-negotiation version {sub_ver}")
        user = await _read(conn, ulen, "authentication")
        (plen,) = await _read(conn, 1, "authentication")
        password = await _read(conn, plen, "authentication")
        ok = cfg.username is None or (
            hmac.compare_digest(user, cfg.username.encode())
            and hmac.compare_digest(password, (cfg.password or "").encode())
        )
        conn.write(bytes((1, 0 if ok else 1)))
        if not ok:
            raise SocksError("wrong username or password")
        username = user.decode("utf-8", "replace")
    ver, cmd, _rsv, atyp = await _read(conn, 4, "request")
    if ver != VERSION:
        raise SocksError(f"bad request version {ver}", Reply.GENERAL_FAILURE)
    if atyp == ATYP_IPV4:
        host = socket.inet_ntoa(await _read(conn, 4, "request"))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(await _read(conn, 16, "request")))
    elif atyp == ATYP_DOMAIN:
        (n,) = await _read(conn, 1, "request")
        raw = await _read(conn, n, "request")
        try:
            host = raw.decode("ascii")
        except UnicodeDecodeError:
            raise SocksError(f"non-ASCII host name {raw!r}", Reply.GENERAL_FAILURE) from None
        problem = host_name_problem(host)
        if problem is not None:
            raise SocksError(f"refused host name {raw!r}: {problem}", Reply.HOST_UNREACHABLE)
    else:
        raise SocksError(f"address type {atyp} not supported", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    port = int.from_bytes(await _read(conn, 2, "request"), "big")
    if cmd != CMD_CONNECT:
        raise SocksError(f"command {cmd} not supported", Reply.COMMAND_NOT_SUPPORTED)
    if cfg.allow and not any(fnmatch.fnmatchcase(f"{host}:{port}", p) for p in cfg.allow):
        raise SocksError(f"destination {host}:{port} not in allow list", Reply.NOT_ALLOWED)
    return Request(host, port, atyp, username)


_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


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
        if not _LABEL.match(label):
            return f"label {label[:20]!r} is not a DNS label"
    return None


def reply(conn: Conn, code: Reply) -> None:
    """A reply with an all-zero IPv4 bound address (clients ignore it)."""
    conn.write(bytes((VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0)))


def reply_for(error: BaseException) -> Reply:
    """The SOCKS5 reply code for a failed connect."""
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
