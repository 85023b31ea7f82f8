"""The event log (JSON lines beside the captures) and the live view.

Events are a closed set of frozen dataclasses (:data:`EVENTS`), each with its log name and
whether it is an anomaly. Every event is one line, ``{"ts": ISO time, "event": name,
...fields}`` (fields that are None are left out), also logged through :mod:`logging`, so
anomalies show on stderr as they happen. The README documents the schema.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import orjson

from msgcap.capture.batch import write_all
from msgcap.capture.framing import FrameProblem
from msgcap.capture.records import Direction
from msgcap.capture.writer import open_log
from msgcap.proxy.metrics import Metrics

log = logging.getLogger("msgcap")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event: ``name`` is the log's ``event`` field."""

    name: ClassVar[str]
    anomaly: ClassVar[bool] = False

    @property
    def event_name(self) -> str:
        return self.name

    def fields(self) -> dict[str, Any]:
        """The event's facts, None ones left out, enums by value."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.value if isinstance(value, FrameProblem | Direction) else value
        return out


# --- the proxy's life ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen(Event):
    name = "listen"
    route: str
    listen: str
    upstream: str | None = None
    node_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop(Event):
    name = "stop"
    captured_bytes: int


# --- connections ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Open(Event):
    name = "open"
    conn: int
    route: str
    client: str
    peer: str
    node: str
    """``client`` or ``upstream``: which side is the node."""
    capture: str | None
    """The capture folder (None: nothing is captured)."""
    node_name: str | None = None
    """The named node whose listener took the connection."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Close(Event):
    name = "close"
    conn: int
    peer: str
    reason: str
    route: str | None = None
    recv: dict[str, int] | None = None
    """Bytes, messages, captured and invalid messages, in the node's recv direction."""
    sent: dict[str, int] | None = None
    captured_bytes: int | None = None
    node_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimit(Event):
    name = "connection_limit"
    anomaly = True
    conn: int
    route: str
    client: str
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamError(Event):
    name = "upstream_error"
    anomaly = True
    conn: int
    peer: str
    upstream: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SocksError(Event):
    name = "socks_error"
    anomaly = True
    conn: int
    client: str
    error: str
    peer: str | None = None
    destination: str | None = None
    reply: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeout(Event):
    name = "timeout"
    anomaly = True
    conn: int
    peer: str
    after: float | None = None
    """Seconds idle (idle timeout)."""
    during: str | None = None
    """What was awaited (handshake timeout)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceExhausted(Event):
    """The process ran out of file descriptors (EMFILE, ENFILE) or socket memory (ENOBUFS,
    ENOMEM) where it accepts or dials connections. Connections already relaying go on; a
    listener pauses and accepts again once descriptors free up. At most one event every
    few seconds per place: ``held_back`` counts the occurrences left out since the last."""

    name = "resource_exhausted"
    anomaly = True
    where: str
    """``accept on HOST:PORT`` (a route's or SOCKS5 listener), ``accept on metrics
    HOST:PORT``, ``upstream connect`` or ``name lookup`` (a SOCKS5 destination)."""
    error: str
    held_back: int
    open_connections: int
    conn: int | None = None
    peer: str | None = None


# --- frames ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameError(Event):
    """A frame that is not a message; the log name is the :class:`FrameProblem`'s."""

    anomaly = True
    reason: FrameProblem
    conn: int
    peer: str
    direction: Direction
    detail: str

    @property
    def event_name(self) -> str:
        return self.reason.value

    def fields(self) -> dict[str, Any]:
        out = Event.fields(self)
        del out["reason"]  # it is the event's name
        return out


# --- BIP324 ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class V2Downgrade(Event):
    name = "v2_downgrade"
    anomaly = True
    conn: int
    peer: str
    first_bytes: str
    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class V2Passthrough(Event):
    name = "v2_passthrough"
    anomaly = True
    conn: int
    peer: str
    first_bytes: str


@dataclass(frozen=True, slots=True, kw_only=True)
class V2SessionEvent(Event):
    """One leg's BIP324 session is up (``decrypt``): ``session_id`` is as the node at the
    other end of that leg prints it in ``getpeerinfo``."""

    name = "v2_session"
    conn: int
    peer: str
    leg: str
    """``client`` (the side that dialed the proxy) or ``upstream``."""
    node: bool
    """Whether the node (the capturing point of view) is at the other end of this leg."""
    role: str
    """The proxy's BIP324 role on this leg: ``responder`` or ``initiator``."""
    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class V2Fallback(Event):
    """The other side closed before the proxy's BIP324 handshake completed: that leg
    speaks v1, as Core falls back to it."""

    name = "v2_fallback"
    conn: int
    peer: str
    leg: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class V2StreamError(Event):
    """A BIP324 condition on which Core disconnects (no garbage terminator, bad tag,
    oversize packet, a stalled handshake): nothing more is forwarded."""

    name = "v2_error"
    anomaly = True
    conn: int
    peer: str
    direction: Direction
    reason: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class V2Decoys(Event):
    """Many decoy packets on one leg (not messages: Core ignores them, so do we)."""

    name = "v2_decoys"
    anomaly = True
    conn: int
    peer: str
    direction: Direction
    count: int


# --- capture --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureLimit(Event):
    name = "capture_limit"
    anomaly = True
    conn: int
    peer: str
    limit: str
    note: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureApart(Event):
    """A connection whose ``core`` folder another live connection is writing (two nodes
    reaching one peer, or a proxy shared by machines): it is captured apart, in a
    per-connection folder beside it, so that no file holds two conversations."""

    name = "capture_apart"
    anomaly = True
    conn: int
    peer: str
    capture: str
    """Where this connection is captured."""
    live_conn: int
    """The connection already writing the shared folder."""
    live_capture: str
    node_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureError(Event):
    name = "capture_error"
    anomaly = True
    error: str
    policy: str
    conn: int | None = None
    peer: str | None = None
    note: str | None = None


EVENTS: tuple[type[Event], ...] = (
    Listen,
    Stop,
    Open,
    Close,
    ConnectionLimit,
    UpstreamError,
    SocksError,
    Timeout,
    ResourceExhausted,
    FrameError,
    V2Downgrade,
    V2Passthrough,
    V2SessionEvent,
    V2Fallback,
    V2StreamError,
    V2Decoys,
    CaptureLimit,
    CaptureApart,
    CaptureError,
)
"""Every kind of event the proxy logs."""


class EventLog:
    """The JSON lines event log, appended to one whole line at a time.

    ``beneath`` is the capture directory: an event log inside it is opened without
    following links, as the captures are (a link there raises
    :class:`msgcap.capture.writer.LinkRefused`); one elsewhere is opened as given. A line
    that cannot be written whole (a full disk) is cut off again, so the log stays whole
    lines.
    """

    def __init__(
        self, path: Path | None, metrics: Metrics | None = None, *, beneath: Path | None = None
    ) -> None:
        self.path = path
        self.metrics = metrics
        self._lock = threading.Lock()  # the event loop and the capture thread both log
        self._fd: int | None = None
        if path is not None:
            self._fd = open_log(path, beneath=beneath)

    def emit(self, event: Event) -> None:
        name, facts = event.event_name, event.fields()
        record = {"ts": dt.datetime.now(dt.UTC).isoformat(), "event": name, **facts}
        line = orjson.dumps(record, default=str) + b"\n"
        with self._lock:
            if self._fd is not None:
                try:
                    write_all(self._fd, (line,))
                except OSError as e:
                    log.error("cannot write event log %s: %s", self.path, e)
        if self.metrics is not None:
            if event.anomaly:
                self.metrics.anomaly(name)
            elif isinstance(event, V2SessionEvent):
                self.metrics.v2_session()
        level = logging.WARNING if event.anomaly else logging.INFO
        log.log(level, "%s %s", name, orjson.dumps(facts, default=str).decode())

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class LiveView:
    """One line per captured message on stdout: time, peer, direction, type, size."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def message(
        self, time_us: int, peer: str, direction: Direction, msgtype: str, size: int
    ) -> None:
        when = dt.datetime.fromtimestamp(time_us / 1e6, dt.UTC).strftime("%H:%M:%S.%f")
        self.stream.write(f"{when} {peer} {direction.value} {msgtype} {size}\n")
        self.stream.flush()
