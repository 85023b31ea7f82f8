"""The relay's decisions without sockets (:mod:`msgcap.proxy.flow`, :class:`MessageFlow`).

Playbook style, after mitmproxy's ``tutils.Playbook``: a script of events in (bytes
received, end of stream, connection lost, a capture written, time passing) and the
commands out (forward, capture, hold, pass the end on, close, log), no sockets and no
waits. Framing cases are fed whole and one byte at a time, as h11's tests do. The
asyncio layer that carries the commands out is tested end to end in test_relay.py,
test_v2_relay.py and test_hostile_relay.py.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

import pytest

from msgcap.capture import bip324_pipe
from msgcap.capture.bip324 import V2Session
from msgcap.capture.bip324_events import V2Message
from msgcap.capture.framing import FrameProblem, encode_frame
from msgcap.capture.records import Direction, record_messages
from msgcap.proxy.budget import FREE, FrameBudget, Waiter
from msgcap.proxy.events import FrameError, Timeout, V2Decoys, V2StreamError
from msgcap.proxy.flow import (
    ByteFlow,
    CaptureFrames,
    CaptureMessages,
    CaptureRecords,
    Close,
    Command,
    End,
    Finish,
    Flow,
    Forward,
    Hold,
    Log,
    Origin,
    Pair,
    PassEof,
    Reset,
    Shared,
)
from msgcap.proxy.v2 import DECOY_WARNING, MessageFlow, V1Leg, V2Leg
from tests.conftest import MAGIC, PING, VERSION

BAD_MAGIC = b"\xfa\xbf\xb5\xdb" + PING[4:]  # mainnet's magic on a regtest connection
OVERSIZE = MAGIC + b"block".ljust(12, b"\0") + (33_000_000).to_bytes(4, "little") + bytes(4)


class Playbook:
    """Both directions of one connection: events in, commands out. A command that ends
    the relay ends the pair, as the asyncio layer does."""

    def __init__(
        self,
        strict: bool = False,
        raw: bool = False,
        budget: FrameBudget | None = None,
        idle_timeout: float = 0.0,
        flows: tuple[Flow, Flow] | None = None,
    ) -> None:
        self.shared = Shared(strict=strict, budget=budget)
        self.held: list[str] = []
        """What the budget did to each direction ("pause node", "resume peer", ...)."""
        if flows is None:
            flows = (self.byte_flow("node", Direction.SENT, raw),
                     self.byte_flow("peer", Direction.RECV, raw))  # fmt: skip
        self.node, self.peer = flows
        self.pair = Pair(self.node, self.peer, idle_timeout, now=0.0)

    def waiter(self, name: str) -> Waiter:
        return Waiter(lambda: self.held.append(f"pause {name}"),
                      lambda: self.held.append(f"resume {name}"))  # fmt: skip

    def byte_flow(self, name: str, direction: Direction, raw: bool = False) -> ByteFlow:
        origin = Origin(7, "peer:8333", direction)
        return ByteFlow(origin, self.shared, MAGIC, self.waiter(name), raw=raw)

    def __call__(self, commands: list[Command]) -> list[Command]:
        for c in commands:
            if isinstance(c, End):
                self.pair.finish(c.reason)
        return commands


def forwarded(commands: Sequence[Command]) -> bytes:
    return b"".join(bytes(c.data) for c in commands if isinstance(c, Forward))


def kinds(commands: Sequence[Command]) -> list[str]:
    return [type(c).__name__ for c in commands]


def pieces(data: bytes, how: str) -> list[bytes]:
    """``data`` whole, or one byte at a time."""
    return [data] if how == "whole" else [data[i : i + 1] for i in range(len(data))]


def feed(pb: Playbook, flow: Flow, data: bytes, how: str, t: float = 0.0) -> list[Command]:
    out: list[Command] = []
    for piece in pieces(data, how):
        out += pb(flow.data(piece, t))
    return out


def capture_all(pb: Playbook, flow: Flow) -> list[Command]:
    """The capture thread writes every capture this flow asked for."""
    out: list[Command] = []
    while flow.completed < flow.submitted:
        out += pb(flow.captured())
    return out


# --- framing errors ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "bytes"])
@pytest.mark.parametrize("bad", [BAD_MAGIC, OVERSIZE], ids=["bad magic", "oversize"])
def test_fatal_framing_error_mid_chunk_forwards_what_precedes_then_closes(
    how: str, bad: bytes
) -> None:
    pb = Playbook()
    out = feed(pb, pb.node, VERSION + PING + bad + PING, how)
    if how == "whole":
        assert forwarded(out) == VERSION + PING
    else:  # bytes that could still begin a good frame were forwarded as they came
        assert (VERSION + PING + bad).startswith(forwarded(out))
        assert len(VERSION + PING) <= len(forwarded(out)) < len(VERSION + PING) + 24
    captured = [f for c in out if isinstance(c, CaptureFrames) for f in c.frames]
    assert [f.raw_msgtype.rstrip(b"\0") for f in captured] == [b"version", b"ping"]
    (log,) = [c for c in out if isinstance(c, Log)]
    assert isinstance(log.event, FrameError) and log.event.direction is Direction.SENT
    expected = FrameProblem.BAD_MAGIC if bad is BAD_MAGIC else FrameProblem.OVERSIZE
    assert log.event.reason is expected
    assert out[-1] == Close("framing error")  # the close comes last
    assert pb.pair.finished and pb.pair.close_reason == "framing error"
    assert pb.node.data(PING, 1.0) == [] and pb.peer.data(PING, 1.0) == []
    assert pb.node.stats.bytes == len(forwarded(out))


def test_raw_flow_forwards_anything_uncaptured() -> None:
    pb = Playbook(raw=True)
    assert pb(pb.node.data(BAD_MAGIC, 0.0)) == [Forward(BAD_MAGIC)]
    assert pb.node.stats.bytes == len(BAD_MAGIC)


def test_frames_are_captured_as_they_complete() -> None:
    pb = Playbook()
    out = feed(pb, pb.node, VERSION + PING, "bytes")
    assert forwarded(out) == VERSION + PING  # each byte at once, not strict
    captures = [c for c in out if isinstance(c, CaptureFrames)]
    assert [len(c.frames) for c in captures] == [1, 1]
    assert captures[0].size == len(VERSION) and captures[1].t0 > captures[0].t0


# --- the strict relay -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_strict_forwards_only_after_capture(how: str) -> None:
    pb = Playbook(strict=True)
    half = len(PING) // 2
    out = feed(pb, pb.node, VERSION + PING[:half], how)
    assert forwarded(out) == b"" and kinds(out) == ["CaptureFrames"]
    assert forwarded(capture_all(pb, pb.node)) == VERSION  # the incomplete ping waits
    out = feed(pb, pb.node, PING[half:], how)
    assert forwarded(out) == b""
    assert forwarded(capture_all(pb, pb.node)) == PING
    assert pb.node.stats.bytes == len(VERSION + PING)


def test_strict_captures_are_reported_in_order() -> None:
    pb = Playbook(strict=True)
    pb(pb.node.data(VERSION, 0.0))
    pb(pb.node.data(PING + PING[:3], 0.0))
    assert forwarded(pb(pb.node.captured())) == VERSION
    assert forwarded(pb(pb.node.captured())) == PING


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_strict_fatal_error_closes_after_the_capture_of_what_precedes(how: str) -> None:
    """Not a byte of the frame in error crosses (fed byte by byte, its first three bytes
    were held before the fourth showed that its magic is wrong)."""
    pb = Playbook(strict=True)
    out = feed(pb, pb.node, VERSION + PING + BAD_MAGIC + PING, how)
    assert forwarded(out) == b""
    assert Hold("framing error") in out and not pb.pair.finished
    out = capture_all(pb, pb.node)
    assert forwarded(out) == VERSION + PING and out[-1] == Close("framing error")
    assert pb.pair.close_reason == "framing error"


def test_strict_fatal_error_with_nothing_pending_closes_at_once() -> None:
    pb = Playbook(strict=True)
    out = pb(pb.node.data(BAD_MAGIC, 0.0))
    assert kinds(out) == ["Log", "Hold", "Close"]


def test_strict_failed_capture_forwards_nothing_more() -> None:
    """A capture that fails is never reported: the relay ends with what it held."""
    pb = Playbook(strict=True)
    pb(pb.node.data(VERSION, 0.0))
    pb(pb.node.data(PING, 0.0))
    assert forwarded(pb(pb.node.captured())) == VERSION
    pb.pair.finish("capture error")  # the second capture failed
    assert pb.node.captured() == [] and pb.node.data(PING, 1.0) == []
    assert pb.node.held == type(pb.node.held)()


def random_stream(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    out = [encode_frame(MAGIC, "version", rng.randbytes(100))]
    for _ in range(n):
        out.append(encode_frame(MAGIC, "tx", rng.randbytes(rng.choice([50, 1000, 20_000]))))
    return b"".join(out)


@pytest.mark.parametrize("fail_at", [0, 1, 3, 8, 10_000])
@pytest.mark.parametrize("chunking", ["whole", "odd pieces", "small pieces"])
def test_strict_forwards_exactly_what_was_captured(fail_at: int, chunking: str) -> None:
    """The capture thread writes the captures in its own time and fails after
    ``fail_at`` of them: what crossed is exactly the frames captured before, in order."""
    stream = random_stream(3, 300)
    rng = random.Random(fail_at)
    pb = Playbook(strict=True)
    pending: deque[CaptureFrames] = deque()
    got, captured = bytearray(), bytearray()
    written = pos = 0

    def write_captures(upto: int) -> None:
        nonlocal written
        while len(pending) > upto and not pb.pair.finished:
            c = pending.popleft()
            if written == fail_at:
                pb.pair.finish("capture error")
                return
            written += 1
            for f in c.frames:
                captured.extend(stream[f.offset : f.offset + 24 + f.length])
            got.extend(forwarded(pb(pb.node.captured())))

    while pos < len(stream) and not pb.pair.finished:
        step = {"whole": len(stream), "odd pieces": rng.randint(1, 30_000),
                "small pieces": rng.randint(1, 50)}[chunking]  # fmt: skip
        out = pb(pb.node.data(stream[pos : pos + step], 0.0))
        pos += step
        got.extend(forwarded(out))  # nothing: strict
        pending.extend(c for c in out if isinstance(c, CaptureFrames))
        write_captures(rng.randint(0, 3))  # the capture thread lags a little
    write_captures(0)
    assert bytes(got) == bytes(captured) and stream.startswith(captured)
    if not pb.pair.finished:  # every capture was written before the failure came due
        assert bytes(got) == stream and written <= fail_at
    else:
        assert len(got) < len(stream) and pb.pair.close_reason == "capture error"


# --- the end of a stream -----------------------------------------------------------------


def test_eof_is_passed_on_after_capture() -> None:
    pb = Playbook(strict=True)
    pb(pb.node.data(VERSION + PING[:5], 0.0))
    assert pb(pb.node.eof()) == []  # the capture of the version is not written yet
    out = capture_all(pb, pb.node)
    assert out == [Forward(VERSION), PassEof()]  # the incomplete ping is not forwarded
    assert not pb.pair.finished  # the other direction goes on (a half-close)
    assert forwarded(pb(pb.peer.data(PING, 0.0))) == b""
    assert forwarded(capture_all(pb, pb.peer)) == PING
    assert pb(pb.peer.eof()) == [PassEof(), Finish("eof")]
    assert pb.pair.close_reason == "eof"


def test_eof_not_strict_is_passed_on_at_once() -> None:
    pb = Playbook()
    pb(pb.node.data(VERSION, 0.0))
    assert pb(pb.node.eof()) == [PassEof()]
    assert pb(pb.peer.eof()) == [PassEof(), Finish("eof")]


def test_reset_is_passed_on_at_once_and_a_close_after_capture() -> None:
    pb = Playbook(strict=True)
    pb(pb.node.data(VERSION, 0.0))
    assert pb(pb.node.lost(None)) == []
    assert pb(pb.node.captured()) == [Forward(VERSION), Finish("closed")]
    pb = Playbook(strict=True)
    pb(pb.node.data(VERSION, 0.0))
    assert pb(pb.node.lost(ConnectionResetError())) == [Reset("ConnectionResetError")]
    assert pb.node.captured() == []  # held bytes are dropped with the relay


# --- idle timeout ------------------------------------------------------------------------


def test_idle_timeout() -> None:
    pb = Playbook(idle_timeout=30.0)
    assert pb.pair.idle(29.0) == []
    pb(pb.peer.data(VERSION, 20.0))
    assert pb.pair.idle(45.0) == []  # 25 s since the last bytes
    out = pb(pb.pair.idle(50.5))
    assert out == [Log(Timeout(conn=7, peer="peer:8333", after=30.0)), Finish("idle timeout")]
    assert pb.pair.close_reason == "idle timeout" and pb.pair.idle(100.0) == []


def test_no_idle_timeout() -> None:
    pb = Playbook(idle_timeout=0.0)
    assert pb.pair.idle(1e9) == []


# --- the memory budget ----------------------------------------------------------------


def block_header(length: int) -> bytes:
    return MAGIC + b"block".ljust(12, b"\0") + length.to_bytes(4, "little") + bytes(4)


def test_memory_budget_holds_a_direction_until_another_message_completes() -> None:
    """Two connections under one budget that covers one large message: the second waits
    (its reading paused) until the first completes, then gets its reservation."""
    budget = FrameBudget(limit=5_000_000)
    one, two = Playbook(budget=budget), Playbook(budget=budget)
    payload = bytes(4_000_000)
    one(one.node.data(block_header(len(payload)) + payload[:100], 0.0))
    assert one.node.waiter.reserved == len(payload) + 24 and one.held == []
    two(two.node.data(block_header(len(payload)), 0.0))
    assert two.held == ["pause node"] and two.node.waiter.reserved == 0
    out = one(one.node.data(payload[100:], 0.0))  # the first message completes
    assert kinds(out) == ["CaptureFrames", "Forward"]
    assert one.node.waiter.reserved == 0 and budget.used == two.node.waiter.reserved
    assert two.held == ["pause node", "resume node"]


def test_memory_budget_is_returned_when_the_relay_ends() -> None:
    budget = FrameBudget(limit=5_000_000)
    one, two = Playbook(budget=budget), Playbook(budget=budget)
    one(one.node.data(block_header(4_000_000), 0.0))
    two(two.peer.data(block_header(4_000_000), 0.0))
    assert two.held == ["pause peer"]
    one.pair.finish("closed")
    assert two.held == ["pause peer", "resume peer"] and one.node.waiter.reserved == 0


def test_small_messages_need_no_reservation() -> None:
    budget = FrameBudget(limit=1)
    pb = Playbook(budget=budget)
    pb(pb.node.data(block_header(FREE - 24), 0.0))
    assert budget.used == 0 and pb.held == []


# --- messages between two legs (BIP324 under decrypt) -----------------------------------


def handshake(a: V2Session, b: V2Session) -> None:
    """Run the BIP324 handshake between two sessions in memory."""
    for _ in range(10):
        for x, y in ((a, b), (b, a)):
            if out := x.data_to_send():
                y.receive_data(out)
            x.next_events()
        if all(s.established and s.peer_version_received for s in (a, b)):
            return
    raise AssertionError("no handshake")


class V2Line:
    """A node (initiator) talking v2 to the proxy's responder leg, and the proxy's
    initiator leg talking v2 to the peer; the flow from node to peer."""

    def __init__(self, strict: bool, native: bool) -> None:
        self.node, proxy_a = V2Session(True, MAGIC), V2Session(False, MAGIC)
        proxy_b, self.peer = V2Session(True, MAGIC), V2Session(False, MAGIC)
        handshake(self.node, proxy_a)
        handshake(proxy_b, self.peer)
        shared = Shared(strict=strict)
        origin = Origin(1, "peer:8333", Direction.SENT)
        self.flow = MessageFlow(origin, shared, V2Leg(proxy_a), V2Leg(proxy_b))
        back = MessageFlow(Origin(1, "peer:8333", Direction.RECV), shared,
                           V2Leg(proxy_b), V2Leg(proxy_a))  # fmt: skip
        self.pb = Playbook(flows=(self.flow, back))
        if native:
            self.flow.go_native()
            if self.flow.pipe is None:
                pytest.skip("capture/_v2.c not compiled")

    def received(self, commands: Sequence[Command]) -> list[tuple[str, bytes]]:
        """What the peer decrypts of the forwarded bytes."""
        self.peer.receive_data(forwarded(commands))
        return [(e.msgtype, bytes(e.payload)) for e in self.peer.next_events()
                if isinstance(e, V2Message)]  # fmt: skip


def captured_messages(commands: Sequence[Command]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for c in commands:
        if isinstance(c, CaptureMessages):
            out += [(t, bytes(p)) for t, p in c.messages]
        elif isinstance(c, CaptureRecords):
            out += [(t, bytes(p)) for t, p in record_messages(c.records)]
    return out


NATIVE = [pytest.param(False, id="python"), pytest.param(True, id="native")]


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_v2_strict_forwards_only_after_capture(native: bool, how: str) -> None:
    line = V2Line(strict=True, native=native)
    msgs = [("ping", b"12345678"), ("tx", bytes(range(200)))]
    wire = b"".join(line.node.encrypt_message(t, p) for t, p in msgs)
    out = feed(line.pb, line.flow, wire, how)
    assert forwarded(out) == b"" and captured_messages(out) == msgs
    assert line.received(capture_all(line.pb, line.flow)) == msgs


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("fail_at", [0, 1, 10])
def test_v2_strict_forwards_nothing_uncaptured(native: bool, fail_at: int) -> None:
    """The capture fails after ``fail_at`` captures: the peer got exactly the messages
    captured before, in order."""
    line = V2Line(strict=True, native=native)
    rng = random.Random(9)
    msgs = [("tx", rng.randbytes(rng.choice([50, 1000, 70_000]))) for _ in range(40)]
    got: list[tuple[str, bytes]] = []
    captured: list[tuple[str, bytes]] = []
    pending: deque[Command] = deque()
    for t, p in msgs:
        out = line.pb(line.flow.data(line.node.encrypt_message(t, p), 0.0))
        pending.extend(c for c in out if isinstance(c, CaptureMessages | CaptureRecords))
        while len(pending) > rng.randint(0, 2) and not line.pb.pair.finished:
            if len(captured) >= fail_at:
                line.pb.pair.finish("capture error")
                break
            captured += captured_messages([pending.popleft()])
            got += line.received(line.pb(line.flow.captured()))
        if line.pb.pair.finished:
            break
    assert got == captured == msgs[: len(captured)] and len(got) == fail_at


@pytest.mark.parametrize("native", NATIVE)
def test_v2_not_strict_forwards_and_captures(native: bool) -> None:
    line = V2Line(strict=False, native=native)
    out = line.pb(line.flow.data(line.node.encrypt_message("ping", b"abcdefgh"), 0.0))
    assert line.received(out) == [("ping", b"abcdefgh")]
    assert captured_messages(out) == [("ping", b"abcdefgh")]


@pytest.mark.parametrize("native", NATIVE)
def test_v2_bad_tag_closes_after_the_capture_of_what_precedes(native: bool) -> None:
    line = V2Line(strict=True, native=native)
    good = line.node.encrypt_message("ping", b"12345678")
    bad = bytearray(line.node.encrypt_message("ping", b"87654321"))
    bad[-1] ^= 1
    out = line.pb(line.flow.data(good + bytes(bad), 0.0))
    logs = [c.event for c in out if isinstance(c, Log)]
    assert len(logs) == 1 and isinstance(logs[0], V2StreamError)
    assert logs[0].reason == "bad tag" and Hold("framing error") in out
    assert forwarded(out) == b"" and not line.pb.pair.finished
    after = capture_all(line.pb, line.flow)
    assert line.received(after) == [("ping", b"12345678")]
    assert after[-1] == Close("framing error")
    assert line.flow.data(good, 1.0) == []


@pytest.mark.parametrize("native", NATIVE)
def test_v2_flood_of_decoys_is_reported_once(native: bool) -> None:
    line = V2Line(strict=False, native=native)
    decoys = b"".join(line.node.encrypt_decoy(10) for _ in range(DECOY_WARNING + 5))
    out = line.pb(line.flow.data(decoys, 0.0))
    (log,) = [c.event for c in out if isinstance(c, Log)]
    assert isinstance(log, V2Decoys) and log.count >= DECOY_WARNING
    more = line.pb(line.flow.data(line.node.encrypt_decoy(10), 0.0))
    assert [c for c in more if isinstance(c, Log)] == []


def test_v1_leg_frames_messages_and_drops_what_core_drops() -> None:
    """From a v1 leg to a v2 leg: a frame with a bad checksum is dropped (counted and
    logged, as Core drops it), the others are captured and encrypted for the v2 leg."""
    node, proxy = V2Session(True, MAGIC), V2Session(False, MAGIC)
    handshake(node, proxy)
    flow = MessageFlow(Origin(1, "p", Direction.RECV), Shared(), V1Leg(MAGIC), V2Leg(proxy))
    pb = Playbook(flows=(flow, MessageFlow(Origin(1, "p", Direction.SENT), Shared(),
                                           V2Leg(proxy), V1Leg(MAGIC))))  # fmt: skip
    bad_sum = PING[:20] + bytes(4) + PING[24:]
    out = pb(flow.data(VERSION + bad_sum + PING, 0.0))
    (log,) = [c.event for c in out if isinstance(c, Log)]
    assert isinstance(log, FrameError) and log.reason is FrameProblem.BAD_CHECKSUM
    assert flow.stats.invalid == 1 and flow.stats.bytes == len(VERSION + bad_sum + PING)
    assert [t for t, _ in captured_messages(out)] == ["version", "ping"]
    node.receive_data(forwarded(out))
    got = [e.msgtype for e in node.next_events() if isinstance(e, V2Message)]
    assert got == ["version", "ping"]


def test_native_pipe_comes_from_the_capture_layers_loader() -> None:
    """proxy/v2.py takes the native step from capture/bip324_pipe.py, not by module name."""
    import inspect

    import msgcap.proxy.v2 as v2

    assert v2.native_pipe is bip324_pipe.native_pipe
    assert "capture._v2" not in inspect.getsource(v2)
