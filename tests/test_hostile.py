"""Hostile input, case by case, while an honest connection keeps talking.

For each named case: the expected event (the log line), no effect on the honest
connection opened before it, no crash (the proxy keeps accepting), and no file outside
capture_dir. The table in the README's Reliability section is this list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from msgcap.capture.framing import Network, checksum, encode_frame
from tests.conftest import (
    MAGIC,
    PING,
    VERSION,
    echo_server,
    logged,
    read_events,
    running_proxy,
    wait_until_async,
)

MAINNET = Network.MAIN.magic


@dataclass
class Ctx:
    route: int
    socks: int
    echo: int
    refused: int
    cap: Path
    """The capture directory (with the event log)."""


async def talk(port: int, chunks: list[bytes], *, delay: float = 0.0, wait: float = 5.0) -> bytes:
    """Connect, send ``chunks`` (with ``delay`` between them), read until closed."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    try:
        for c in chunks:
            w.write(c)
            await w.drain()
            if delay:
                await asyncio.sleep(delay)
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(wait):
                while data := await r.read(1 << 16):
                    got += data
    except ConnectionError:
        pass
    finally:
        w.close()
    return bytes(got)


def greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def request(atyp: int, addr: bytes, port: int, cmd: int = 1, ver: int = 5) -> bytes:
    return bytes((ver, cmd, 0, atyp)) + addr + port.to_bytes(2, "big")


def domain(name: bytes) -> bytes:
    return bytes((len(name),)) + name


def header(msgtype: bytes, length: int, csum: bytes = b"\0\0\0\0", magic: bytes = MAGIC) -> bytes:
    return magic + msgtype.ljust(12, b"\0") + length.to_bytes(4, "little") + csum


Attack = Callable[[Ctx], Awaitable[bytes]]


async def flood(c: Ctx) -> bytes:
    conns = [await asyncio.open_connection("127.0.0.1", c.route) for _ in range(8)]
    await wait_until_async(logged(c.cap, "connection_limit"), 10, "connection_limit")
    for _, w in conns:
        w.close()
    return b""


CASES: dict[str, tuple[Attack, str, str, bytes | None]] = {
    # name: (attack, expected event, text in the event, expected SOCKS reply prefix)
    "bad magic": (
        lambda c: talk(c.route, [VERSION + encode_frame(MAINNET, "ping", b"x" * 8)]),
        "bad_magic", "wrong magic", None,
    ),
    "oversize length": (
        lambda c: talk(c.route, [VERSION + header(b"block", 4_000_001)]),
        "oversize", "declares 4000001 bytes", None,
    ),
    "bad checksum": (
        lambda c: talk(c.route, [VERSION + header(b"ping", 8, b"bad!") + b"1" * 8], wait=0.5),
        "bad_checksum", "bad checksum", None,
    ),
    "non-printable type": (
        lambda c: talk(c.route, [VERSION + header(b"pi\x07g", 0, checksum(b""))], wait=0.5),
        "invalid_type", "invalid message type", None,
    ),
    "bytes after the type's NUL": (
        lambda c: talk(c.route, [VERSION + header(b"ping\0x", 0, checksum(b""))], wait=0.5),
        "invalid_type", "invalid message type", None,
    ),
    "truncated header then close": (
        lambda c: talk(c.route, [VERSION + header(b"ping", 8)[:10]], wait=0.5),
        "close", '"reason":"eof"', None,
    ),
    "truncated payload then close": (
        lambda c: talk(c.route, [VERSION + PING[:-3]], wait=0.5),
        "close", '"reason":"eof"', None,
    ),
    "byte-a-second sender": (
        lambda c: talk(c.route, [bytes([b]) for b in VERSION[:8]], delay=0.4),
        "timeout", "first bytes", None,
    ),
    "connection flood past the limit": (flood, "connection_limit", '"limit":6', None),
    "v2 garbage": (  # under decrypt (the default): a key, then no garbage terminator ever
        lambda c: talk(c.route, [random.Random(1).randbytes(64)]),
        "timeout", "BIP324 handshake", None,
    ),
    "connect and close at once": (
        lambda c: talk(c.route, [], wait=0),
        "close", "closed before handshake", None,
    ),
    "SOCKS4 greeting": (
        lambda c: talk(c.socks, [b"\x04\x01\x00\x50\x7f\x00\x00\x01user\0"]),
        "socks_error", "not SOCKS5", None,
    ),
    "no acceptable auth method": (
        lambda c: talk(c.socks, [greeting(0x80)]),
        "socks_error", "no acceptable auth method", b"\x05\xff",
    ),
    "greeting cut short": (
        lambda c: talk(c.socks, [b"\x05\x03\x00"], wait=0.5),
        "socks_error", "client closed during greeting", None,
    ),
    "bad auth sub-negotiation": (
        lambda c: talk(c.socks, [greeting(2), b"\x05\x01u\x01p"]),
        "socks_error", "bad auth sub-negotiation version", b"\x05\x02",
    ),
    "credentials cut short": (
        lambda c: talk(c.socks, [greeting(2), b"\x01\x05us"], wait=0.5),
        "socks_error", "client closed during authentication", b"\x05\x02",
    ),
    "BIND command": (
        lambda c: talk(c.socks, [greeting(0), request(1, b"\x7f\0\0\1", c.echo, cmd=2)]),
        "socks_error", "command 2 not supported", b"\x05\x00\x05\x07",
    ),
    "unknown address type": (
        lambda c: talk(c.socks, [greeting(0), request(5, b"\0" * 4, c.echo)]),
        "socks_error", "address type 5", b"\x05\x00\x05\x08",
    ),
    "host name with ../": (
        lambda c: talk(c.socks, [greeting(0), request(3, domain(b"../../etc/cron.d"), c.echo)]),
        "socks_error", "is not a DNS label", b"\x05\x00\x05\x04",
    ),
    "host name with NUL": (
        lambda c: talk(c.socks, [greeting(0), request(3, domain(b"local\0host"), c.echo)]),
        "socks_error", "refused host name", b"\x05\x00\x05\x04",
    ),
    "255-character host name": (
        lambda c: talk(c.socks, [greeting(0), request(3, domain(b"a" * 255), c.echo)]),
        "socks_error", "length 255", b"\x05\x00\x05\x04",
    ),
    "IPv6 zone id": (
        lambda c: talk(c.socks, [greeting(0), request(3, domain(b"fe80::1%lo"), c.echo)]),
        "socks_error", "zone ids", b"\x05\x00\x05\x04",
    ),
    "non-ASCII host name": (
        lambda c: talk(c.socks, [greeting(0), request(3, domain("bü.example".encode()), c.echo)]),
        "socks_error", "non-ASCII host name", b"\x05\x00\x05\x01",
    ),
    "destination refuses": (
        lambda c: talk(c.socks, [greeting(0), request(1, b"\x7f\0\0\1", c.refused)]),
        "socks_error", "CONNECTION_REFUSED", b"\x05\x00\x05\x05",
    ),
    "destination outside the allow list": (
        lambda c: talk(c.socks, [greeting(0), request(1, b"\x7f\0\0\2", c.echo)]),
        "socks_error", "not in allow list", b"\x05\x00\x05\x02",
    ),
    "SOCKS request with version 4": (
        lambda c: talk(c.socks, [greeting(0), request(1, b"\x7f\0\0\1", c.echo, ver=4)]),
        "socks_error", "bad request version 4", b"\x05\x00\x05\x01",
    ),
}  # fmt: skip


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
    try:
        async with running_proxy(
            tmp_path / "work",
            route=[{"listen": "127.0.0.1:0", "peer": f"127.0.0.1:{echo_port}"}],
            socks5={"listen": "127.0.0.1:0", "allow": ["127.0.0.1:*"]},
            limits={"handshake_timeout": 1.5, "max_connections": 6},
        ) as proxy:
            ctx = Ctx(proxy.addresses[0][1], proxy.addresses[1][1], echo_port, refused, cap)
            # The honest connection, open before and after the attack.
            hr, hw = await asyncio.open_connection("127.0.0.1", ctx.route)
            hw.write(VERSION)
            assert await asyncio.wait_for(hr.readexactly(len(VERSION)), 5) == VERSION
            got = await asyncio.wait_for(attack(ctx), 30)
            if reply is not None:
                assert got.startswith(reply), got
            hw.write(PING)
            assert await asyncio.wait_for(hr.readexactly(len(PING)), 5) == PING
            hw.close()
            # Still accepting: a new honest connection works.
            assert await talk(ctx.route, [VERSION + PING], wait=0.5) == VERSION + PING
    finally:
        echo.close()
    lines = (cap / "events.jsonl").read_text().splitlines()
    matching = [x for x in lines if json.loads(x)["event"] == event and text in x]
    assert matching, f"no {event} event with {text!r} in:\n" + "\n".join(lines)
    assert files_outside(tmp_path, cap) == []


def test_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20


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
            good = await talk(
                port,
                [
                    greeting(2),
                    b"\x01\x05alice\x06s3cret",
                    request(1, b"\x7f\0\0\1", echo_port),
                    VERSION,
                ],
                wait=0.5,
            )
            assert good == b"\x05\x02\x01\x00" + b"\x05\x00\x00\x01" + bytes(6) + VERSION
    finally:
        echo.close()
    events = read_events(tmp_path / "cap", "socks_error")
    assert any("wrong username" in e["error"] for e in events)
