"""One proxied connection: two directions that frame, capture and forward the exact bytes.

Each received chunk (see :mod:`proxy.conn`) is fed to its direction's
:class:`~capture.framing.FrameDecoder`, its complete frames are handed to the capture
thread (:mod:`proxy.worker`, which checks them and writes them with one ``writev()``),
and the chunk itself is forwarded unchanged. A side whose send buffer is full holds
reading on the other side, and a capture thread that is behind holds reading on every
side that submits to it: per connection, memory is bounded by a chunk or two in flight,
one frame being reassembled (at most 4 MB), the send buffers and the frames queued for
the capture thread.

Under ``on_capture_error = "stop"`` the relay is *strict*: a chunk's bytes are forwarded
only once the capture thread has written the frames they complete (the bytes of a frame
still incomplete wait for the rest of it), and the end of a direction is passed on only
after its last capture. When a capture fails, nothing more crosses: no byte reaches the
other side that was not captured first (or, for a frame Core would drop, checked first).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from msgcap.capture.framing import HEADER_SIZE, Frame, FrameDecoder, MsgType, UncheckedFrame
from msgcap.capture.records import Direction
from msgcap.capture.writer import Clock
from msgcap.proxy.budget import FrameBudget, Waiter
from msgcap.proxy.config import CaptureErrorPolicy
from msgcap.proxy.conn import Conn
from msgcap.proxy.events import EventLog, FrameError, LiveView, Timeout
from msgcap.proxy.store import CaptureStopped, ConnectionCapture
from msgcap.proxy.worker import CaptureWorker

T = TypeVar("T")


@dataclass(slots=True)
class DirectionStats:
    bytes: int = 0
    """Forwarded (written by the event loop)."""
    messages: int = 0
    """Valid frames (this and the next two are written by the capture thread)."""
    captured: int = 0
    invalid: int = 0


@dataclass(slots=True)
class Side:
    """One end of a relayed connection."""

    conn: Conn
    direction: Direction
    """Of the bytes this side sends us, from the node's point of view (RECV: this side
    is the peer)."""
    stats: DirectionStats = field(default_factory=DirectionStats)


class Flow:
    """The bytes from ``src`` to ``dst``: a :class:`~msgcap.proxy.conn.Sink` of ``src``."""

    __slots__ = ("decoder", "dst", "ended", "held", "relay", "sent_offset", "src", "waiter")

    def __init__(self, relay: Relay, src: Side, dst: Side) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.decoder = FrameDecoder(relay.magic)
        self.ended = False
        conn = src.conn
        self.waiter = Waiter(lambda: conn.hold("memory"), lambda: conn.release("memory"))
        """This direction's share of the budget for incomplete messages."""
        self.held: deque[bytes] = deque()
        """Strict relay: received bytes not yet forwarded (waiting for their capture)."""
        self.sent_offset = 0
        """Strict relay: stream offset of ``held[0][0]`` (bytes forwarded so far)."""

    def data(self, data: bytes) -> None:
        relay = self.relay
        if relay.finished:
            return
        relay.last_activity = time.monotonic()
        if relay.strict:
            self._data_strict(data)
            return
        forward = relay.take(self, data)
        if relay.budget is not None and not relay.raw:
            relay.budget.need(self.waiter, self.incomplete)
        dst = self.dst.conn
        if forward is not None:  # a fatal framing error: what precedes it, then close
            dst.write(data[:forward])
            self.src.stats.bytes += forward
            dst.close()
            self.src.conn.abort()
            relay.finish("framing error")
            return
        dst.write(data)
        self.src.stats.bytes += len(data)
        self.pace_capture()

    def _data_strict(self, data: bytes) -> None:
        """Hold ``data`` until the frames it completes are captured, then forward them."""
        relay = self.relay
        self.held.append(data)
        start = self.decoder.offset + self.decoder.buffered  # stream offset of data[0]
        captured_before = relay.take(self, data)
        if relay.budget is not None:
            relay.budget.need(self.waiter, self.incomplete)
        if captured_before is None:
            end = self.decoder.offset  # the end of the last complete frame
            if end > self.sent_offset:
                relay.after_capture(lambda: self._forward_to(end))
            self.pace_capture()
            return
        # A fatal framing error: forward what precedes it once captured, then close.
        self.src.conn.hold("framing error")
        end = start + captured_before

        def close() -> None:
            self._forward_to(end)
            self.dst.conn.close()
            self.src.conn.abort()
            relay.finish("framing error")

        relay.after_capture(close)

    def _forward_to(self, end: int) -> None:
        """Strict relay: forward the held bytes up to stream offset ``end``."""
        held, write = self.held, self.dst.conn.write
        n = end - self.sent_offset
        self.sent_offset = end
        self.src.stats.bytes += n
        while n > 0:
            chunk = held[0]
            if len(chunk) <= n:
                write(chunk)
                held.popleft()
                n -= len(chunk)
            else:
                write(chunk[:n])
                held[0] = chunk[n:]
                n = 0

    @property
    def incomplete(self) -> int:
        """Bytes the message being received will hold once complete (see
        :class:`~msgcap.proxy.budget.FrameBudget`)."""
        return self.decoder.incomplete

    def discard(self) -> None:
        """The relay is over: drop what is buffered (and held)."""
        self.decoder.discard()
        self.held.clear()

    def pace_capture(self) -> None:
        """Read no further while the capture thread is behind (a slow disk)."""
        worker = self.relay.worker
        if worker.full:
            src = self.src.conn
            src.hold("capture")
            worker.when_room(lambda: src.release("capture"))

    def eof(self) -> None:
        """Half-close: pass the EOF on and keep the other direction going."""
        self.relay.after_capture(self._eof)

    def _eof(self) -> None:
        dst = self.dst.conn
        if dst.can_write_eof():
            dst.write_eof()
        self.ended = True
        self.relay.direction_ended()

    def lost(self, error: BaseException | None) -> None:
        # A reset on one side is passed on as a reset on the other, at once.
        if error is not None:
            self.dst.conn.reset()
            self.relay.finish(type(error).__name__)
            return
        self.relay.after_capture(lambda: self.relay.finish("closed"))


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
        self.budget = budget
        """The shared bound on incomplete messages (None: unbounded, tests only)."""
        self.conn_id = conn_id
        self.raw = raw
        """Relay without framing or capture (BIP324 under the passthrough policy)."""
        self.peer = peer
        self.magic = magic
        self.capture = capture
        self.events = events
        self.live = live
        self.idle_timeout = idle_timeout
        self.clock = Clock()
        self.last_activity = time.monotonic()
        self.close_reason = "eof"
        self.finished = False
        self.strict = (
            not raw and capture.active and capture.store.on_error is CaptureErrorPolicy.STOP
        )
        """Forward nothing before its capture (``on_capture_error = "stop"``)."""
        self._done: asyncio.Future[None] | None = None
        self._directions: tuple[Flow, Flow] | None = None

    async def run(self, a: Side, b: Side, first_bytes: bytes = b"") -> None:
        """Relay ``a -> b`` and ``b -> a`` until both directions end or one side is lost.

        ``first_bytes`` were already read from ``a`` (the v2 check) and go first.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        ab, ba = self.flows(a, b)
        self._directions = (ab, ba)
        a.conn.feeder, b.conn.feeder = b.conn, a.conn
        if first_bytes:
            ab.data(first_bytes)
        self.started(ab, ba)
        a.conn.relay(ab)
        b.conn.relay(ba)
        watchdog = asyncio.create_task(self._watch_idle())
        try:
            await self._done
        finally:
            self.finished = True
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    def flows(self, a: Side, b: Side) -> tuple[Flow, Flow]:
        """The two directions (a subclass relays messages instead of bytes)."""
        return Flow(self, a, b), Flow(self, b, a)

    def started(self, ab: Flow, ba: Flow) -> None:
        """Called once both directions exist, before either side is read."""

    def after_capture(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the event loop now, or, on a strict relay, once the capture
        thread has written everything submitted before it (and not at all if the relay
        has finished by then, e.g. because that capture failed)."""
        if not self.strict:
            action()
            return
        loop = self._loop

        def guarded() -> None:
            if not self.finished:
                action()

        def in_thread() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to do
                loop.call_soon_threadsafe(guarded)

        self.worker.submit(in_thread)

    def direction_ended(self) -> None:
        assert self._directions is not None
        if all(d.ended for d in self._directions):
            self.finish("eof")

    def finish(self, reason: str) -> None:
        """End the relay (the caller closes both sides)."""
        if self.finished:
            return
        self.finished = True
        self.close_reason = reason
        for flow in self._directions or ():
            if self.budget is not None:
                self.budget.release(flow.waiter)
            flow.discard()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _watch_idle(self) -> None:
        if not self.idle_timeout:
            return
        while True:
            await asyncio.sleep(min(self.idle_timeout / 4, 5.0))
            if time.monotonic() - self.last_activity > self.idle_timeout:
                self.events.emit(
                    Timeout(conn=self.conn_id, peer=self.peer, after=self.idle_timeout)
                )
                self.finish("idle timeout")
                return

    def take(self, flow: Flow, data: bytes) -> int | None:
        """Frame and capture a chunk. Returns None to forward it all, or how many of its
        bytes precede a fatal framing error (forward those, then close)."""
        if self.raw:
            return None
        src, decoder = flow.src, flow.decoder
        start = decoder.offset + decoder.buffered
        decoder.receive_data(data)
        frames, fatal = decoder.take_unchecked()
        if frames:
            # The frames of one read completed together: consecutive microseconds.
            t0 = self.clock.stamps(len(frames))
            size = sum(f.length for f in frames) + HEADER_SIZE * len(frames)
            self.worker.submit(lambda: self._check_and_capture(src, t0, frames, size), size)
        if fatal is None:
            return None
        self.events.emit(
            FrameError(reason=fatal.problem, conn=self.conn_id, peer=self.peer,
                       direction=src.direction, detail=str(fatal))
        )  # fmt: skip
        return max(0, min(len(data), fatal.offset - start))

    def guarded(self, capture: Callable[[], T]) -> T | None:
        """In the capture thread: run ``capture``. When it fails under the ``stop``
        policy (:class:`CaptureStopped`) the relay finishes and None is returned; any other
        error finishes a strict relay too (nothing uncaptured may cross) and is raised."""
        try:
            return capture()
        except CaptureStopped:
            self._loop.call_soon_threadsafe(self.finish, "capture error")
            return None
        except Exception:
            if self.strict:
                self._loop.call_soon_threadsafe(self.finish, "capture error")
            raise

    def _check_and_capture(
        self, src: Side, t0: int, frames: list[UncheckedFrame], size: int
    ) -> None:
        """In the capture thread: check frames as Core would, capture the valid ones
        (the i-th at time ``t0 + i``), count them and log the invalid ones."""
        result = self.guarded(lambda: self.capture.capture(src.direction, t0, frames, size))
        if result is None:
            return
        ok, captured = result
        stats = src.stats
        valid = ok.count(True)
        stats.captured += captured
        stats.messages += valid
        if valid == len(frames) and self.live is None:
            return
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
