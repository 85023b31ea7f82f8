"""Prometheus metrics of a running proxy (``--metrics HOST:PORT``; off by default).

Label sets stay bounded: ``msgtype`` is one of the types Core's test framework knows or
``other``; ``direction`` is ``recv``/``sent``; anomalies are labelled by event name; peers
are never labels (the event log and the captures name them).

Counting happens where the facts are already at hand, once per batch of messages (the
capture thread's batch of one read), so the relay pays one dictionary update per message
and one labelled increment per message type in the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client import Counter as PromCounter

from msgcap.capture.records import Direction
from msgcap.parser.messages import MESSAGES

KNOWN_TYPES: Final = frozenset(MESSAGES)


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
        self._server: WSGIServer | None = None

    # --- what the proxy reports --------------------------------------------------------

    def messages(self, direction: Direction, batch: Iterable[tuple[str, int]]) -> None:
        """A batch of ``(msgtype, payload size)`` in one direction."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for msgtype, size in batch:
            label = msgtype if msgtype in KNOWN_TYPES else "other"
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

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (port 0: any); the bound address."""
        server, _thread = start_http_server(port, host, registry=self.registry)
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
