"""The relay's decisions, without sockets: what to forward, capture, hold and close.

One :class:`Flow` is one direction of a relayed connection (bytes from ``src`` to
``dst``). It owns no socket, no event loop and no thread: it is fed what happens,

* :meth:`Flow.data`: bytes received from ``src``;
* :meth:`Flow.eof`: ``src`` ended its stream (a half-close);
* :meth:`Flow.lost`: ``src``'s connection is gone (cleanly, or with a reset);
* :meth:`Flow.captured`: the capture thread has written the oldest capture that this
  direction asked for and that was not yet reported (strict relay only),

and answers each with a list of commands (:data:`Command`) for the asyncio layer
(:mod:`msgcap.proxy.relay`) to carry out in order: forward these bytes, capture these
frames, stop reading, pass the end of stream on, close, log an event. :class:`Pair` holds
the decisions that concern both directions: which reason ends the relay, and when it has
been idle for too long.

A strict relay (``on_capture_error = "stop"``) keeps what it would forward until the
capture thread reports the capture that covers it: the bytes of a frame still incomplete
wait for the rest of it, and the end of a direction, or a close, waits for every capture
asked for before it. Nothing crosses that was not captured first (or, for a frame Core
would drop, checked first).

:class:`ByteFlow` relays bytes, framed as v1 for capture and forwarded unchanged (or, for
BIP324 under ``passthrough``, not framed at all); :class:`msgcap.proxy.v2.MessageFlow`
relays messages between two BIP324 or v1 legs. The memory that an incomplete message
holds is bounded by the shared :class:`~msgcap.proxy.budget.FrameBudget`: a flow tells it
how much its message will need, and the budget pauses and resumes that direction through
its :class:`~msgcap.proxy.budget.Waiter` (whose callbacks the asyncio layer gives).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from msgcap.capture.framing import HEADER_SIZE, FrameDecoder, FrameProblem, Message, UncheckedFrame
from msgcap.capture.records import Direction
from msgcap.capture.writer import Clock
from msgcap.proxy.budget import FrameBudget, Waiter
from msgcap.proxy.events import Event, FrameError, Timeout

Data = bytes | bytearray | memoryview


@dataclass(slots=True)
class DirectionStats:
    bytes: int = 0
    """Forwarded (v1; received on a message relay), counted on the event loop."""
    messages: int = 0
    """Valid frames (this and the next two are written by the capture thread)."""
    captured: int = 0
    invalid: int = 0


# --- commands -------------------------------------------------------------------------
# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# and the relay makes a command or two per chunk read.


@dataclass(slots=True)
class Forward:
    """Write these bytes to ``dst``."""

    data: Data


@dataclass(slots=True)
class CaptureFrames:
    """In the capture thread: check v1 frames as Core would, capture the valid ones (the
    i-th stamped ``t0 + i``), count them and log the invalid ones."""

    frames: list[UncheckedFrame]
    t0: int
    size: int
    """Their frames' total size (what the capture thread's queue counts)."""


@dataclass(slots=True)
class CaptureMessages:
    """In the capture thread: capture messages that need no check (decrypted BIP324
    messages, or frames already checked), the i-th stamped ``t0 + i``."""

    messages: list[Message]
    t0: int
    size: int


@dataclass(slots=True)
class CaptureRecords:
    """In the capture thread: append ``count`` capture records a native BIP324 pipe
    made (the i-th stamped ``t0 + i``)."""

    records: bytes
    count: int
    t0: int


@dataclass(slots=True)
class Hold:
    """Read no more from ``src`` (a fatal stream error: nothing after it is relayed)."""

    reason: str


@dataclass(slots=True)
class PassEof:
    """Half-close: pass the end of ``src``'s stream on to ``dst``."""


@dataclass(slots=True)
class End:
    """A command that ends the relay, for ``reason`` (the ``close`` event's); a flow
    answers nothing after one."""

    reason: str


class Close(End):
    """End the relay: close ``dst`` once what was forwarded is sent, abort ``src``."""

    __slots__ = ()


class Reset(End):
    """End the relay: reset ``dst`` at once (a reset is passed on as a reset)."""

    __slots__ = ()


class Finish(End):
    """End the relay (the caller closes both sides)."""

    __slots__ = ()


@dataclass(slots=True)
class Log:
    """Write ``event`` to the event log."""

    event: Event


Capture = CaptureFrames | CaptureMessages | CaptureRecords
Command = Forward | Capture | Hold | PassEof | End | Log
"""Everything a flow may ask of the asyncio layer."""


# --- one direction ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a flow's bytes come from, for its events."""

    conn: int
    peer: str
    direction: Direction
    """Of the bytes ``src`` sends, from the node's point of view (RECV: ``src`` is the
    peer)."""


@dataclass(slots=True)
class Shared:
    """What is shared by both directions of a connection."""

    strict: bool = False
    """Forward nothing before its capture (``on_capture_error = "stop"``)."""
    clock: Clock = field(default_factory=Clock)
    """The capture stamps, strictly increasing over both directions."""
    budget: FrameBudget | None = None
    """The bound on incomplete messages over all connections (None: unbounded)."""


Deferred = Callable[[], list[Command]]


class Flow(ABC):
    """One direction's decisions; subclasses say what :meth:`data` does with the bytes
    and what they buffer (:attr:`incomplete`, :meth:`discard`)."""

    __slots__ = ("_deferred", "_end", "_marks", "completed", "done", "ended", "halted",
                 "held", "last_activity", "origin", "sent", "shared", "sibling", "stats",
                 "waiter")  # fmt: skip

    def __init__(
        self, origin: Origin, shared: Shared, waiter: Waiter | None = None, now: float = 0.0
    ) -> None:
        self.origin = origin
        self.shared = shared
        self.waiter = waiter or Waiter(_nothing, _nothing)
        """This direction's share of the budget for incomplete messages."""
        self.stats = DirectionStats()
        self.sibling: Flow | None = None
        """The other direction (set by :class:`Pair`)."""
        self.last_activity = now
        self.done = False
        """The relay is over for this direction: every event is answered with nothing."""
        self.ended = False
        """The end of the stream has been passed on."""
        self.halted = False
        """A fatal stream error was read: nothing after it is (see :meth:`halt`)."""
        # The strict relay's state: what waits for its capture.
        self.held: deque[Data] = deque()
        """Bytes not yet forwarded, from stream offset :attr:`sent` on."""
        self.sent = 0
        self._end = 0
        """Stream offset of the end of :attr:`held`."""
        self._marks: deque[int] = deque()
        """For each capture not yet reported, the offset up to which it lets bytes go."""
        self.completed = 0
        """Captures reported written (strict relay only)."""
        self._deferred: deque[tuple[int, Deferred]] = deque()
        """Actions waiting for every capture asked for before them."""

    # --- events -------------------------------------------------------------------------

    @abstractmethod
    def data(self, data: bytes, now: float) -> list[Command]:
        """``data`` was received from ``src`` (at monotonic time ``now``)."""

    def eof(self) -> list[Command]:
        """``src`` ended its stream: passed on once what came before is captured."""
        if self.done or self.halted:
            return []
        return self.after_captures(self._pass_eof)

    def lost(self, error: BaseException | None) -> list[Command]:
        """``src``'s connection is gone: a reset is passed on at once; a clean close ends
        the relay once what came before is captured."""
        if self.done:
            return []
        if error is not None:
            return self.stop(Reset(type(error).__name__))
        return self.after_captures(lambda: self.stop(Finish("closed")))

    def captured(self) -> list[Command]:
        """The oldest capture not yet reported has been written (strict relay): forward
        what it covers, then what waited for it."""
        if self.done:
            return []
        self.completed += 1
        out = self.forward_to(self._marks.popleft())
        deferred = self._deferred
        while deferred and deferred[0][0] <= self.completed and not self.done:
            out += deferred.popleft()[1]()
        return out

    def end(self) -> None:
        """The relay is over: drop what is buffered and held, return the budget."""
        self.done = True
        if self.shared.budget is not None:
            self.shared.budget.release(self.waiter)
        self.held.clear()
        self._deferred.clear()
        self.discard()

    @property
    def submitted(self) -> int:
        """Captures asked for that will be reported (strict relay only)."""
        return self.completed + len(self._marks)

    # --- for subclasses -----------------------------------------------------------------

    @property
    @abstractmethod
    def incomplete(self) -> int:
        """Bytes the message being received will hold once complete (see
        :class:`~msgcap.proxy.budget.FrameBudget`)."""

    @abstractmethod
    def discard(self) -> None:
        """Drop what is buffered (the stream is over)."""

    def need_memory(self) -> None:
        """Tell the budget how much the incomplete message will hold (it may pause this
        direction through the waiter)."""
        budget = self.shared.budget
        if budget is not None:
            budget.need(self.waiter, self.incomplete)

    def capture(self, command: Capture, mark: int) -> Capture:
        """``command``, which on a strict relay lets the bytes up to stream offset
        ``mark`` go once it is reported done."""
        if self.shared.strict:
            self._marks.append(mark)
        return command

    def hold_back(self, data: Data) -> int:
        """Strict relay: keep ``data`` until a capture lets it go; the stream offset of
        its end."""
        self.held.append(data)
        self._end += len(data)
        return self._end

    def forward_to(self, end: int) -> list[Command]:
        """Strict relay: forward the held bytes up to stream offset ``end``."""
        held = self.held
        n = end - self.sent
        if n <= 0:
            return []
        self.sent = end
        out: list[Command] = []
        while n > 0:
            chunk = held[0]
            if len(chunk) <= n:
                out.append(Forward(chunk))
                held.popleft()
                n -= len(chunk)
            else:
                out.append(Forward(chunk[:n]))
                held[0] = chunk[n:]
                n = 0
        return out

    def after_captures(self, action: Deferred) -> list[Command]:
        """``action``'s commands now, or, on a strict relay, once every capture asked for
        so far is written (not at all if the relay ends first)."""
        if not self._marks:
            return action()
        self._deferred.append((self.submitted, action))
        return []

    def halt(self, close: Deferred) -> list[Command]:
        """A fatal stream error: read no more from ``src``; ``close``'s commands once
        what came before the error is captured."""
        self.halted = True
        return [Hold("framing error"), *self.after_captures(close)]

    def frame_error(self, reason: FrameProblem, detail: str) -> Log:
        """Log a ``frame_error`` event (``reason``'s name) for a frame from ``src``."""
        o = self.origin
        return Log(FrameError(reason=reason, conn=o.conn, peer=o.peer,
                              direction=o.direction, detail=detail))  # fmt: skip

    def stop(self, command: End) -> list[Command]:
        """A command that ends the relay: nothing more is answered."""
        self.done = True
        return [command]

    def _pass_eof(self) -> list[Command]:
        self.ended = True
        if self.sibling is not None and self.sibling.ended:
            return [PassEof(), *self.stop(Finish("eof"))]
        return [PassEof()]


def _nothing() -> None:
    pass


class ByteFlow(Flow):
    """Bytes forwarded unchanged: framed as v1 and captured on the way, or (``raw``, BIP324
    under ``passthrough``) neither framed nor captured.

    A fatal framing error (a wrong magic, a length past the limit) ends the relay: the
    bytes before it are forwarded, nothing after it."""

    __slots__ = ("decoder", "raw")

    def __init__(
        self,
        origin: Origin,
        shared: Shared,
        magic: bytes,
        waiter: Waiter | None = None,
        now: float = 0.0,
        raw: bool = False,
    ) -> None:
        super().__init__(origin, shared, waiter, now)
        self.raw = raw
        self.decoder = FrameDecoder(magic)

    def data(self, data: bytes, now: float) -> list[Command]:
        if self.done or self.halted:
            return []
        self.last_activity = now
        if self.raw:
            self.stats.bytes += len(data)
            return [Forward(data)]
        decoder, shared = self.decoder, self.shared
        start = decoder.offset + decoder.buffered  # the stream offset of data[0]
        decoder.receive_data(data)
        frames, fatal = decoder.take_unchecked()
        out: list[Command] = []
        if frames:
            # The frames of one read completed together: consecutive microseconds.
            t0 = shared.clock.stamps(len(frames))
            size = sum(f.length for f in frames) + HEADER_SIZE * len(frames)
            out.append(self.capture(CaptureFrames(frames, t0, size), decoder.offset))
        if shared.budget is not None:
            shared.budget.need(self.waiter, decoder.incomplete)
        strict = shared.strict
        if fatal is None:
            if strict:
                self.hold_back(data)  # forwarded by the captures that cover it
            else:
                out.append(Forward(data))
                self.stats.bytes += len(data)
            return out
        out.append(self.frame_error(fatal.problem, str(fatal)))
        if not strict:  # what precedes the error in this chunk, then close
            before = max(0, min(len(data), fatal.offset - start))
            if before:
                out.append(Forward(data[:before]))
                self.stats.bytes += before
            return out + self.stop(Close("framing error"))
        self.hold_back(data)
        # Not a byte of the frame in error crosses, even one held from an earlier chunk.
        close_at = fatal.offset

        def close() -> list[Command]:
            return self.forward_to(close_at) + self.stop(Close("framing error"))

        return out + self.halt(close)

    def forward_to(self, end: int) -> list[Command]:
        sent = self.sent
        out = super().forward_to(end)
        self.stats.bytes += self.sent - sent
        return out

    @property
    def incomplete(self) -> int:
        return 0 if self.raw else self.decoder.incomplete

    def discard(self) -> None:
        self.decoder.discard()


# --- both directions ---------------------------------------------------------------------


class Pair:
    """The two directions of one connection: which reason ends the relay (the first),
    and when it has been idle too long."""

    __slots__ = ("close_reason", "finished", "flows", "idle_timeout", "started")

    def __init__(self, ab: Flow, ba: Flow, idle_timeout: float, now: float) -> None:
        ab.sibling, ba.sibling = ba, ab
        self.flows = (ab, ba)
        self.idle_timeout = idle_timeout
        self.started = now
        self.finished = False
        self.close_reason = "eof"

    def finish(self, reason: str) -> bool:
        """End the relay for ``reason``; False if it had ended already."""
        if self.finished:
            return False
        self.finished = True
        self.close_reason = reason
        for flow in self.flows:
            flow.end()
        return True

    def idle(self, now: float) -> list[Command]:
        """The commands that end an idle relay, if nothing was received for longer than
        ``idle_timeout`` seconds (0: never)."""
        if not self.idle_timeout or self.finished:
            return []
        ab, ba = self.flows
        last = max(self.started, ab.last_activity, ba.last_activity)
        if now - last <= self.idle_timeout:
            return []
        origin = ab.origin
        return [Log(Timeout(conn=origin.conn, peer=origin.peer, after=self.idle_timeout)),
                Finish("idle timeout")]  # fmt: skip
