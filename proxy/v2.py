"""BIP324 under the ``decrypt`` policy: the proxy ends v2 separately on each leg.

The side that opened v2 is answered as a BIP324 responder; the proxy opens its own BIP324
session to the other side as initiator, and falls back to v1 on that leg if the other
side closes before the handshake completes (Core does the same). Each leg has its own
keys, garbage and session id. Once both legs are set up, each direction decrypts (or
de-frames, on a v1 leg) the messages of one leg, captures them exactly as Core captures
v2 messages, and encrypts (or frames) them for the other leg.

The cryptography and the state machine are :mod:`msgcap.capture.bip324` (sans-IO). Here
are the two kinds of leg (bytes in, messages out, and back), the handshake of one leg
(the only code here that awaits a connection), and :class:`MessageFlow`: the decisions
of one direction, a plain object like every flow of :mod:`msgcap.proxy.flow`, which
:class:`MessageRelay` runs on asyncio. Once both legs are v2 and their handshakes are
over, each direction's ciphers go to the native step
(:func:`~msgcap.capture.bip324_pipe.native_pipe`, ``capture/_v2.c`` where it was built): one
call per read decrypts its complete packets, makes their capture records and re-encrypts
them for the other leg; the capture thread writes the records as they come. A v1 leg, or
a build without the native step (``MSGCAP_PURE_PYTHON=1``), keeps the Python path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from msgcap.capture.bip324 import V2Session
from msgcap.capture.bip324_events import (
    HandshakeComplete,
    UnknownShortId,
    V2Error,
    V2Message,
    VersionPacket,
)
from msgcap.capture.bip324_pipe import native_pipe, pipe_dropped, pipe_error
from msgcap.capture.errors import MsgcapError
from msgcap.capture.framing import (
    Frame,
    FrameDecoder,
    FrameProblem,
    InvalidFrame,
    Message,
    StreamError,
    encode_frame,
)
from msgcap.proxy.budget import Waiter
from msgcap.proxy.events import V2Decoys, V2StreamError
from msgcap.proxy.flow import (
    Capture,
    CaptureMessages,
    CaptureRecords,
    Close,
    Command,
    Flow,
    Forward,
    Log,
    Origin,
    Shared,
)
from msgcap.proxy.relay import Pump, Relay, Side

Dropped = tuple[FrameProblem, str]
"""A packet or frame Core drops without disconnecting: why, described."""

DECOY_WARNING = 1000
"""Decoy packets on one leg after which the event log says so (Core ignores them)."""


class Leg(Protocol):
    """One side's transport once it is set up: bytes in, messages out, and back."""

    transport: str
    """``v1`` or ``v2``."""

    def receive(self, data: bytes) -> tuple[list[Message], list[Dropped], Exception | None]:
        """The messages ``data`` completes, the packets Core would drop, and
        the error that ends the stream (nothing after it can be read)."""
        ...

    def encode(self, messages: Sequence[Message]) -> bytes | bytearray:
        """The bytes that carry ``messages`` to this side."""
        ...

    @property
    def incomplete(self) -> int:
        """Bytes the message (v1) or packet (v2) being received will hold once complete."""
        ...

    def discard(self) -> None:
        """Drop what is buffered (the stream is over)."""
        ...


class V1Leg:
    transport = "v1"

    def __init__(self, magic: bytes) -> None:
        self.magic = magic
        self.decoder = FrameDecoder(magic)

    def receive(self, data: bytes) -> tuple[list[Message], list[Dropped], Exception | None]:
        self.decoder.receive_data(data)
        frames, fatal = self.decoder.take_unchecked()
        messages: list[Message] = []
        dropped: list[Dropped] = []
        for unchecked in frames:
            ev = unchecked.check()
            if isinstance(ev, Frame):
                messages.append((ev.msgtype, ev.payload))
            else:
                assert isinstance(ev, InvalidFrame)
                dropped.append((ev.reason, ev.describe()))
        return messages, dropped, fatal

    @property
    def incomplete(self) -> int:
        return self.decoder.incomplete

    def discard(self) -> None:
        self.decoder.discard()

    def encode(self, messages: Sequence[Message]) -> bytes:
        magic = self.magic
        return b"".join(encode_frame(magic, t, bytes(p)) for t, p in messages)


class V2Leg:
    transport = "v2"

    def __init__(self, session: V2Session) -> None:
        self.session = session

    def receive(self, data: bytes) -> tuple[list[Message], list[Dropped], Exception | None]:
        session = self.session
        session.receive_data(data)
        events, error = session.take_events()
        messages: list[Message] = []
        dropped: list[Dropped] = []
        for ev in events:
            if isinstance(ev, V2Message):
                messages.append((ev.msgtype, ev.payload))
            elif isinstance(ev, UnknownShortId):
                if ev.core_delivers:  # Core passes ids 29..32 on as type ""
                    messages.append(("", ev.payload))
                else:
                    dropped.append((FrameProblem.INVALID_TYPE, ev.describe()))
            elif not isinstance(ev, HandshakeComplete | VersionPacket):
                dropped.append((FrameProblem.INVALID_TYPE, ev.describe()))
        return messages, dropped, error

    @property
    def incomplete(self) -> int:
        return self.session.incomplete

    def discard(self) -> None:
        self.session.discard()

    def encode(self, messages: Sequence[Message]) -> bytes | bytearray:
        return self.session.encrypt_messages(messages)


class HandshakeClosed(MsgcapError, ConnectionError):
    """The other side closed before the BIP324 handshake completed."""


class Stream(Protocol):
    """What a handshake needs of a connection (a :class:`Conn`, or a wrapped stream)."""

    def write(self, data: bytes) -> None: ...

    async def read(self, n: int) -> bytes: ...


async def handshake(conn: Stream, session: V2Session, first: bytes = b"") -> list[Message]:
    """Run one leg's BIP324 handshake until both version packets have passed; returns the
    application messages that arrived with it. Raises :class:`V2Error`,
    :class:`HandshakeClosed` or a connection error."""
    if first:
        session.receive_data(first)
    messages: list[Message] = []
    while True:
        events, error = session.take_events()
        out = session.data_to_send()
        if out:
            conn.write(out)
        for ev in events:
            if isinstance(ev, V2Message):
                messages.append((ev.msgtype, ev.payload))
        if error is not None:
            raise error
        if session.established and session.peer_version_received:
            return messages
        data = await conn.read(1 << 16)
        if not data:
            raise HandshakeClosed("closed before the BIP324 handshake completed")
        session.receive_data(data)


class Pipe(Protocol):
    """What a flow uses of a native pipe (:func:`~msgcap.capture.bip324_pipe.native_pipe`'s)."""

    def feed(
        self, data: bytes, t0: int, /
    ) -> tuple[
        int, bytes, bytes, list[tuple[int, bytes]] | None, tuple[int, int, int, int] | None
    ]: ...

    def discard(self) -> None: ...

    @property
    def incomplete(self) -> int: ...

    @property
    def decoys(self) -> int: ...


class MessageFlow(Flow):
    """The messages from ``src`` to ``dst``, as decisions: read on one leg, captured,
    sent on the other (under ``stop``: once captured).

    With both legs on v2 and the native step built, a native :class:`Pipe` does a whole
    read at once (decrypt, capture records, re-encrypt: :meth:`_data_native`); otherwise
    the legs' Python objects do it message by message. A fatal stream error (a bad AEAD
    tag, an oversize packet, a v1 framing error) ends the relay once what came before it
    is captured."""

    __slots__ = ("decoys_before", "decoys_reported", "dst_leg", "pipe", "src_leg")

    def __init__(
        self,
        origin: Origin,
        shared: Shared,
        src_leg: Leg,
        dst_leg: Leg,
        waiter: Waiter | None = None,
        now: float = 0.0,
    ) -> None:
        super().__init__(origin, shared, waiter, now)
        self.src_leg = src_leg
        self.dst_leg = dst_leg
        self.decoys_reported = False
        self.pipe: Pipe | None = None
        self.decoys_before = 0
        """Decoys the Python session counted before the pipe took over."""

    def go_native(self) -> None:
        """Hand both ciphers of this direction to the native step, if it was built."""
        src, dst = self.src_leg, self.dst_leg
        if isinstance(src, V2Leg) and isinstance(dst, V2Leg):
            self.decoys_before = src.session.decoys_received
            self.pipe = native_pipe(src.session, dst.session)

    def early(self, messages: list[Message]) -> list[Command]:
        """The messages a handshake already read: relayed first."""
        out = self.messages(messages) if messages else []
        if isinstance(self.src_leg, V2Leg):
            out += self.check_decoys(self.src_leg.session.decoys_received)
        return out

    def data(self, data: bytes, now: float) -> list[Command]:
        if self.done or self.halted:
            return []
        self.last_activity = now
        self.stats.bytes += len(data)
        if self.pipe is not None:
            return self._data_native(self.pipe, data)
        src = self.src_leg
        messages, dropped, fatal = src.receive(data)
        self.need_memory()
        out = self.dropped(dropped) if dropped else []
        if messages:
            out += self.messages(messages)
        if not self.decoys_reported and isinstance(src, V2Leg):
            out += self.check_decoys(src.session.decoys_received)
        if fatal is not None:
            out += self.fail(fatal)
        return out

    def _data_native(self, pipe: Pipe, data: bytes) -> list[Command]:
        """One read in one native call: its capture, and its packets for the other leg
        (under ``stop``: held until that capture is written)."""
        clock = self.shared.clock
        t0 = clock.stamps(0)  # the next free stamp, max(now, last + 1); reserves none
        count, records, packets, dropped, error = pipe.feed(data, t0)
        clock.used(t0, count)
        self.need_memory()
        out: list[Command] = []
        if dropped:
            out += self.dropped([(FrameProblem.INVALID_TYPE, d) for _, d in pipe_dropped(dropped)])
        if count:
            out += self.send(CaptureRecords(records, count, t0), packets)
        if not self.decoys_reported:
            out += self.check_decoys(self.decoys_before + pipe.decoys)
        if error is not None:
            out += self.fail(pipe_error(error))
        return out

    def messages(self, messages: list[Message]) -> list[Command]:
        """Capture ``messages`` (from ``src``) and send them on to ``dst``."""
        t0 = self.shared.clock.stamps(len(messages))
        capture = CaptureMessages(messages, t0, sum(len(p) for _, p in messages))
        return self.send(capture, self.dst_leg.encode(messages))

    def send(self, capture: Capture, encoded: bytes | bytearray) -> list[Command]:
        """``capture`` and the bytes that carry its messages to ``dst`` (under ``stop``:
        held until that capture is written; otherwise forwarded first, then the capture
        thread is woken)."""
        if self.shared.strict:
            return [self.capture(capture, self.hold_back(encoded))]
        return [Forward(encoded), capture]

    def fail(self, error: Exception) -> list[Command]:
        """A fatal stream error: log it, read no more, and close once what came before
        it is captured."""
        if isinstance(error, StreamError):
            log = self.frame_error(error.problem, str(error))
        else:
            o = self.origin
            reason = error.reason.value if isinstance(error, V2Error) else type(error).__name__
            log = Log(V2StreamError(conn=o.conn, peer=o.peer, direction=o.direction,
                                    reason=reason, detail=str(error)))  # fmt: skip
        return [log, *self.halt(lambda: self.stop(Close("framing error")))]

    def dropped(self, dropped: list[Dropped]) -> list[Command]:
        """Packets or frames Core drops without disconnecting: counted and logged."""
        self.stats.invalid += len(dropped)
        return [self.frame_error(problem, detail) for problem, detail in dropped]

    def check_decoys(self, count: int) -> list[Command]:
        if self.decoys_reported or count < DECOY_WARNING:
            return []
        self.decoys_reported = True
        o = self.origin
        return [Log(V2Decoys(conn=o.conn, peer=o.peer, direction=o.direction, count=count))]

    @property
    def incomplete(self) -> int:
        return self.src_leg.incomplete if self.pipe is None else self.pipe.incomplete

    def discard(self) -> None:
        if self.pipe is not None:
            self.pipe.discard()
        else:
            self.src_leg.discard()


class MessageRelay(Relay):
    """A relay of messages between two legs set up by :func:`handshake` (or v1)."""

    def __init__(
        self,
        *args: object,
        legs: tuple[Leg, Leg],
        early: tuple[list[Message], list[Message]],
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.legs = legs
        self.early = early

    def flows(self, a: Side, b: Side, now: float) -> tuple[Flow, Flow]:
        la, lb = self.legs
        return (
            MessageFlow(self.origin(a), self.shared, la, lb, self.waiter(a), now),
            MessageFlow(self.origin(b), self.shared, lb, la, self.waiter(b), now),
        )

    def started(self, ab: Pump, ba: Pump) -> None:
        """Relay what the handshakes already read, then hand the ciphers to the native
        step (both directions' early messages are encrypted by then)."""
        for pump, early in zip((ab, ba), self.early, strict=True):
            assert isinstance(pump.flow, MessageFlow)
            pump.run(pump.flow.early(early))
        for pump in (ab, ba):
            assert isinstance(pump.flow, MessageFlow)
            pump.flow.go_native()
