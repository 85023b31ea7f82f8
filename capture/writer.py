"""Writing one connection's capture: the per-connection clock and the two files.

Each record goes out in a single ``write()`` on a file opened with ``O_APPEND``, so a file
is valid up to its last complete record after a crash, and two connections to the same
peer can share files without tearing each other's records.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from msgcap.capture.batch import write_all
from msgcap.capture.layout import RECV_FILE, SENT_FILE
from msgcap.capture.records import Direction, encode_record

_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class Clock:
    """Microsecond timestamps, strictly increasing across both directions of a connection.

    ``t = max(now_us, last_t + 1)``: merging recv and sent by time gives the exact order
    in which the messages were completed.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0

    def stamps(self, n: int) -> int:
        """The first of ``n`` consecutive timestamps for messages completed together (by
        one read); the next call starts after the last of them."""
        t = time.time_ns() // 1000
        if t <= self._last:
            t = self._last + 1
        self._last = t + n - 1
        return t


class CaptureWriter:
    """The two capture files of one connection, open for its whole life."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._recv_fd = os.open(folder / RECV_FILE, _FLAGS, 0o644)
        try:
            self._sent_fd = os.open(folder / SENT_FILE, _FLAGS, 0o644)
        except OSError:
            os.close(self._recv_fd)
            raise
        self.closed = False

    def fd(self, direction: Direction) -> int:
        """The descriptor of one file (the direction is from the node's point of view)."""
        return self._recv_fd if direction is Direction.RECV else self._sent_fd

    def write(self, direction: Direction, time_us: int, msgtype: str, payload: bytes) -> int:
        """Append one record. Returns its size."""
        return self.write_parts(direction, [encode_record(time_us, msgtype, payload)])

    def write_parts(self, direction: Direction, parts: Sequence[bytes | memoryview]) -> int:
        """Append the concatenation of ``parts`` (whole records) with one ``writev()``."""
        return write_all(self.fd(direction), parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self._recv_fd, self._sent_fd):
            try:
                os.close(fd)
            except OSError:
                pass
