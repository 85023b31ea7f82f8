"""A bound, over all connections, on the memory that incomplete messages hold.

Each direction of a connection buffers the message it is receiving until it is complete
(at most 4 MB of payload, the protocol's limit). Up to :data:`FREE` bytes per direction
are free; a larger message reserves its whole size from one shared budget as soon as its
length is known (the v1 header, or the decrypted BIP324 length), before its payload is
read. When the budget cannot cover it, that direction stops reading (the bytes wait in
the kernel, and the sender is slowed by TCP) until reservations are returned, first come
first served. Messages under way always have their reservation, so they complete, and
give it back; nothing waits on a connection that itself waits.

In the proxy's memory, incomplete messages thus hold at most the budget, plus per
direction :data:`FREE` and one read. Memory is given back to the system when large
reservations end (:func:`trim`, glibc's ``malloc_trim``), so the proxy's size after a
wave of large messages returns to what it was.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Callable
from typing import Final

from msgcap.capture import native

FREE: Final = 64 * 1024
"""Bytes of an incomplete message each direction may buffer without a reservation."""

TRIM_AFTER: Final = 16 << 20
"""Reservation bytes returned since the last trim that make the next one worthwhile."""


class Waiter:
    """One direction that buffers incomplete messages: how to pause and resume it."""

    __slots__ = ("pause", "reserved", "resume")

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.pause = pause
        self.resume = resume
        self.reserved = 0


def _malloc_trim() -> Callable[[], None] | None:
    fn = getattr(native.libc(), "malloc_trim", None)  # None: no libc, or not glibc
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    return lambda: fn(0)


trim = _malloc_trim()
"""Return free heap memory to the system (glibc), or None where there is no such call."""


class FrameBudget:
    """The shared budget (bytes) for incomplete messages above :data:`FREE`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: dict[Waiter, int] = {}  # insertion order: first come, first served
        self._returned = 0
        self._trim_pending = False

    def need(self, w: Waiter, size: int) -> None:
        """``w``'s incomplete message will hold ``size`` bytes (0: none buffered)."""
        if size <= FREE:
            size = 0
        if size <= w.reserved:
            self._give_back(w, w.reserved - size)
            return
        if w in self._waiting:
            self._waiting[w] = size
            return
        extra = size - w.reserved
        if not self._waiting and self._fits(w, extra):
            w.reserved = size
            self.used += extra
            return
        self._waiting[w] = size
        w.pause()

    def release(self, w: Waiter) -> None:
        """``w`` is closed: return its reservation."""
        self._waiting.pop(w, None)
        self._give_back(w, w.reserved)

    def _fits(self, w: Waiter, extra: int) -> bool:
        """Whether ``w`` may reserve ``extra`` more bytes (always, when nobody else holds
        any: a budget smaller than one message must not stop it for ever)."""
        return self.used + extra <= self.limit or self.used == w.reserved

    def _give_back(self, w: Waiter, n: int) -> None:
        if n <= 0:
            return
        w.reserved -= n
        self.used -= n
        self._returned += n
        self._grant()
        if self._returned >= TRIM_AFTER:
            self._schedule_trim()

    def _grant(self) -> None:
        for w, size in list(self._waiting.items()):
            extra = size - w.reserved
            if not self._fits(w, extra):
                return  # first come, first served: the head waits for room
            del self._waiting[w]
            w.reserved = size
            self.used += extra
            w.resume()

    def _schedule_trim(self) -> None:
        if trim is None or self._trim_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._trim_pending = True

        def run() -> None:
            self._trim_pending = False
            self._returned = 0
            if trim is not None:
                trim()

        loop.call_later(0.2, run)
