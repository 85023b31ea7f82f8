"""Listening sockets that outlive running out of file descriptors.

asyncio's own servers handle a failed ``accept()`` differently per event loop: the
default loop logs through the loop's exception handler and retries a second later;
uvloop (libuv) accepts and drops the waiting connections, and may close the listener
for good, saying nothing. Here every listener (the routes', SOCKS5's and the metrics
endpoint's) runs its own accept loop on :meth:`asyncio.AbstractEventLoop.sock_accept`,
the same on both loops: when ``accept()`` fails for want of descriptors (EMFILE,
ENFILE) or kernel memory (ENOBUFS, ENOMEM), the failure is reported to the owner, the
listener waits (50 ms, doubling to 1 s) and accepts again; the connections waiting
in the backlog are accepted once descriptors free up. Connections already open are
not touched.

:class:`RateLimit` is the plain object that keeps such reports to one every few
seconds per place.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""``accept()``/``socket()`` failures that mean the process or the system is out of
descriptors or socket memory: transient, reported, retried."""

_BENIGN: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})
"""``accept()`` failures about one connection (it was reset before being accepted)."""

RETRY_FIRST: Final = 0.05
RETRY_MAX: Final = 1.0
BACKLOG: Final = 100


def is_exhaustion(error: BaseException) -> bool:
    """Whether ``error`` is running out of descriptors or socket memory."""
    return isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS


def bind(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Non-blocking listening sockets on every address of ``host`` (as
    ``loop.create_server`` binds them: SO_REUSEADDR, IPv6 sockets IPv6-only)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    try:
        for family, kind, proto, _name, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                raise OSError(
                    e.errno, f"error while attempting to bind on address {addr!r}: {e.strerror}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


class Listener:
    """Accepts on ``sockets`` until closed; each accepted socket goes to ``on_accept``
    (which owns it from then on), each failed ``accept()`` other than a reset
    connection to ``on_error``, after which accepting pauses briefly."""

    def __init__(
        self,
        sockets: Sequence[socket.socket],
        on_accept: Callable[[socket.socket], Awaitable[None]],
        on_error: Callable[[OSError], None],
    ) -> None:
        self.sockets = list(sockets)
        self._on_accept = on_accept
        self._on_error = on_error
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._accept(sock)) for sock in self.sockets]

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_FIRST
        try:
            while True:
                try:
                    client, _address = await loop.sock_accept(sock)
                except OSError as e:
                    if e.errno in _BENIGN:
                        continue
                    self._on_error(e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_FIRST
                try:
                    await self._on_accept(client)
                except OSError as e:  # setting the connection up failed (no memory, ...)
                    client.close()
                    self._on_error(e)
        finally:
            sock.close()

    def close(self) -> None:
        """Stop accepting. The sockets are closed once the accept loops have let go of
        them (the next turn of the event loop), not under the loop's feet."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            self._tasks[0].get_loop().call_soon(self._close_sockets)
        else:
            self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_sockets()


class RateLimit:
    """One report per ``interval`` seconds for each place; the rest are counted."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None to hold this report back; otherwise the number of reports held back for
        ``key`` since the last one let through."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
