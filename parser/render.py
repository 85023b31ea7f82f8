"""Capture records to JSON, exactly as Core's message-capture-parser.py shapes them (see
the project's DESIGN.md §6 for where we deliberately differ): one record to a JSON-ready
dict (:func:`render`), or whole batches of records to JSON text (:class:`BatchRenderer`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Final

import orjson

from msgcap.capture.conversation import Batch, CaptureFile, Item
from msgcap.capture.records import (
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    Direction,
    Record,
    RecordFilter,
)
from msgcap.parser.fastjson import FAST_BODIES, fast_body, render_batch
from msgcap.parser.wire import DecodeError, Reader, display_hash, wire_hash

UNRECOGNIZED: Final = "Unrecognized message type."
UNDECODABLE: Final = "Unable to deserialize message."


@functools.cache
def _by_bytes() -> dict[bytes, tuple[str, type[Any]]]:
    # Imported on first use: the native renderer needs none of the typed classes, and
    # defining them is a good part of the command's start-up time.
    from msgcap.parser.messages import MESSAGES

    return {name.encode("ascii"): (name, cls) for name, cls in MESSAGES.items()}


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a record's body is printed as hex instead of decoded."""

    kind: str
    """``UNRECOGNIZED`` or ``UNDECODABLE``"""
    detail: str
    valid_input: bool
    """False when the input itself is invalid (bad payload, unreadable type)."""


def render(
    rec: Record, direction: Direction, display_hashes: bool = False
) -> tuple[dict[str, Any], Problem | None]:
    """One record as Core's parser renders it, and what went wrong with it, if anything.

    ``display_hashes`` renders hashes in RPC byte order instead of Core's wire order.
    """
    payload = rec.payload
    out: dict[str, Any] = {
        "direction": direction.value,
        "time": rec.time,
        "size": len(payload),
    }
    kind = rec.msgtype
    known = _by_bytes().get(kind.name)
    if known is None:
        text = kind.text
        out["msgtype"] = kind.label
        out["body"] = payload.hex()
        out["error"] = UNRECOGNIZED
        if text is None:
            return out, Problem(UNRECOGNIZED, f"unreadable message type {kind.name!r}", False)
        return out, Problem(UNRECOGNIZED, f"unrecognized message type {text!r}", True)
    msgtype, cls = known
    out["msgtype"] = msgtype
    try:
        if msgtype in FAST_BODIES:
            body = fast_body(msgtype, payload, display_hashes)
        else:
            r = Reader(payload, msgtype)
            msg = cls.read(r)
            r.finish()
            body = msg.json(display_hash if display_hashes else wire_hash)
    except DecodeError as e:
        out["body"] = payload.hex()
        out["error"] = UNDECODABLE
        return out, Problem(UNDECODABLE, str(e), False)
    if payload:
        out["body"] = body
    return out, None


ProblemReport = Callable[[Item, Problem], None]


class BatchRenderer:
    """Batches of records (:class:`~msgcap.capture.conversation.Batch`) to JSON text on ``out``:
    the elements of a JSON array, comma-separated, or JSON lines. Each record's text is
    byte for byte ``orjson.dumps`` of :func:`render`'s dict (plus ``node`` and ``peer`` of
    its file with ``with_peer``), and each problem goes to ``on_problem`` as
    :func:`render` finds it. The text is written a ``chunk_size`` at a time; call
    :meth:`flush` at the end.

    The native renderer takes whole batches. The records it leaves (unknown types,
    payloads it rejects or does not render) go through :func:`render`, which words the
    problem; without the native renderer every record does.
    """

    def __init__(
        self,
        out: IO[bytes],
        *,
        jsonl: bool,
        display_hashes: bool,
        with_peer: bool,
        selection: RecordFilter,
        on_problem: ProblemReport,
        chunk_size: int = 1 << 20,
    ) -> None:
        self.out = out
        self.display_hashes = display_hashes
        self.with_peer = with_peer
        self.selection = selection
        self.on_problem = on_problem
        self.chunk_size = chunk_size
        self.first = True
        """No record written yet (the next one has no separator before it)."""
        self._before = b"" if jsonl else b","
        self._after = b"\n" if jsonl else b""
        self._options = (self._before, self._after, display_hashes, *selection.bounds)
        # By id (a CaptureFile's own hash, of its path, is slow); the file is kept in the
        # value, so its id stays its own.
        self._looks: dict[int, tuple[CaptureFile, tuple[bytes, bytes]]] = {}
        # The text is _buffer[:_pending]. The buffer only grows: a bytearray that shrinks
        # gives its memory back, and the next megabyte would be allocated again.
        self._buffer = bytearray()
        self._pending = 0

    def render(self, batch: Batch) -> None:
        """Write the JSON of the batch's records that the selection takes."""
        if render_batch is None:
            for run in batch.runs():
                pos = self.selection.next_taken(run.data, run.start, run.end)
                while pos < run.end:
                    pos = self._render_one(run.source, run.data, run.base, pos)
                    pos = self.selection.next_taken(run.data, pos, run.end)
            return
        looks = [self._look(source) for source in batch.sources]
        plan = memoryview(batch.plan).cast("q")
        index = pos = 0  # the run, and the position in its chunk, to go on from
        while True:
            index, pos, self.first, self._pending = render_batch(
                self._buffer,
                self._pending,
                self.chunk_size,
                batch.chunks,
                batch.plan,
                index,
                pos,
                looks,
                self._options,
                self.first,
            )
            if self._pending >= self.chunk_size:
                self.flush()  # and go on where it stopped
            elif 3 * index == len(plan):
                return
            else:  # a record for render()
                k = plan[3 * index]
                pos = self._render_one(batch.sources[k], batch.chunks[k], batch.bases[k], pos)

    def flush(self) -> None:
        """Write the text rendered so far."""
        with memoryview(self._buffer) as view, view[: self._pending] as text:
            self.out.write(text)
        self._pending = 0

    def _render_one(self, source: CaptureFile, data: bytes, base: int, pos: int) -> int:
        """The record at ``pos`` of ``data`` through :func:`render`; where it ends."""
        time_us, raw_type, length = RECORD_HEADER.unpack_from(data, pos)
        end: int = pos + RECORD_HEADER_SIZE + length
        rec = Record(time_us, raw_type, data[pos + RECORD_HEADER_SIZE : end], base + pos)
        obj, problem = render(rec, source.direction, self.display_hashes)
        if problem is not None:
            self.on_problem(Item(rec, source), problem)
        if self.with_peer:
            if source.node is not None:
                obj["node"] = source.node
            obj["peer"] = source.peer
        text = (self._before if not self.first else b"") + orjson.dumps(obj) + self._after
        self._buffer[self._pending : self._pending + len(text)] = text
        self._pending += len(text)
        self.first = False
        if self._pending >= self.chunk_size:
            self.flush()
        return end

    def _look(self, source: CaptureFile) -> tuple[bytes, bytes]:
        """What the native renderer writes around the fields of this file's records."""
        known = self._looks.get(id(source))
        if known is not None:
            return known[1]
        head = b'{"direction":' + orjson.dumps(source.direction.value) + b',"time":'
        tail = b"}"
        if self.with_peer:
            peer = b',"peer":' + orjson.dumps(source.peer)
            node = b"" if source.node is None else b',"node":' + orjson.dumps(source.node)
            tail = node + peer + tail
        self._looks[id(source)] = (source, (head, tail))
        return head, tail
