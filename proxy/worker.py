"""The capture thread: checks frames and appends them to capture files, in order.

The event loop only frames (headers, lengths) and forwards bytes; checksums (SHA-256 over
every payload) and capture writes run here, on another core: ``hashlib`` and ``writev``
release the GIL. One thread and one FIFO queue keep every file's records in the order the
frames were completed. Stopping drains the queue, so everything forwarded before a
shutdown is in the capture.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("msgcap")

Job = Callable[[], None]


class CaptureWorker:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="msgcap-capture", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a bug in a job must not stop every later capture
                log.exception("capture job failed")

    def close(self, timeout: float | None = None) -> None:
        """Run every queued job, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
