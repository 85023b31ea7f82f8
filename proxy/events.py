"""The event log (JSON lines beside the captures) and the live view.

Every event is one line: ``{"ts": ISO time, "event": name, ...facts}``, also logged
through :mod:`logging` so anomalies show on stderr as they happen.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger("msgcap")

ANOMALIES = frozenset(
    {
        "bad_checksum",
        "invalid_type",
        "bad_magic",
        "oversize",
        "v2_downgrade",
        "v2_passthrough",
        "socks_error",
        "capture_limit",
        "capture_error",
        "connection_limit",
        "upstream_error",
        "timeout",
    }
)


class EventLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()  # the event loop and the capture thread both log
        self._f: IO[bytes] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "ab", buffering=0)

    def emit(self, event: str, **facts: Any) -> None:
        record = {"ts": dt.datetime.now(dt.UTC).isoformat(), "event": event, **facts}
        line = orjson.dumps(record, default=str) + b"\n"
        with self._lock:
            if self._f is not None:
                try:
                    self._f.write(line)
                except OSError as e:
                    log.error("cannot write event log %s: %s", self.path, e)
        level = logging.WARNING if event in ANOMALIES else logging.INFO
        log.log(level, "%s %s", event, orjson.dumps(facts, default=str).decode())

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


class LiveView:
    """One line per captured message on stdout: time, peer, direction, type, size."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def message(self, time_us: int, peer: str, recv: bool, msgtype: str, size: int) -> None:
        when = dt.datetime.fromtimestamp(time_us / 1e6, dt.UTC).strftime("%H:%M:%S.%f")
        self.stream.write(f"{when} {peer} {'recv' if recv else 'sent'} {msgtype} {size}\n")
        self.stream.flush()
