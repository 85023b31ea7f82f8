"""One proxied connection on asyncio: carries out what its two flows decide.

The decisions are :mod:`msgcap.proxy.flow`'s plain objects, one per direction: fed each
received chunk (see :mod:`msgcap.proxy.conn`), the end of a stream, a lost connection or
a finished capture, they answer with commands. A :class:`Pump` per direction carries them
out: bytes written to the other side, frames handed to the capture thread
(:mod:`msgcap.proxy.worker`, which checks them and writes them with one ``writev()``),
events logged, reading held, sides closed. Nothing here decides what crosses.

Backpressure: a side whose send buffer is full holds reading on the other side, and a
capture thread that is behind holds reading on every side that submits to it. Per
connection, memory is thus bounded by a chunk or two in flight, one frame being
reassembled (at most 4 MB, and all of them together by the shared budget), the send
buffers and the frames queued for the capture thread.

On a strict relay (``on_capture_error = "stop"``) each capture, once written, is
reported back to its flow on the event loop (:meth:`Pump.captured`), which then lets the
bytes it covers go; a capture that fails ends the relay instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from msgcap.capture.framing import Frame, Message, MsgType
from msgcap.capture.records import Direction, record_messages
from msgcap.proxy.budget import FrameBudget, Waiter
from msgcap.proxy.config import CaptureErrorPolicy
from msgcap.proxy.conn import Conn
from msgcap.proxy.events import EventLog, FrameError, LiveView
from msgcap.proxy.flow import (
    ByteFlow,
    Capture,
    CaptureFrames,
    CaptureMessages,
    CaptureRecords,
    Close,
    Command,
    DirectionStats,
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
from msgcap.proxy.store import CaptureStopped, ConnectionCapture
from msgcap.proxy.worker import CaptureWorker

T = TypeVar("T")


@dataclass(slots=True)
class Side:
    """One end of a relayed connection."""

    conn: Conn
    direction: Direction
    """Of the bytes this side sends us, from the node's point of view (RECV: this side
    is the peer)."""
    stats: DirectionStats = field(default_factory=DirectionStats)


class Pump:
    """Feeds one flow what happens to ``src`` and carries out its commands: the
    :class:`~msgcap.proxy.conn.Sink` of ``src``."""

    __slots__ = ("dst", "flow", "relay", "src")

    def __init__(self, relay: Relay, flow: Flow, src: Side, dst: Side) -> None:
        self.relay = relay
        self.flow = flow
        self.src = src
        self.dst = dst

    def data(self, data: bytes) -> None:
        flow = self.flow
        self.run(flow.data(data, time.monotonic()))
        worker = self.relay.worker
        if worker.full and not flow.done:  # the capture thread is behind (a slow disk)
            src = self.src.conn
            src.hold("capture")
            worker.when_room(lambda: src.release("capture"))

    def eof(self) -> None:
        self.run(self.flow.eof())

    def lost(self, error: BaseException | None) -> None:
        self.run(self.flow.lost(error))

    def captured(self) -> None:
        """On the event loop: the capture thread has written this flow's oldest capture
        not yet reported (strict relay)."""
        self.run(self.flow.captured())

    def run(self, commands: list[Command]) -> None:
        """Carry out ``commands`` in order."""
        relay = self.relay
        for command in commands:
            match command:
                case Forward(data):
                    self.dst.conn.write(data)
                case CaptureFrames() | CaptureRecords() | CaptureMessages():
                    relay.submit(self, command)
                case Log(event):
                    relay.events.emit(event)
                case Hold(reason):
                    self.src.conn.hold(reason)
                case PassEof():
                    dst = self.dst.conn
                    if dst.can_write_eof():
                        dst.write_eof()
                case Close(reason):
                    self.dst.conn.close()
                    self.src.conn.abort()
                    relay.finish(reason)
                case Reset(reason):
                    self.dst.conn.reset()
                    relay.finish(reason)
                case Finish(reason):
                    relay.finish(reason)


class Relay:
    """Relays and captures one connection once both sockets are open."""

    def __init__(
        self,
        conn_id: int,
        peer: str,
        magic: bytes,
        capture: ConnectionCapture,
        events: EventLog,
        live: LiveView | None,
        idle_timeout: float,
        worker: CaptureWorker,
        raw: bool = False,
        budget: FrameBudget | None = None,
    ) -> None:
        self.worker = worker
        self.conn_id = conn_id
        self.raw = raw
        """Relay without framing or capture (BIP324 under the passthrough policy)."""
        self.peer = peer
        self.magic = magic
        self.capture = capture
        self.events = events
        self.live = live
        self.idle_timeout = idle_timeout
        self.strict = (
            not raw and capture.active and capture.store.on_error is CaptureErrorPolicy.STOP
        )
        """Forward nothing before its capture (``on_capture_error = "stop"``)."""
        self.shared = Shared(strict=self.strict, budget=budget)
        self.pair: Pair | None = None
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def close_reason(self) -> str:
        return "eof" if self.pair is None else self.pair.close_reason

    async def run(self, a: Side, b: Side, first_bytes: bytes = b"") -> None:
        """Relay ``a -> b`` and ``b -> a`` until both directions end or one side is lost.

        ``first_bytes`` were already read from ``a`` (the v2 check) and go first.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        now = time.monotonic()
        ab, ba = self.flows(a, b, now)
        ab.stats, ba.stats = a.stats, b.stats
        pair = self.pair = Pair(ab, ba, self.idle_timeout, now)
        pab, pba = Pump(self, ab, a, b), Pump(self, ba, b, a)
        a.conn.feeder, b.conn.feeder = b.conn, a.conn
        if first_bytes:
            pab.data(first_bytes)
        self.started(pab, pba)
        a.conn.relay(pab)
        b.conn.relay(pba)
        watchdog = asyncio.create_task(self._watch_idle(pab))
        try:
            await self._done
        finally:
            pair.finish(pair.close_reason)  # if cancelled: what is held is dropped
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    def origin(self, side: Side) -> Origin:
        return Origin(self.conn_id, self.peer, side.direction)

    def waiter(self, side: Side) -> Waiter:
        """How the budget pauses and resumes reading ``side``."""
        conn = side.conn
        return Waiter(lambda: conn.hold("memory"), lambda: conn.release("memory"))

    def flows(self, a: Side, b: Side, now: float) -> tuple[Flow, Flow]:
        """The two directions (a subclass relays messages instead of bytes)."""
        return (
            ByteFlow(self.origin(a), self.shared, self.magic, self.waiter(a), now, self.raw),
            ByteFlow(self.origin(b), self.shared, self.magic, self.waiter(b), now, self.raw),
        )

    def started(self, ab: Pump, ba: Pump) -> None:
        """Called once both directions exist, before either side is read."""

    def finish(self, reason: str) -> None:
        """End the relay (the caller closes both sides); the first reason is kept."""
        if self.pair is not None and self.pair.finish(reason):
            if self._done is not None and not self._done.done():
                self._done.set_result(None)

    async def _watch_idle(self, pump: Pump) -> None:
        if not self.idle_timeout:
            return
        assert self.pair is not None
        while True:
            await asyncio.sleep(min(self.idle_timeout / 4, 5.0))
            if commands := self.pair.idle(time.monotonic()):
                pump.run(commands)
                return

    # --- the capture thread ------------------------------------------------------------

    def submit(self, pump: Pump, command: Capture) -> None:
        """Queue ``command`` for the capture thread; on a strict relay, report it back
        to ``pump`` once it is written."""
        src = pump.src
        capture: Callable[[], bool]
        if type(command) is CaptureFrames:
            frames = command
            capture, size = (lambda: self.capture_frames(src, frames)), frames.size
        elif type(command) is CaptureRecords:
            records = command
            capture, size = (lambda: self.capture_records(src, records)), len(records.records)
        else:
            assert isinstance(command, CaptureMessages)
            messages = command
            capture, size = (lambda: self.capture_messages(src, messages)), messages.size
        if not self.strict:
            self.worker.submit(capture, size)
            return
        loop = self._loop
        assert loop is not None

        def job() -> None:
            if capture():
                with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to do
                    loop.call_soon_threadsafe(pump.captured)

        self.worker.submit(job, size)

    def guarded(self, capture: Callable[[], T]) -> T | None:
        """In the capture thread: run ``capture``. When it fails under the ``stop``
        policy (:class:`CaptureStopped`) the relay finishes and None is returned; any other
        error finishes a strict relay too (nothing uncaptured may cross) and is raised."""
        assert self._loop is not None
        try:
            return capture()
        except CaptureStopped:
            self._loop.call_soon_threadsafe(self.finish, "capture error")
            return None
        except Exception:
            if self.strict:
                self._loop.call_soon_threadsafe(self.finish, "capture error")
            raise

    def capture_frames(self, src: Side, command: CaptureFrames) -> bool:
        """In the capture thread: check frames as Core would, capture the valid ones
        (the i-th at time ``t0 + i``), count them and log the invalid ones. False if the
        capture failed (under ``stop``)."""
        frames, t0 = command.frames, command.t0
        result = self.guarded(lambda: self.capture.capture(src.direction, t0, frames, command.size))
        if result is None:
            return False
        ok, captured = result
        stats = src.stats
        valid = ok.count(True)
        stats.captured += captured
        stats.messages += valid
        if valid == len(frames) and self.live is None:
            return True
        for i, (good, unchecked) in enumerate(zip(ok, frames, strict=True)):
            if good:
                if self.live is not None:
                    kind = MsgType.of(unchecked.raw_msgtype)
                    self.live.message(t0 + i, self.peer, src.direction, kind.label,
                                      unchecked.length)  # fmt: skip
                continue
            ev = unchecked.check()
            assert not isinstance(ev, Frame)
            stats.invalid += 1
            self.events.emit(
                FrameError(reason=ev.reason, conn=self.conn_id, peer=self.peer,
                           direction=src.direction, detail=ev.describe())
            )  # fmt: skip
        return True

    def capture_records(self, src: Side, command: CaptureRecords) -> bool:
        """In the capture thread: capture the records a native pipe made."""
        t0, records = command.t0, command.records
        captured = self.guarded(
            lambda: self.capture.capture_records(src.direction, t0, command.count, records)
        )
        if captured is None:
            return False
        src.stats.messages += command.count
        src.stats.captured += captured
        if self.live is not None:
            self._show(src, t0, record_messages(records))
        return True

    def capture_messages(self, src: Side, command: CaptureMessages) -> bool:
        """In the capture thread: capture one direction's messages."""
        t0, messages = command.t0, command.messages
        captured = self.guarded(lambda: self.capture.capture_messages(src.direction, t0, messages))
        if captured is None:
            return False
        src.stats.messages += len(messages)
        src.stats.captured += captured
        if self.live is not None:
            self._show(src, t0, messages)
        return True

    def _show(self, src: Side, t0: int, messages: Sequence[Message]) -> None:
        assert self.live is not None
        for i, (msgtype, payload) in enumerate(messages):
            self.live.message(t0 + i, self.peer, src.direction, msgtype, len(payload))
