"""One proxied connection: two pumps that frame, capture and forward the exact bytes.

Each pump reads a chunk, feeds its direction's :class:`~capture.framing.FrameDecoder`,
hands the chunk's complete frames to the capture thread (:mod:`proxy.worker`, which
checks them and writes them with one ``writev()`` per chunk), then forwards the chunk
unchanged and waits for the other side to drain it. A slow reader on one side therefore
stops reading on the other: per connection, memory is bounded by one read chunk, one
frame being reassembled (at most 4 MB), the transport's write buffer and the frames
queued for the capture thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from capture.framing import (
    HEADER_SIZE,
    NEED_DATA,
    BadMagic,
    Frame,
    FrameDecoder,
    StreamError,
    UncheckedFrame,
    checksum,
    msgtype_is_valid,
)
from capture.writer import Clock
from proxy.events import EventLog, LiveView
from proxy.store import CaptureStopped, ConnectionCapture
from proxy.worker import CaptureWorker

READ_SIZE = 1 << 18


@dataclass(slots=True)
class DirectionStats:
    bytes: int = 0
    """Forwarded (written by the event loop)."""
    messages: int = 0
    """Valid frames (this and the next two are written by the capture thread)."""
    captured: int = 0
    invalid: int = 0


@dataclass(slots=True)
class Pipe:
    """What one pump needs to know about its direction."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    recv: bool
    """True when these bytes are received by the node."""
    stats: DirectionStats = field(default_factory=DirectionStats)


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
        self.clock = Clock()
        self.last_activity = time.monotonic()
        self.close_reason = "eof"

    async def run(self, a: Pipe, b: Pipe, first_bytes: bytes = b"") -> None:
        """Pump ``a.reader -> b.writer`` and ``b.reader -> a.writer`` until both end.

        ``first_bytes`` were already read from ``a`` (the v2 check) and go first.
        """
        pumps = [
            asyncio.create_task(self._pump(a, b.writer, first_bytes)),
            asyncio.create_task(self._pump(b, a.writer, b"")),
        ]
        self._pumps = pumps
        self._loop = asyncio.get_running_loop()
        watchdog = asyncio.create_task(self._watch_idle(pumps))
        try:
            # Pumps cancelled by the idle watchdog or a capture error end the relay too.
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            watchdog.cancel()
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, watchdog, return_exceptions=True)

    async def _watch_idle(self, pumps: list[asyncio.Task[None]]) -> None:
        if not self.idle_timeout:
            return
        while True:
            await asyncio.sleep(min(self.idle_timeout / 4, 5.0))
            if time.monotonic() - self.last_activity > self.idle_timeout:
                self.close_reason = "idle timeout"
                self.events.emit(
                    "timeout", conn=self.conn_id, peer=self.peer, after=self.idle_timeout
                )
                for t in pumps:
                    t.cancel()
                return

    async def _pump(self, src: Pipe, dst: asyncio.StreamWriter, first: bytes) -> None:
        decoder = FrameDecoder(self.magic)
        data = first
        try:
            while True:
                if not data:
                    data = await src.reader.read(READ_SIZE)
                    if not data:
                        # Half-close: pass the EOF on and keep the other direction going.
                        if dst.can_write_eof() and not dst.is_closing():
                            with contextlib.suppress(OSError):
                                dst.write_eof()
                        return
                self.last_activity = time.monotonic()
                forward = self._take(src, decoder, data)
                if forward is not None:
                    dst.write(data[:forward])
                    with contextlib.suppress(ConnectionError):
                        await dst.drain()
                    self.close_reason = "framing error"
                    self._abort(src.writer, dst)
                    return
                dst.write(data)
                src.stats.bytes += len(data)
                data = b""
                await dst.drain()
                await self.worker.room()  # the capture thread may be behind (slow disk)
        except (ConnectionError, OSError) as e:
            # A reset on one side is passed on as a reset on the other.
            self.close_reason = f"{type(e).__name__}"
            self._abort(src.writer, dst)

    def _take(self, src: Pipe, decoder: FrameDecoder, data: bytes) -> int | None:
        """Frame and capture a chunk. Returns None to forward it all, or how many of its
        bytes precede a fatal framing error (forward those, then close)."""
        if self.raw:
            return None
        start = decoder.offset + decoder.buffered
        decoder.receive_data(data)
        frames: list[tuple[int, UncheckedFrame]] = []
        fatal: StreamError | None = None
        try:
            while (ev := decoder.next_unchecked()) is not NEED_DATA:
                frames.append((self.clock.now(), ev))
        except StreamError as e:
            fatal = e
        if frames:
            size = sum(HEADER_SIZE + f.length for _, f in frames)
            self.worker.submit(lambda: self._check_and_capture(src, frames), size)
        if fatal is None:
            return None
        self.events.emit(
            "bad_magic" if isinstance(fatal, BadMagic) else "oversize",
            conn=self.conn_id,
            peer=self.peer,
            direction="recv" if src.recv else "sent",
            detail=str(fatal),
        )
        forward = max(0, min(len(data), fatal.offset - start))
        src.stats.bytes += forward
        return forward

    def _check_and_capture(self, src: Pipe, frames: list[tuple[int, UncheckedFrame]]) -> None:
        """In the capture thread: check frames as Core would, capture the valid ones."""
        stats = src.stats
        good: list[tuple[int, bytes, bytes]] = []
        for t, unchecked in frames:
            raw, payload = unchecked.raw_msgtype, unchecked.payload
            # One hashlib call per payload: it releases the GIL once, not once per piece.
            if checksum(payload) == unchecked.expected_checksum and msgtype_is_valid(raw):
                good.append((t, raw, payload))
                continue
            ev = unchecked.check()
            assert not isinstance(ev, Frame)
            stats.invalid += 1
            self.events.emit(
                "bad_checksum" if ev.reason == "bad checksum" else "invalid_type",
                conn=self.conn_id,
                peer=self.peer,
                direction="recv" if src.recv else "sent",
                detail=ev.describe(),
            )
        if not good:
            return
        stats.messages += len(good)
        try:
            stats.captured += self.capture.write(src.recv, good)
        except CaptureStopped:
            self._loop.call_soon_threadsafe(self._stop_for_capture_error)
            return
        if self.live is not None:
            for t, raw, payload in good:
                msgtype = raw.rstrip(b"\0").decode("ascii")
                self.live.message(t, self.peer, src.recv, msgtype, len(payload))

    def _stop_for_capture_error(self) -> None:
        self.close_reason = "capture error"
        for t in self._pumps:
            t.cancel()

    def _abort(self, *writers: asyncio.StreamWriter) -> None:
        for w in writers:
            if not w.is_closing():
                w.transport.abort()
