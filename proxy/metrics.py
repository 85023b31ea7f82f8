"""Prometheus metrics of a running proxy (``--metrics HOST:PORT``; off by default).

Label sets stay bounded: ``msgtype`` is one of the types Core's test framework knows
(:data:`~msgcap.capture.framing.KNOWN_MSGTYPES`) or ``other``; ``direction`` is
``recv``/``sent``; anomalies are labelled by event name; peers are never labels (the event
log and the captures name them).

Counting happens where the facts are already at hand, once per batch of messages (the
capture thread's batch of one read), so the relay pays one dictionary update per message
and one labelled increment per message type in the batch.

The endpoint is served on the proxy's event loop, by a listener that survives running out
of descriptors (:mod:`msgcap.proxy.listener`), and it cannot take descriptors from the
relay: at most :data:`MAX_CONNECTIONS` connections at once (more are answered ``503`` and
closed at once), a request must arrive within :data:`READ_TIMEOUT` seconds and its answer
be taken within :data:`WRITE_TIMEOUT`, one request per connection. Idle connections are
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client import Counter as PromCounter

from msgcap.capture.framing import KNOWN_MSGTYPES
from msgcap.capture.records import Direction
from msgcap.proxy.listener import Listener, RateLimit, bind

log = logging.getLogger("msgcap")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

MAX_CONNECTIONS: Final = 8
"""Metrics connections served at once (a Prometheus server scrapes over one)."""
READ_TIMEOUT: Final = 5.0
"""Seconds from accepting a connection to having its whole request."""
WRITE_TIMEOUT: Final = 10.0
"""Seconds for the client to take the answer."""
MAX_REQUEST: Final = 8192
"""Bytes of request line and headers read at most."""


class Metrics:
    """The proxy's metrics in a registry of their own (several proxies per process, as in
    tests, do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ["direction", "msgtype"]
        self._messages = PromCounter("msgcap_messages", "Messages relayed (valid frames, "
                                     "v2 messages)", labels, registry=r)  # fmt: skip
        self._bytes = PromCounter("msgcap_message_bytes", "Payload bytes of those messages",
                                  labels, registry=r)  # fmt: skip
        self._anomalies = PromCounter("msgcap_anomalies", "Anomaly events, by event name",
                                      ["kind"], registry=r)  # fmt: skip
        self._v2 = PromCounter("msgcap_v2_sessions", "BIP324 sessions set up (one per leg)",
                               registry=r)  # fmt: skip
        self._open = Gauge("msgcap_open_connections", "Connections being relayed", registry=r)
        self._captured = Gauge("msgcap_capture_bytes", "Bytes in capture files (this run)",
                               registry=r)  # fmt: skip
        self._queued = Gauge("msgcap_capture_queue_bytes", "Frame bytes waiting for the "
                             "capture thread", registry=r)  # fmt: skip
        self.app: WSGIApp = make_wsgi_app(self.registry)
        """prometheus_client's WSGI app over the registry (what the endpoint answers)."""
        self._listener: Listener | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._max_connections = MAX_CONNECTIONS
        self._read_timeout = READ_TIMEOUT
        self._write_timeout = WRITE_TIMEOUT
        self.rejected = 0
        """Connections closed at once because :data:`MAX_CONNECTIONS` were being served."""

    # --- what the proxy reports --------------------------------------------------------

    def messages(self, direction: Direction, batch: Iterable[tuple[str, int]]) -> None:
        """A batch of ``(msgtype, payload size)`` in one direction."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for msgtype, size in batch:
            label = msgtype if msgtype in KNOWN_MSGTYPES else "other"
            counts[label] += 1
            sizes[label] += size
        d = direction.value
        for label, n in counts.items():
            self._messages.labels(d, label).inc(n)
            self._bytes.labels(d, label).inc(sizes[label])

    def anomaly(self, kind: str) -> None:
        self._anomalies.labels(kind).inc()

    def v2_session(self) -> None:
        self._v2.inc()

    def watch(
        self,
        open_connections: Callable[[], float],
        captured: Callable[[], float],
        queued: Callable[[], float],
    ) -> None:
        """Gauges read when scraped."""
        self._open.set_function(open_connections)
        self._captured.set_function(captured)
        self._queued.set_function(queued)

    # --- the HTTP endpoint -------------------------------------------------------------

    def serve(
        self,
        host: str,
        port: int,
        on_error: Callable[[OSError], None] | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (port 0: any) from the running event loop;
        the bound address. ``on_error`` hears of every failed ``accept()`` (running out of
        descriptors: see :mod:`msgcap.proxy.listener`); by default it is logged."""
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._write_timeout = write_timeout
        sockets = bind(host, port)
        self._listener = Listener(sockets, self._accepted, on_error or _log_accept_error())
        self._listener.start()
        bound = sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def _accepted(self, client: socket.socket) -> None:
        if len(self._handlers) >= self._max_connections:
            self.rejected += 1
            with contextlib.suppress(OSError):
                client.send(BUSY)
            client.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve_one(client))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve_one(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            client.setblocking(False)
            async with asyncio.timeout(self._read_timeout):
                head = await _read_head(loop, client)
            if head is None:
                return
            answer = respond(head, self.app)
            async with asyncio.timeout(self._write_timeout):
                await loop.sock_sendall(client, answer)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
        except (OSError, TimeoutError):
            pass
        finally:
            client.close()

    @property
    def serving(self) -> int:
        """Metrics connections being served now."""
        return len(self._handlers)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._handlers):
            task.cancel()


BUSY: Final = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


async def _read_head(loop: asyncio.AbstractEventLoop, client: socket.socket) -> bytes | None:
    """The request line and headers (None if the client closed first); a request whose
    head is longer than :data:`MAX_REQUEST` is cut there (and answered 400)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) < MAX_REQUEST:
        chunk = await loop.sock_recv(client, MAX_REQUEST - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def respond(head: bytes, app: WSGIApp) -> bytes:
    """The whole HTTP answer to a request ``head`` (request line and headers), from
    prometheus_client's WSGI app (content negotiation, gzip, ``name[]`` filters, as its
    own server); 400 for what is not an HTTP/1.x request. Always ``Connection: close``."""
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].split(b" ")
    complete = b"" in lines[1:]
    if not complete or len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _answer(b"400 Bad Request", [], b"bad request\n")
    method, target, version = (p.decode("latin-1") for p in parts)
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": version,
        "HTTP_ACCEPT": fields.get("accept", ""),
        "HTTP_ACCEPT_ENCODING": fields.get("accept-encoding", ""),
        "wsgi.input": io.BytesIO(),
    }
    answer: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], _exc: Any = None) -> Any:
        answer[:] = [status, headers]
        return lambda _data: None

    body = b"".join(app(environ, start_response))
    status, headers = answer
    return _answer(status.encode("latin-1"), headers, body)


def _answer(status: bytes, headers: list[tuple[str, str]], body: bytes) -> bytes:
    fields = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)
    return (
        b"HTTP/1.1 " + status + b"\r\n" + fields
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )  # fmt: skip


def _log_accept_error() -> Callable[[OSError], None]:
    """Log failed ``accept()`` calls on stderr, at most one every 5 seconds."""
    limit = RateLimit(5.0)

    def report(error: OSError) -> None:
        held = limit.allow("metrics", time.monotonic())
        if held is not None:
            log.warning("metrics endpoint: accept failed: %s (%d more not logged)", error, held)

    return report
