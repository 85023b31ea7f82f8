"""The proxy's set-up decisions without sockets: the SOCKS5 negotiation, the first bytes
(v1, BIP324 under each ``v2`` policy, closed, timed out), admission under
``max_connections`` and the transparent route's perspective.

Each is a plain object fed what the other end did (``tests/playbook.py``) and checked
on what it answers, fed whole, a byte at a time and in uneven pieces. The named hostile
cases of the README's table are in ``tests/test_hostile.py``.
"""

from __future__ import annotations

import errno
import random
import socket
from typing import Any

import pytest

from msgcap.capture.bip324 import V2Session
from msgcap.capture.framing import v1_version_prefix
from msgcap.proxy.config import HostPort, Socks5, V2Policy
from msgcap.proxy.events import Close, ConnectionLimit, Timeout, V2Downgrade, V2Passthrough
from msgcap.proxy.policy import Admission, FirstBytes, Opening, Verdict
from msgcap.proxy.socks5 import (
    Fail,
    Negotiation,
    Reply,
    Request,
    Send,
    SocksError,
    reply_bytes,
    reply_for,
)
from msgcap.proxy.transparent import Kind, classify
from tests.conftest import MAGIC, PING, VERSION
from tests.playbook import EOF, TIMEOUT, play, play_every_way, ways

OPEN = Socks5(HostPort("127.0.0.1", 0))
ALICE = Socks5(HostPort("127.0.0.1", 0), username="alice", password="s3cret")
PREFIX = v1_version_prefix(MAGIC)


def connect_ipv4(port: int = 8333) -> bytes:
    return b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")


def negotiate(cfg: Socks5, *script: bytes | Any) -> list[Any]:
    return play_every_way(lambda: Negotiation(cfg), script)


# --- SOCKS5 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes,host,atyp",
    [
        (b"\x01\x7f\x00\x00\x01", "127.0.0.1", 1),
        (b"\x04" + bytes(15) + b"\x01", "::1", 4),
        (b"\x03\x0dseed.example.", "seed.example.", 3),
        (b"\x03\x09127.0.0.1", "127.0.0.1", 3),  # how Core sends an address
    ],
)
def test_socks_connect(request_bytes: bytes, host: str, atyp: int) -> None:
    got = negotiate(OPEN, b"\x05\x01\x00", b"\x05\x01\x00" + request_bytes + b"\x20\x8d")
    assert got == [Send(b"\x05\x00"), Request(host, 8333, atyp, None)]


def test_socks_any_credentials_when_none_are_set() -> None:
    """Core's stream isolation: USER_PASS with random credentials, all accepted."""
    got = negotiate(OPEN, b"\x05\x01\x02", b"\x01\x03abc\x02xy", connect_ipv4())
    assert got == [Send(b"\x05\x02\x01\x00"), Request("127.0.0.1", 8333, 1, "abc")]
    # NOAUTH is preferred when both are offered.
    assert negotiate(OPEN, b"\x05\x02\x02\x00", connect_ipv4())[0] == Send(b"\x05\x00")


def test_socks_configured_credentials() -> None:
    good = negotiate(ALICE, b"\x05\x02\x00\x02", b"\x01\x05alice\x06s3cret", connect_ipv4())
    assert good == [Send(b"\x05\x02\x01\x00"), Request("127.0.0.1", 8333, 1, "alice")]
    bad = negotiate(ALICE, b"\x05\x02\x00\x02", b"\x01\x05alice\x05wrong")
    assert bad == [Send(b"\x05\x02\x01\x01"), Fail("wrong username or password")]
    noauth = negotiate(ALICE, b"\x05\x01\x00")
    assert noauth == [Send(b"\x05\xff"), Fail("no acceptable auth method among [0]")]


@pytest.mark.parametrize(
    "script,during",
    [
        ([], "greeting"),
        ([b"\x05"], "greeting"),
        ([b"\x05\x02\x00"], "greeting"),
        ([b"\x05\x01\x02", b"\x01\x05al"], "authentication"),
        ([b"\x05\x01\x02", b"\x01\x00\x01"], "authentication"),
        ([b"\x05\x01\x00", b"\x05\x01\x00\x03\x05ab"], "request"),
        ([b"\x05\x01\x00", connect_ipv4()[:-1]], "request"),
    ],
)
def test_socks_client_closes(script: list[bytes], during: str) -> None:
    got = negotiate(OPEN, *script, EOF)
    assert got[-1] == Fail(f"client closed during {during}")
    assert all(isinstance(c, Send) for c in got[:-1])


def test_socks_timeout() -> None:
    assert negotiate(OPEN, b"\x05\x01", TIMEOUT) == [Fail("timeout during negotiation")]


def test_socks_reads_no_further_than_the_request() -> None:
    """A reader asking for ``wanted`` bytes stops at the request's last byte; what is fed
    past it is kept for the first bytes."""
    stream = b"\x05\x01\x02" + b"\x01\x01u\x00" + connect_ipv4() + VERSION
    n = Negotiation(OPEN)
    at = 0
    while n.result is None:
        want = n.wanted
        assert want >= 1
        n.receive_data(stream[at : at + want])
        at += want
    assert stream[at:] == VERSION and n.trailing == b"" and n.wanted == 0
    whole = Negotiation(OPEN)
    commands = whole.receive_data(stream)
    assert commands[-1] == Request("127.0.0.1", 8333, 1, "u")
    assert whole.trailing == VERSION
    assert whole.receive_data(PING) == [] and whole.trailing == VERSION + PING
    assert play(Negotiation(OPEN), [stream[: len(stream) - len(VERSION)]])[-1] == n.result


def test_socks_answers_nothing_after_its_result() -> None:
    n = Negotiation(OPEN)
    assert n.receive_data(b"\x04\x01") == [Fail("not SOCKS5: version byte 0x04")]
    assert n.receive_eof() == [] and n.timed_out() == [] and n.wanted == 0


@pytest.mark.parametrize(
    "error,code",
    [
        (SocksError("x", Reply.NOT_ALLOWED), Reply.NOT_ALLOWED),
        (SocksError("x"), Reply.GENERAL_FAILURE),
        (TimeoutError(), Reply.TTL_EXPIRED),
        (ConnectionRefusedError(), Reply.CONNECTION_REFUSED),
        (socket.gaierror(socket.EAI_NONAME, "no such name"), Reply.HOST_UNREACHABLE),
        (OSError(errno.ENETUNREACH, "x"), Reply.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "x"), Reply.HOST_UNREACHABLE),
        (OSError(errno.EMFILE, "x"), Reply.GENERAL_FAILURE),
        (ValueError(), Reply.GENERAL_FAILURE),
    ],
)
def test_socks_reply_for_a_failed_connect(error: BaseException, code: Reply) -> None:
    assert reply_for(error) is code
    assert reply_bytes(code) == bytes((5, code, 0, 1)) + bytes(6)


# --- the first bytes --------------------------------------------------------------------


def first_bytes(policy: V2Policy = V2Policy.DECRYPT) -> FirstBytes:
    return FirstBytes(MAGIC, policy, 7, "peer")


@pytest.mark.parametrize("policy", list(V2Policy))
def test_v1_is_relayed_under_every_policy(policy: V2Policy) -> None:
    got = play_every_way(lambda: first_bytes(policy), [PREFIX])
    assert got == [Verdict(Opening.V1, PREFIX)]
    # What came with the prefix is passed on with it.
    assert first_bytes(policy).receive_data(VERSION + PING) == Verdict(Opening.V1, VERSION + PING)


KEY = bytes(range(100, 164))


@pytest.mark.parametrize(
    "policy,verdict",
    [
        (V2Policy.DECRYPT, Verdict(Opening.V2_DECRYPT, KEY)),
        (V2Policy.PASSTHROUGH, Verdict(Opening.V2_PASSTHROUGH, KEY, V2Passthrough(
            conn=7, peer="peer", first_bytes=KEY[:16].hex()))),
        (V2Policy.DOWNGRADE, Verdict(Opening.CLOSE, b"", V2Downgrade(
            conn=7, peer="peer", first_bytes=KEY[:16].hex(), note="closed before sending a byte"))),
    ],
)  # fmt: skip
def test_v2_under_each_policy(policy: V2Policy, verdict: Verdict) -> None:
    assert play(first_bytes(policy), [KEY]) == [verdict]
    for _name, steps in ways([KEY]):  # decided at the first byte that is not v1
        got = play(first_bytes(policy), steps)
        assert [v.opening for v in got] == [verdict.opening]


def test_v2_decided_where_the_prefix_stops_matching() -> None:
    near = PREFIX[:15] + b"\x01"  # a key that begins like the v1 prefix
    d = first_bytes()
    for i in range(15):
        assert d.receive_data(near[i : i + 1]) is None
        assert d.wanted == len(PREFIX) - i - 1
    assert d.receive_data(near[15:]) == Verdict(Opening.V2_DECRYPT, near)
    assert d.wanted == 0
    with pytest.raises(ValueError):
        d.receive_data(b"x")


@pytest.mark.parametrize("sent", [b"", PREFIX[:1], PREFIX[:15]])
def test_closed_before_the_prefix(sent: bytes) -> None:
    closed = Close(conn=7, peer="peer", reason="closed before handshake")
    assert play_every_way(first_bytes, [sent, EOF]) == [Verdict(Opening.CLOSE, event=closed)]
    timeout = Timeout(conn=7, peer="peer", during="first bytes")
    assert play_every_way(first_bytes, [sent, TIMEOUT]) == [Verdict(Opening.CLOSE, event=timeout)]


def test_v2_garbage_never_completes_the_handshake() -> None:
    """Random bytes under ``decrypt``: taken as a key, answered with the responder's,
    then a garbage terminator and version packet that never come (the server's
    ``handshake_timeout`` ends it: ``test_hostile.py``'s "v2 garbage")."""
    garbage = random.Random(1).randbytes(64)
    verdict = first_bytes().receive_data(garbage)
    assert verdict == Verdict(Opening.V2_DECRYPT, garbage)
    responder = V2Session(initiator=False, magic=MAGIC)
    responder.receive_data(verdict.first)
    responder.next_events()
    assert responder.data_to_send() and not responder.peer_version_received


# --- admission ------------------------------------------------------------------------


def test_admission_at_the_limit() -> None:
    a = Admission(2)
    assert [a.admit("outbound", "c:1"), a.admit("outbound", "c:2")] == [1, 2]
    assert a.admit("socks5", "c:3") == ConnectionLimit(conn=3, route="socks5", client="c:3",
                                                       limit=2)  # fmt: skip
    assert a.active == 2
    a.release()
    assert a.admit("outbound", "c:4") == 4 and a.active == 2


# --- the transparent route ------------------------------------------------------------


def test_transparent_perspective_and_loop() -> None:
    def local(host: str) -> bool:
        return host in ("127.0.0.1", "10.0.0.1")

    out = classify(HostPort("203.0.113.7", 8333), 8338, None, local)
    assert (out.kind, out.peer(("10.0.0.1", 40000))) == (Kind.OUTBOUND, "203.0.113.7_8333")
    inbound = classify(HostPort("10.0.0.1", 8333), 8338, None, local)
    assert (inbound.kind, inbound.peer(("198.51.100.1", 5))) == (Kind.INBOUND, "198.51.100.1_5")
    loop = classify(HostPort("127.0.0.1", 8338), 8338, None, local)
    assert loop.kind is Kind.LOOP and "own listener" in loop.reason
    assert loop.peer(("127.0.0.1", 6)) == "127.0.0.1_6"
