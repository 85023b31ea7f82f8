"""Hostile input, case by case; the table in the README's Reliability section is this list.

Each named case is checked where it is decided:

- SOCKS5 cases are decided by plain objects (``socks5.Negotiation``, then the allow
  list on the request) and the connection's first bytes by ``policy.FirstBytes``: fed
  the attack's bytes without sockets (``tests/playbook.py``), whole, a byte at a time and
  in pieces, each checks the reason logged and the reply sent, in milliseconds.
- Framing (``FrameDecoder`` and the relay), the connection limit, timeouts, a refused
  destination and v2 garbage run end to end over loopback, as do a few of the decided
  cases: the expected event, no effect on the honest connection opened before it, no
  crash (the proxy keeps accepting), and no file outside capture_dir. They wait for the
  event in the log, never a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from msgcap.capture.framing import Network, checksum, encode_frame
from msgcap.proxy.config import AllowEntry, HostPort, Socks5, V2Policy
from msgcap.proxy.policy import FirstBytes, Opening
from msgcap.proxy.server import Proxy
from msgcap.proxy.socks5 import AllowList, Fail, Negotiation, Refuse, Request, Send, reply_bytes
from tests.conftest import (
    MAGIC,
    PING,
    VERSION,
    echo_server,
    logged,
    read_events,
    route_to,
    running_proxy,
    wait_until_async,
)
from tests.playbook import EOF, TIMEOUT, Step, play_every_way

MAINNET = Network.MAIN.magic
ECHO_PORT = 18444
"""The port in SOCKS requests decided without sockets (nothing is dialed)."""


def greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def request(atyp: int, addr: bytes, port: int, cmd: int = 1, ver: int = 5) -> bytes:
    return bytes((ver, cmd, 0, atyp)) + addr + port.to_bytes(2, "big")


def domain(name: bytes) -> bytes:
    return bytes((len(name),)) + name


def header(msgtype: bytes, length: int, csum: bytes = b"\0\0\0\0", magic: bytes = MAGIC) -> bytes:
    return magic + msgtype.ljust(12, b"\0") + length.to_bytes(4, "little") + csum


# --- decided without sockets ------------------------------------------------------------

SOCKS = Socks5(HostPort("127.0.0.1", 0), allow=(AllowEntry.parse("127.0.0.1:*", "allow"),))
"""The SOCKS5 listener of the end-to-end cases: no credentials, 127.0.0.1 allowed."""

SOCKS_CASES: dict[str, tuple[list[Step], str, bytes]] = {
    # name: (what the client does, text in the socks_error event, reply bytes sent)
    "SOCKS4 greeting": (
        [b"\x04\x01\x00\x50\x7f\x00\x00\x01user\0"], "not SOCKS5", b"",
    ),
    "no acceptable auth method": ([greeting(0x80)], "no acceptable auth method", b"\x05\xff"),
    "greeting cut short": ([b"\x05\x03\x00", EOF], "client closed during greeting", b""),
    "bad auth sub-negotiation": (
        [greeting(2), b"\x05\x01u\x01p"], "bad auth sub-negotiation version", b"\x05\x02",
    ),
    "credentials cut short": (
        [greeting(2), b"\x01\x05us", EOF], "client closed during authentication", b"\x05\x02",
    ),
    "BIND command": (
        [greeting(0), request(1, b"\x7f\0\0\1", ECHO_PORT, cmd=2)],
        "command 2 not supported", b"\x05\x00\x05\x07",
    ),
    "unknown address type": (
        [greeting(0), request(5, b"\0" * 4, ECHO_PORT)], "address type 5", b"\x05\x00\x05\x08",
    ),
    "host name with ../": (
        [greeting(0), request(3, domain(b"../../etc/cron.d"), ECHO_PORT)],
        "is not a DNS label", b"\x05\x00\x05\x04",
    ),
    "host name with NUL": (
        [greeting(0), request(3, domain(b"local\0host"), ECHO_PORT)],
        "refused host name", b"\x05\x00\x05\x04",
    ),
    "255-character host name": (
        [greeting(0), request(3, domain(b"a" * 255), ECHO_PORT)], "length 255", b"\x05\x00\x05\x04",
    ),
    "IPv6 zone id": (
        [greeting(0), request(3, domain(b"fe80::1%lo"), ECHO_PORT)],
        "zone ids", b"\x05\x00\x05\x04",
    ),
    "non-ASCII host name": (
        [greeting(0), request(3, domain("bü.example".encode()), ECHO_PORT)],
        "non-ASCII host name", b"\x05\x00\x05\x01",
    ),
    "destination outside the allow list": (
        [greeting(0), request(1, b"\x7f\0\0\2", ECHO_PORT)],
        "not in allow list", b"\x05\x00\x05\x02",
    ),
    "SOCKS request with version 4": (
        [greeting(0), request(1, b"\x7f\0\0\1", ECHO_PORT, ver=4)],
        "bad request version 4", b"\x05\x00\x05\x01",
    ),
}  # fmt: skip


def socks_outcome(script: list[Step]) -> tuple[bytes, str]:
    """What the proxy sends and the socks_error it logs for a SOCKS5 client's ``script``:
    the negotiation, then (for a request) the allow list's verdict, however the bytes
    are split."""
    commands = play_every_way(lambda: Negotiation(SOCKS), script)
    sent = b"".join(c.data for c in commands if isinstance(c, Send))
    outcome = commands[-1]
    if isinstance(outcome, Request):
        verdict = AllowList(SOCKS.allow).decide(outcome.host, outcome.port)
        assert isinstance(verdict, Refuse), verdict
        return sent + reply_bytes(verdict.reply), verdict.reason
    assert isinstance(outcome, Fail), commands
    return sent, outcome.reason


@pytest.mark.parametrize("name", sorted(SOCKS_CASES))
def test_socks_case(name: str) -> None:
    script, text, reply = SOCKS_CASES[name]
    sent, reason = socks_outcome(script)
    assert text in reason, reason
    assert sent.startswith(reply) and (reply or sent == b""), sent


FIRST_BYTES_CASES: dict[str, tuple[list[Step], str, str]] = {
    # name: (what the initiator does, the event, text in its log line)
    "byte-a-second sender": ([bytes([b]) for b in VERSION[:8]] + [TIMEOUT], "timeout",
                             "first bytes"),
    "connect and close at once": ([EOF], "close", "closed before handshake"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FIRST_BYTES_CASES))
def test_first_bytes_case(name: str) -> None:
    script, event, text = FIRST_BYTES_CASES[name]
    for policy in V2Policy:
        (verdict,) = play_every_way(functools.partial(FirstBytes, MAGIC, policy, 1, "peer"), script)
        assert verdict.opening is Opening.CLOSE and verdict.event is not None
        assert verdict.event.name == event
        assert text in json.dumps(verdict.event.fields(), separators=(",", ":"))


# --- end to end ------------------------------------------------------------------------


@dataclass
class Ctx:
    proxy: Proxy
    route: int
    socks: int
    echo: int
    refused: int
    cap: Path
    """The capture directory (with the event log)."""
    left_open: list[asyncio.StreamWriter] = field(default_factory=list)
    """The attack's connections, closed once the case is checked."""


async def talk(port: int, chunks: list[bytes], *, expect: int = 0, wait: float = 5.0) -> bytes:
    """Connect, send ``chunks``, read until closed (or ``expect`` bytes came)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    try:
        for c in chunks:
            w.write(c)
            await w.drain()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(wait):
                while (not expect or len(got) < expect) and (data := await r.read(1 << 16)):
                    got += data
    except ConnectionError:
        pass
    finally:
        w.close()
    return bytes(got)


def event_logged(cap: Path, event: str, text: str) -> Callable[[], bool]:
    def found() -> bool:
        return any(text in json.dumps(e, separators=(",", ":"))
                   for e in read_events(cap, event))  # fmt: skip

    return found


async def send(c: Ctx, chunks: list[bytes], *, close: bool = False) -> None:
    """Connect to the route and send ``chunks``; then close the sending direction if
    ``close`` (the proxy sees the end of the stream; it is closed for good once the case
    is checked)."""
    _r, w = await asyncio.open_connection("127.0.0.1", c.route)
    with contextlib.suppress(ConnectionError):
        for chunk in chunks:
            w.write(chunk)
            await w.drain()
        if close:
            w.write_eof()
    c.left_open.append(w)


async def flood(c: Ctx) -> bytes:
    conns = [await asyncio.open_connection("127.0.0.1", c.route) for _ in range(8)]
    await wait_until_async(logged(c.cap, "connection_limit"), 10, "connection_limit")
    for _, w in conns:
        w.close()
    # Their slots come back once the proxy has seen them close.
    await wait_until_async(lambda: c.proxy.admission.active == 1, 10, "slots released")
    return b""


async def one_byte_at_a_time(c: Ctx) -> bytes:
    _r, w = await asyncio.open_connection("127.0.0.1", c.route)
    with contextlib.suppress(ConnectionError):
        for b in VERSION[:8]:
            if event_logged(c.cap, "timeout", "first bytes")():
                break
            w.write(bytes([b]))
            await w.drain()
            await asyncio.sleep(0.2)
    w.close()
    return b""


async def sent(c: Ctx, chunks: list[bytes], close: bool = False) -> bytes:
    await send(c, chunks, close=close)
    return b""


Attack = Callable[[Ctx], Awaitable[bytes]]

CASES: dict[str, tuple[Attack, str, str, bytes | None]] = {
    # name: (attack, expected event, text in the event, expected SOCKS reply prefix)
    "bad magic": (
        lambda c: sent(c, [VERSION + encode_frame(MAINNET, "ping", b"x" * 8)]),
        "bad_magic", "wrong magic", None,
    ),
    "oversize length": (
        lambda c: sent(c, [VERSION + header(b"block", 4_000_001)]),
        "oversize", "declares 4000001 bytes", None,
    ),
    "bad checksum": (
        lambda c: sent(c, [VERSION + header(b"ping", 8, b"bad!") + b"1" * 8]),
        "bad_checksum", "bad checksum", None,
    ),
    "non-printable type": (
        lambda c: sent(c, [VERSION + header(b"pi\x07g", 0, checksum(b""))]),
        "invalid_type", "invalid message type", None,
    ),
    "bytes after the type's NUL": (
        lambda c: sent(c, [VERSION + header(b"ping\0x", 0, checksum(b""))]),
        "invalid_type", "invalid message type", None,
    ),
    "truncated header then close": (
        lambda c: sent(c, [VERSION + header(b"ping", 8)[:10]], close=True),
        "close", '"reason":"eof"', None,
    ),
    "truncated payload then close": (
        lambda c: sent(c, [VERSION + PING[:-3]], close=True),
        "close", '"reason":"eof"', None,
    ),
    "byte-a-second sender": (one_byte_at_a_time, "timeout", "first bytes", None),
    "connection flood past the limit": (flood, "connection_limit", '"limit":6', None),
    "v2 garbage": (  # under decrypt (the default): a key, then no garbage terminator ever
        lambda c: sent(c, [random.Random(1).randbytes(64)]),
        "timeout", "BIP324 handshake", None,
    ),
    "connect and close at once": (
        lambda c: sent(c, [], close=True), "close", "closed before handshake", None,
    ),
    "BIND command": (
        lambda c: talk(c.socks, [greeting(0), request(1, b"\x7f\0\0\1", c.echo, cmd=2)]),
        "socks_error", "command 2 not supported", b"\x05\x00\x05\x07",
    ),
    "destination refuses": (
        lambda c: talk(c.socks, [greeting(0), request(1, b"\x7f\0\0\1", c.refused)]),
        "socks_error", "CONNECTION_REFUSED", b"\x05\x00\x05\x05",
    ),
}  # fmt: skip

SHORT_HANDSHAKE = {"byte-a-second sender", "v2 garbage"}
"""Cases that end at ``handshake_timeout``: 0.5 s for them, 5 s for the others."""


def files_outside(root: Path, allowed: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_relative_to(allowed)]


@pytest.mark.parametrize("name", sorted(CASES))
async def test_hostile_case(tmp_path: Path, name: str) -> None:
    attack, event, text, reply = CASES[name]
    echo = await echo_server()
    echo_port = echo.sockets[0].getsockname()[1]
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    refused = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    cap = tmp_path / "work" / "cap"
    timeout = 0.5 if name in SHORT_HANDSHAKE else 5
    try:
        async with running_proxy(
            tmp_path / "work",
            route=route_to(echo_port),
            socks5={"listen": "127.0.0.1:0", "allow": ["127.0.0.1:*"]},
            limits={"handshake_timeout": timeout, "max_connections": 6},
        ) as proxy:
            ctx = Ctx(proxy, proxy.addresses[0][1], proxy.addresses[1][1], echo_port, refused, cap)
            # The honest connection, open before and after the attack.
            hr, hw = await asyncio.open_connection("127.0.0.1", ctx.route)
            hw.write(VERSION)
            assert await asyncio.wait_for(hr.readexactly(len(VERSION)), 5) == VERSION
            got = await asyncio.wait_for(attack(ctx), 30)
            await wait_until_async(event_logged(cap, event, text), 10, f"{event} {text!r}")
            if reply is not None:
                assert got.startswith(reply), got
            hw.write(PING)
            assert await asyncio.wait_for(hr.readexactly(len(PING)), 5) == PING
            hw.close()
            # Still accepting: a new honest connection works.
            honest = VERSION + PING
            assert await talk(ctx.route, [honest], expect=len(honest)) == honest
            for w in ctx.left_open:
                w.close()
    finally:
        echo.close()
    assert files_outside(tmp_path, cap) == []


def test_at_least_twenty_cases() -> None:
    assert len(set(CASES) | set(SOCKS_CASES) | set(FIRST_BYTES_CASES)) >= 20


async def test_wrong_socks_credentials(tmp_path: Path) -> None:
    echo = await echo_server()
    echo_port = echo.sockets[0].getsockname()[1]
    try:
        async with running_proxy(
            tmp_path, socks5={"listen": "127.0.0.1:0", "username": "alice", "password": "s3cret"}
        ) as proxy:
            port = proxy.addresses[0][1]
            bad = await talk(port, [greeting(0, 2), b"\x01\x05alice\x05wrong"])
            assert bad == b"\x05\x02\x01\x01"  # USER_PASS chosen, then failure
            noauth = await talk(port, [greeting(0)])
            assert noauth == b"\x05\xff"  # NOAUTH is not enough when credentials are set
            want = b"\x05\x02\x01\x00" + b"\x05\x00\x00\x01" + bytes(6) + VERSION
            good = await talk(
                port,
                [
                    greeting(2),
                    b"\x01\x05alice\x06s3cret",
                    request(1, b"\x7f\0\0\1", echo_port),
                    VERSION,
                ],
                expect=len(want),
            )
            assert good == want
    finally:
        echo.close()
    events = read_events(tmp_path / "cap", "socks_error")
    assert any("wrong username" in e["error"] for e in events)
