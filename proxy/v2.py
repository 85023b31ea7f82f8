"""BIP324 under the ``decrypt`` policy: the proxy ends v2 separately on each leg.

The side that opened v2 is answered as a BIP324 responder; the proxy opens its own BIP324
session to the other side as initiator, and falls back to v1 on that leg if the other
side closes before the handshake completes (Core does the same). Each leg has its own
keys, garbage and session id. Once both legs are set up, each direction decrypts (or
de-frames, on a v1 leg) the messages of one leg, captures them exactly as Core captures
v2 messages, and encrypts (or frames) them for the other leg.

The cryptography and the state machine are :mod:`msgcap.capture.bip324` (sans-IO); this
module only moves bytes and messages. Once both legs are v2 and their handshakes are over,
each direction's ciphers go to the native step (``capture/_v2.c``, where it was built): one
call per read decrypts its complete packets, makes their capture records and re-encrypts
them for the other leg; the capture thread writes the records as they come. A v1 leg, or
a build without the native step (``MSGCAP_PURE_PYTHON=1``), keeps the Python path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from msgcap.capture.bip324 import (
    HandshakeComplete,
    UnknownShortId,
    V2Error,
    V2Message,
    V2Session,
    VersionPacket,
    native_pipe,
    pipe_dropped,
    pipe_error,
)
from msgcap.capture.errors import MsgcapError
from msgcap.capture.framing import (
    Frame,
    FrameDecoder,
    FrameProblem,
    InvalidFrame,
    StreamError,
    encode_frame,
)
from msgcap.capture.records import record_messages
from msgcap.proxy.events import FrameError, V2Decoys, V2StreamError
from msgcap.proxy.relay import Flow, Relay, Side

if TYPE_CHECKING:
    from msgcap.capture._v2 import Pipe

Message = tuple[str, bytes | memoryview]
"""A message type and its payload, whichever transport carried it."""

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


class MessageFlow(Flow):
    """The messages from ``src`` to ``dst``: read on one leg, captured, sent on the other.

    With both legs on v2 and the native step built, a :class:`~msgcap.capture._v2.Pipe`
    does a whole read at once (decrypt, capture records, re-encrypt: :meth:`_data_native`);
    otherwise the legs' Python objects do it message by message."""

    __slots__ = ("decoys_before", "decoys_reported", "dst_leg", "pipe", "src_leg")

    def __init__(self, relay: MessageRelay, src: Side, dst: Side, src_leg: Leg, dst_leg: Leg):
        super().__init__(relay, src, dst)
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

    def data(self, data: bytes) -> None:
        relay = self.relay
        if relay.finished:
            return
        if self.pipe is not None:
            self._data_native(self.pipe, data)
            return
        relay.last_activity = time.monotonic()
        self.src.stats.bytes += len(data)
        messages, dropped, fatal = self.src_leg.receive(data)
        if relay.budget is not None:
            relay.budget.need(self.waiter, self.src_leg.incomplete)
        assert isinstance(relay, MessageRelay)
        if dropped:
            relay.dropped(self.src, dropped)
        if messages:
            self.messages(messages)
        if isinstance(self.src_leg, V2Leg):
            self.check_decoys(self.src_leg.session)
        if fatal is not None:
            self.fail(fatal)
            return
        self.pace_capture()

    def _data_native(self, pipe: Pipe, data: bytes) -> None:
        """One read in one native call; then its capture is queued and its packets are
        sent on (under ``stop``: once that capture is written)."""
        relay = self.relay
        assert isinstance(relay, MessageRelay)
        relay.last_activity = time.monotonic()
        self.src.stats.bytes += len(data)
        clock = relay.clock
        t0 = clock.stamps(0)  # the next free stamp, max(now, last + 1); reserves none
        count, records, out, dropped, error = pipe.feed(data, t0)
        clock.used(t0, count)
        if relay.budget is not None:
            relay.budget.need(self.waiter, pipe.incomplete)
        if dropped:
            relay.dropped(
                self.src, [(FrameProblem.INVALID_TYPE, d) for _, d in pipe_dropped(dropped)]
            )
        if count:
            src, dst = self.src, self.dst.conn
            if not relay.strict:  # forwarded first: then the capture thread is woken
                dst.write(out)
            relay.worker.submit(
                lambda: relay.capture_records(src, t0, count, records), len(records)
            )
            if relay.strict:  # forwarded once captured
                relay.after_capture(lambda: dst.write(out))
        if not self.decoys_reported and self.decoys_before + pipe.decoys >= DECOY_WARNING:
            self.report_decoys(self.decoys_before + pipe.decoys)
        if error is not None:
            self.fail(pipe_error(error))
            return
        self.pace_capture()

    def fail(self, error: Exception) -> None:
        """A fatal stream error: log it, then close once what came before is captured."""
        relay = self.relay
        assert isinstance(relay, MessageRelay)
        relay.fatal(self.src, error)
        self.src.conn.hold("framing error")

        def close() -> None:  # after the capture of what came before, if strict
            self.dst.conn.close()
            self.src.conn.abort()
            relay.finish("framing error")

        relay.after_capture(close)

    def messages(self, messages: list[Message]) -> None:
        """Capture ``messages`` (from ``src``) and send them on to ``dst``."""
        relay = self.relay
        assert isinstance(relay, MessageRelay)
        t0 = relay.clock.stamps(len(messages))
        src = self.src
        size = sum(len(p) for _, p in messages)
        # Submitted first, the capture can start while large packets are encrypted (the
        # AEAD releases the GIL for them).
        relay.worker.submit(lambda: relay.capture_messages(src, t0, messages), size)
        encoded = self.dst_leg.encode(messages)
        relay.after_capture(lambda: self.dst.conn.write(encoded))

    @property
    def incomplete(self) -> int:
        return self.src_leg.incomplete if self.pipe is None else self.pipe.incomplete

    def discard(self) -> None:
        super().discard()
        if self.pipe is not None:
            self.pipe.discard()
        else:
            self.src_leg.discard()

    def check_decoys(self, session: V2Session) -> None:
        if not self.decoys_reported and session.decoys_received >= DECOY_WARNING:
            self.report_decoys(session.decoys_received)

    def report_decoys(self, count: int) -> None:
        self.decoys_reported = True
        relay = self.relay
        relay.events.emit(V2Decoys(conn=relay.conn_id, peer=relay.peer,
                                   direction=self.src.direction, count=count))  # fmt: skip


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

    def flows(self, a: Side, b: Side) -> tuple[Flow, Flow]:
        la, lb = self.legs
        return MessageFlow(self, a, b, la, lb), MessageFlow(self, b, a, lb, la)

    def started(self, ab: Flow, ba: Flow) -> None:
        """Relay what the handshakes already read."""
        for flow, early in zip((ab, ba), self.early, strict=True):
            assert isinstance(flow, MessageFlow)
            if early:
                flow.messages(early)
            if isinstance(flow.src_leg, V2Leg):
                flow.check_decoys(flow.src_leg.session)
        for flow in (ab, ba):
            assert isinstance(flow, MessageFlow)
            flow.go_native()

    def capture_records(self, src: Side, t0: int, count: int, records: bytes) -> None:
        """In the capture thread: capture the records a native pipe made (``count``
        messages, the i-th stamped ``t0 + i``)."""
        captured = self.guarded(
            lambda: self.capture.capture_records(src.direction, t0, count, records)
        )
        if captured is None:
            return
        src.stats.messages += count
        src.stats.captured += captured
        if self.live is not None:
            for i, (msgtype, payload) in enumerate(record_messages(records)):
                self.live.message(t0 + i, self.peer, src.direction, msgtype, len(payload))

    def capture_messages(self, src: Side, t0: int, messages: list[Message]) -> None:
        """In the capture thread: capture one direction's messages, the i-th at
        ``t0 + i``."""
        captured = self.guarded(lambda: self.capture.capture_messages(src.direction, t0, messages))
        if captured is None:
            return
        src.stats.messages += len(messages)
        src.stats.captured += captured
        if self.live is not None:
            for i, (msgtype, payload) in enumerate(messages):
                self.live.message(t0 + i, self.peer, src.direction, msgtype, len(payload))

    def dropped(self, src: Side, dropped: list[Dropped]) -> None:
        src.stats.invalid += len(dropped)
        for problem, detail in dropped:
            self.events.emit(FrameError(reason=problem, conn=self.conn_id, peer=self.peer,
                                        direction=src.direction, detail=detail))  # fmt: skip

    def fatal(self, src: Side, error: Exception) -> None:
        if isinstance(error, StreamError):
            self.events.emit(FrameError(reason=error.problem, conn=self.conn_id, peer=self.peer,
                                        direction=src.direction, detail=str(error)))  # fmt: skip
        else:
            reason = error.reason.value if isinstance(error, V2Error) else type(error).__name__
            self.events.emit(V2StreamError(conn=self.conn_id, peer=self.peer,
                                           direction=src.direction, reason=reason,
                                           detail=str(error)))  # fmt: skip
