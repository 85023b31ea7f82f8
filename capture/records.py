"""Bitcoin Core's ``-capturemessages`` record format: encoding and a streaming reader.

A capture file is a plain concatenation of records, with no file header::

    time (uint64 LE, microseconds) | msgtype (12 bytes, NUL padded) | length (uint32 LE) | payload

The reader never raises on bad data: it yields :class:`Record` items and, where the
file stops making sense, a :class:`Damage` item that names the byte offset.

Bulk readers take whole records many at a time instead: :class:`RecordChunks` reads a
file a chunk at a time (with the same damage reports) and :data:`scan` walks the records
of a chunk, in the capture layer's native module (``capture/_capture.c``) when it was
built (and ``MSGCAP_PURE_PYTHON`` is not set), else in its Python twin.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from msgcap.capture import native
from msgcap.capture.framing import MAX_PROTOCOL_MESSAGE_LENGTH, MsgType, encode_msgtype
from msgcap.capture.layout import RECV_FILE, SENT_FILE

RECORD_HEADER: Final = struct.Struct("<Q12sI")
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size  # 24

MAX_RECORD_PAYLOAD: Final = MAX_PROTOCOL_MESSAGE_LENGTH
"""Core captures only messages it accepted the header of, so longer is garbage."""

_READ_CHUNK: Final = 1 << 20

MAX_TIME: Final = 2**64 - 1
"""The largest record time (microseconds): the field is an unsigned 64-bit integer."""


class Direction(enum.StrEnum):
    """Which way a message went, always from the capturing node's point of view (a
    string enum: ``Direction.RECV == "recv"``)."""

    RECV = "recv"
    """Received by the node: sent by the peer (``msgs_recv.dat``)."""
    SENT = "sent"
    """Sent by the node (``msgs_sent.dat``)."""

    @classmethod
    def of_file(cls, path: str | os.PathLike[str]) -> Direction:
        """Core's parser's rule: ``recv`` when the file stem contains 'recv'."""
        stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        return cls.RECV if "recv" in stem else cls.SENT

    @property
    def file_name(self) -> str:
        return RECV_FILE if self is Direction.RECV else SENT_FILE

    @property
    def opposite(self) -> Direction:
        return Direction.SENT if self is Direction.RECV else Direction.RECV


def record_header(time_us: int, msgtype: MsgType | str, length: int) -> bytes:
    """The 24 bytes that precede a payload in a record (the one place they are packed)."""
    raw = msgtype.raw if isinstance(msgtype, MsgType) else encode_msgtype(msgtype)
    return RECORD_HEADER.pack(time_us, raw, length)


def record_messages(records: bytes) -> list[tuple[str, memoryview]]:
    """The messages of well-formed records laid end to end (e.g. the records a native
    BIP324 pipe made: every type printable ASCII, NUL-padded), payloads as views."""
    view = memoryview(records)
    messages: list[tuple[str, memoryview]] = []
    pos, end = 0, len(records)
    unpack = RECORD_HEADER.unpack_from
    while pos < end:
        _, raw, length = unpack(records, pos)
        pos += RECORD_HEADER_SIZE
        messages.append((raw.rstrip(b"\0").decode("ascii"), view[pos : pos + length]))
        pos += length
    return messages


def encode_record(
    time_us: int, msgtype: MsgType | str, payload: bytes | bytearray | memoryview
) -> bytes:
    """One record, byte-identical to what Core's CaptureMessageToFile writes."""
    return record_header(time_us, msgtype, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class Record:
    """One captured message as stored in a file."""

    time: int
    raw_msgtype: bytes
    """The 12-byte type field as stored (NUL padded)."""
    payload: bytes
    offset: int
    """Byte offset of the record in its file."""

    @property
    def msgtype(self) -> MsgType:
        return MsgType.of(self.raw_msgtype)

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True, slots=True)
class Damage:
    """Where a capture file stops being a sequence of records."""

    offset: int
    reason: str
    skipped: int
    """Bytes from ``offset`` that were not read as records."""


def _truncated_header(offset: int, have: int) -> Damage:
    return Damage(
        offset,
        f"truncated record header: {have} of {RECORD_HEADER_SIZE} bytes before end of file",
        have,
    )


def _implausible(offset: int, length: int, skipped: int) -> Damage:
    return Damage(
        offset,
        f"implausible payload length {length} (limit {MAX_RECORD_PAYLOAD}): no record "
        "boundary after it, rest of file skipped",
        skipped,
    )


def _truncated_payload(offset: int, raw_type: bytes, length: int, have: int) -> Damage:
    msgtype = MsgType.of(raw_type)
    name = msgtype.name if msgtype.text is None else msgtype.text  # 'block', or b'\x01..'
    return Damage(
        offset,
        f"truncated record: type {name!r} declares {length} payload bytes, "
        f"{have} before end of file",
        RECORD_HEADER_SIZE + have,
    )


def read_records(f: BinaryIO) -> Iterator[Record | Damage]:
    """Stream the records of an open binary file, with damage reported in place.

    Memory stays bounded by one record (at most 4 MB of payload) plus a read buffer.
    """
    chunks = RecordChunks(f)
    while chunks.fill():
        end = chunks.whole_end()
        yield from walk_records(chunks.data, chunks.pos, end, chunks.base)
        chunks.pos = end
    if chunks.damage is not None:
        yield chunks.damage


class RecordChunks:
    """An open capture file as chunks of whole records: the bulk form of
    :func:`read_records`, with the same damage reports.

    After :meth:`fill` returns True, ``data[pos:]`` starts with at least one whole record
    (walk them with :func:`scan`, then move ``pos`` past those taken); ``data[0]`` is at
    byte ``base`` of the file. After it returns False the file is done, and ``damage``
    says why when it did not end cleanly. ``data`` is never changed in place: a chunk
    stays valid after the next is read.
    """

    def __init__(self, f: BinaryIO, chunk_size: int = _READ_CHUNK) -> None:
        self.f = f
        self.data = b""
        self.pos = 0
        self.base = f.tell()
        self.damage: Damage | None = None
        self.done = False
        self._chunk_size = chunk_size

    def fill(self) -> bool:
        """Make sure a whole record starts at ``pos``, reading more if needed; False at
        the end of the file or where it stops being records."""
        while not self.done:
            data, pos = self.data, self.pos
            avail = len(data) - pos
            want = RECORD_HEADER_SIZE
            if avail >= RECORD_HEADER_SIZE:
                _, raw_type, length = RECORD_HEADER.unpack_from(data, pos)
                if length > MAX_RECORD_PAYLOAD:
                    remaining = avail + _remaining(self.f)
                    return self._stop(_implausible(self.base + pos, length, remaining))
                want += length
                if avail >= want:
                    return True
            more = self.f.read(max(want - avail, self._chunk_size))
            if not more:
                if avail < RECORD_HEADER_SIZE:
                    return self._stop(_truncated_header(self.base + pos, avail) if avail else None)
                have = avail - RECORD_HEADER_SIZE
                return self._stop(_truncated_payload(self.base + pos, raw_type, length, have))
            self.data = data[pos:] + more
            self.base += pos
            self.pos = 0
        return False

    def whole_end(self) -> int:
        """Where the whole records from ``pos`` in ``data`` end."""
        return whole_end(self.data, self.pos)

    def _stop(self, damage: Damage | None) -> bool:
        self.damage = damage
        self.done = True
        self.data = b""
        self.pos = 0
        return False


Scan = Callable[[bytes, int, int, int], tuple[int, int | None, int]]


def python_scan(
    data: bytes, pos: int, limit: int = MAX_TIME, last: int = 0
) -> tuple[int, int | None, int]:
    """Walk the whole records of ``data`` from ``pos`` while their times stay within
    ``[last, limit]`` and never decrease.

    Returns where the walk stopped, the time of the whole record there (None when there
    is none: the end of ``data``, a partial record or an implausible length) and the
    time of the last record walked (``last`` if none was). :data:`scan` is this function,
    or its native twin.
    """
    n = len(data)
    while n - pos >= RECORD_HEADER_SIZE:
        time_us, _, length = RECORD_HEADER.unpack_from(data, pos)
        if length > MAX_RECORD_PAYLOAD or length > n - pos - RECORD_HEADER_SIZE:
            break
        if time_us > limit or time_us < last:
            return pos, time_us, last
        last = time_us
        pos += RECORD_HEADER_SIZE + length
    return pos, None, last


_native = native.load("msgcap.capture._capture")
NATIVE: Final = _native is not None
"""Whether :data:`scan` (and conversation.py's merge) run in ``capture/_capture.c``."""

scan: Final[Scan] = python_scan if _native is None else _native.scan
"""See :func:`python_scan` (called with all four arguments)."""


def whole_end(data: bytes | memoryview, pos: int) -> int:
    """Where the whole records from ``pos`` in ``data`` (a chunk or a window of a
    memory-mapped file) end, whatever their times."""
    end, later, _ = scan(data, pos, MAX_TIME, 0)  # type: ignore[arg-type]
    while later is not None:  # stopped where time went back: walk on
        end, later, _ = scan(data, end, MAX_TIME, 0)  # type: ignore[arg-type]
    return end


def walk_records(data: bytes, start: int, end: int, base: int = 0) -> Iterator[Record]:
    """The records of ``data[start:end]``, which holds whole records (from :func:`scan`);
    ``data[0]`` is at byte ``base`` of the file."""
    pos = start
    while pos < end:
        time_us, raw_type, length = RECORD_HEADER.unpack_from(data, pos)
        stop = pos + RECORD_HEADER_SIZE + length
        if stop > end:
            raise ValueError(f"no whole record at {pos}")
        yield Record(time_us, raw_type, data[pos + RECORD_HEADER_SIZE : stop], base + pos)
        pos = stop


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records to take: a time window (microseconds, both ends included) and a set
    of message type names (the type field's bytes up to the first NUL); None: no limit."""

    since: int | None = None
    until: int | None = None
    types: frozenset[bytes] | None = None

    def accepts(self, time_us: int, raw_type: bytes) -> bool:
        if self.since is not None and time_us < self.since:
            return False
        if self.until is not None and time_us > self.until:
            return False
        return self.types is None or raw_type.split(b"\0", 1)[0] in self.types

    @property
    def bounds(self) -> tuple[int, int, tuple[bytes, ...] | None]:
        """``(since, until, types)`` as the bulk functions take them: a window within the
        field's range and a tuple of names (empty: nothing passes)."""
        since = 0 if self.since is None else self.since
        until = MAX_TIME if self.until is None else self.until
        if since > until or until < 0 or since > MAX_TIME:
            return 0, 0, ()
        types = None if self.types is None else tuple(sorted(self.types))
        return max(since, 0), min(until, MAX_TIME), types

    def next_taken(self, data: bytes, pos: int, end: int) -> int:
        """Where the first record this filter takes is in ``data[pos:end]`` (whole
        records), or ``end``."""
        while pos < end:
            time_us, raw_type, length = RECORD_HEADER.unpack_from(data, pos)
            if self.accepts(time_us, raw_type):
                return pos
            pos += RECORD_HEADER_SIZE + length
        return end


def _size(f: BinaryIO) -> int:
    here = f.tell()
    size = f.seek(0, os.SEEK_END)
    f.seek(here)
    return size


def _remaining(f: BinaryIO) -> int:
    return max(_size(f) - f.tell(), 0)


def read_record_headers(f: BinaryIO) -> Iterator[tuple[int, int] | Damage]:
    """Yield ``(offset, time)`` per complete record from the start of the file, seeking
    over payloads; damage is reported as by :func:`read_records`."""
    size = _size(f)
    offset = 0
    f.seek(0)
    while offset < size:
        header = f.read(RECORD_HEADER_SIZE)
        if len(header) < RECORD_HEADER_SIZE:
            yield _truncated_header(offset, len(header))
            return
        time_us, raw_type, length = RECORD_HEADER.unpack(header)
        if length > MAX_RECORD_PAYLOAD:
            yield _implausible(offset, length, size - offset)
            return
        end = offset + RECORD_HEADER_SIZE + length
        if end > size:
            yield _truncated_payload(offset, raw_type, length, size - offset - RECORD_HEADER_SIZE)
            return
        yield offset, time_us
        offset = end
        f.seek(offset)
