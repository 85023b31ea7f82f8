"""The capture thread: checks frames and appends them to capture files, in order.

The event loop only frames (headers, lengths) and forwards bytes; checksums (SHA-256 over
every payload) and capture writes run here, on another core, with the GIL released: for a
whole batch at once in the native helper (capture/_capture.c), or per call to ``hashlib``
and ``writev`` without it. One thread and one FIFO queue keep every file's records in the
order the frames were completed. Stopping drains the queue, so everything forwarded before a
shutdown is in the capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Final

log = logging.getLogger("msgcap")

Job = Callable[[], object]
"""Work for the capture thread (what it returns is ignored)."""

MAX_QUEUED: Final = 32 << 20
"""Frame bytes waiting for the capture thread, over all connections, before reading
pauses (a slow disk slows the relay instead of growing memory)."""


class CaptureWorker:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Job, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="msgcap-capture", daemon=True)
        self._thread.start()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Each counter has one writer, so neither needs a lock: bytes submitted (by the
        # event loop) and bytes done (by the capture thread).
        self._submitted = 0
        self._done = 0
        self._waiting: list[Callable[[], None]] = []
        """Callbacks waiting for room (changed on the event loop only). Only while there
        are some does the capture thread wake the loop, not once per job."""

    @property
    def queued(self) -> int:
        """Bytes submitted and not yet done."""
        return self._submitted - self._done

    def submit(self, job: Job, size: int = 0) -> None:
        """Queue a job from the event loop; ``size`` counts against :data:`MAX_QUEUED`."""
        if size and self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._submitted += size
        self._jobs.put((job, size))

    @property
    def full(self) -> bool:
        """More than :data:`MAX_QUEUED` bytes are waiting: submitters should pause."""
        return self.queued > MAX_QUEUED

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once the queue is below its bound."""
        self._waiting.append(callback)
        # The capture thread updates `_done` before it looks at `_waiting`, and this reads
        # `_done` after appending: one of the two sees the other, so no wake-up is lost.
        if not self.full:
            self._wake()

    def _wake(self) -> None:
        if self.full or not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        for callback in waiting:
            callback()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, size = item
            try:
                job()
            except Exception:  # a bug in a job must not stop every later capture
                log.exception("capture job failed")
            self._done += size
            if self._waiting and self._loop is not None and not self.full:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    self._loop.call_soon_threadsafe(self._wake)

    def close(self, timeout: float | None = None) -> None:
        """Run every queued job, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
