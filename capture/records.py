"""Bitcoin Core's ``-capturemessages`` record format: encoding and a streaming reader.

A capture file is a plain concatenation of records, with no file header::

    time (uint64 LE, microseconds) | msgtype (12 bytes, NUL padded) | length (uint32 LE) | payload

The reader never raises on bad data: it yields :class:`Record` items and, where the
file stops making sense, a :class:`Damage` item that names the byte offset.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from msgcap.capture.framing import MAX_PROTOCOL_MESSAGE_LENGTH, MsgType, encode_msgtype
from msgcap.capture.layout import RECV_FILE, SENT_FILE

RECORD_HEADER: Final = struct.Struct("<Q12sI")
RECORD_HEADER_SIZE: Final = RECORD_HEADER.size  # 24

MAX_RECORD_PAYLOAD: Final = MAX_PROTOCOL_MESSAGE_LENGTH
"""Core captures only messages it accepted the header of, so longer is garbage."""

_READ_CHUNK: Final = 1 << 20


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
    name = MsgType.of(raw_type).name
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
    buf = b""
    pos = 0  # read position in buf
    base = f.tell()  # file offset of buf[0]
    while True:
        avail = len(buf) - pos
        if avail < RECORD_HEADER_SIZE:
            buf = buf[pos:] + f.read(_READ_CHUNK)
            base += pos
            pos = 0
            avail = len(buf)
            if avail < RECORD_HEADER_SIZE:
                if avail:
                    yield _truncated_header(base, avail)
                return
        time_us, raw_type, length = RECORD_HEADER.unpack_from(buf, pos)
        offset = base + pos
        if length > MAX_RECORD_PAYLOAD:
            yield _implausible(offset, length, avail + _remaining(f))
            return
        end = pos + RECORD_HEADER_SIZE + length
        if len(buf) < end:
            buf = buf[pos:] + f.read(max(end - len(buf), _READ_CHUNK))
            base += pos
            end -= pos
            pos = 0
            if len(buf) < end:
                yield _truncated_payload(offset, raw_type, length, len(buf) - RECORD_HEADER_SIZE)
                return
        yield Record(time_us, raw_type, buf[pos + RECORD_HEADER_SIZE : end], offset)
        pos = end


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


def read_record_at(f: BinaryIO, offset: int) -> Record:
    """The complete record at a known-good offset (from :func:`read_record_headers`)."""
    f.seek(offset)
    time_us, raw_type, length = RECORD_HEADER.unpack(f.read(RECORD_HEADER_SIZE))
    return Record(time_us, raw_type, f.read(length), offset)
