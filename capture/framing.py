"""Sans-IO v1 wire framing: networks and magics, frame decoding and encoding.

A :class:`FrameDecoder` owns no socket. Bytes go in with :meth:`FrameDecoder.receive_data`,
events come out of :meth:`FrameDecoder.next_event`: a :class:`Frame` (valid, to be
captured), an :class:`InvalidFrame` (Core drops it and keeps the connection), or
``NEED_DATA``. Conditions on which Bitcoin Core disconnects (wrong magic, oversize
length) raise a :class:`StreamError`; the stream cannot be resynchronised after them.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import itertools
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final, NamedTuple

from msgcap.capture.errors import MsgcapError

HEADER_SIZE: Final = 24
MAX_PROTOCOL_MESSAGE_LENGTH: Final = 4_000_000
"""Core's MAX_PROTOCOL_MESSAGE_LENGTH: longer payloads make it disconnect."""
MSGTYPE_SIZE: Final = 12

_HEADER = struct.Struct("<4s12sI4s")

Message = tuple[str, bytes | memoryview]
"""A message type and its payload, whichever transport carried it (a v1 frame here, a
BIP324 packet in :mod:`msgcap.capture.bip324`): what the proxy forwards and captures and
what a replay sends and answers."""


class Network(enum.Enum):
    """Networks Bitcoin Core knows, by the name used in configs and on the command line."""

    MAIN = "main"
    TESTNET3 = "testnet3"
    TESTNET4 = "testnet4"
    SIGNET = "signet"
    REGTEST = "regtest"

    @property
    def magic(self) -> bytes:
        return MAGICS[self]


MAGICS: Final[dict[Network, bytes]] = {
    Network.MAIN: bytes.fromhex("f9beb4d9"),
    Network.TESTNET3: bytes.fromhex("0b110907"),
    Network.TESTNET4: bytes.fromhex("1c163f28"),
    Network.SIGNET: bytes.fromhex("0a03cf40"),  # default signet challenge
    Network.REGTEST: bytes.fromhex("fabfb5da"),
}


def parse_magic(text: str) -> bytes:
    """A network name or 8 hex digits (wire order) to the 4 magic bytes."""
    try:
        return Network(text).magic
    except ValueError:
        pass
    try:
        magic = bytes.fromhex(text)
    except ValueError:
        magic = b""
    if len(magic) != 4:
        names = ", ".join(n.value for n in Network)
        raise ValueError(f"unknown network {text!r}: use one of {names} or 8 hex digits")
    return magic


def hash256(data: bytes | bytearray | memoryview) -> bytes:
    """SHA256(SHA256(data)), Core's ``Hash``: message checksums, txids, block hashes."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def checksum(payload: bytes | bytearray | memoryview) -> bytes:
    """First 4 bytes of :func:`hash256` of the payload."""
    return hash256(payload)[:4]


@functools.lru_cache(maxsize=1024)
def msgtype_is_valid(raw: bytes) -> bool:
    """Core's CMessageHeader::IsMessageTypeValid on the 12 raw bytes.

    Printable ASCII (0x20-0x7e) up to the first NUL, and only NULs after it.
    """
    text, _, rest = raw.partition(b"\0")
    if rest.strip(b"\0"):
        return False
    return all(0x20 <= c <= 0x7E for c in text)


@dataclass(frozen=True, slots=True)
class MsgType:
    """The 12-byte message type field, as on the wire and in capture records.

    Every reader goes through this one type (:meth:`of` interns them: a capture holds few
    distinct types). ``raw`` is the field as stored, NUL padded; ``name`` its bytes up to
    the first NUL (what Core's parser reads); ``text`` those bytes as text when they are
    valid UTF-8 and printable, else None (printed ``UNREADABLE``: the one decode policy,
    Core's parser's); ``valid`` is Core's ``IsMessageTypeValid`` (printable ASCII up to the
    first NUL, only NULs after it), which decides whether a frame is a message at all.
    """

    raw: bytes
    name: bytes
    text: str | None
    valid: bool

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def of(raw: bytes) -> MsgType:
        raw = raw.ljust(MSGTYPE_SIZE, b"\0")[:MSGTYPE_SIZE]
        name = raw.split(b"\0", 1)[0]
        try:
            text: str | None = name.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and not text.isprintable():
            text = None
        return MsgType(raw, name, text, msgtype_is_valid(raw))

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def from_text(text: str) -> MsgType:
        return MsgType.of(encode_msgtype(text))

    @property
    def label(self) -> str:
        """``text``, or ``UNREADABLE`` for a name that is not printable text."""
        return "UNREADABLE" if self.text is None else self.text

    def __str__(self) -> str:
        return self.label


KNOWN_MSGTYPES: Final[frozenset[str]] = frozenset(
    {
        "addr",
        "addrv2",
        "block",
        "blocktxn",
        "cfcheckpt",
        "cfheaders",
        "cfilter",
        "cmpctblock",
        "feefilter",
        "filteradd",
        "filterclear",
        "filterload",
        "getaddr",
        "getblocks",
        "getblocktxn",
        "getcfcheckpt",
        "getcfheaders",
        "getcfilters",
        "getdata",
        "getheaders",
        "headers",
        "inv",
        "mempool",
        "merkleblock",
        "notfound",
        "ping",
        "pong",
        "sendaddrv2",
        "sendcmpct",
        "sendheaders",
        "sendtxrcncl",
        "tx",
        "verack",
        "version",
        "wtxidrelay",
    }
)
"""Every message type Core's test framework decodes, by wire name: the types
:mod:`msgcap.parser.messages` has a class for (its ``MESSAGES`` has exactly these keys),
and the ones metrics label by name (any other is ``other``). Kept here, below the codec,
so that whoever only needs the names does not load it."""


def encode_msgtype(msgtype: str) -> bytes:
    raw = msgtype.encode("ascii")
    if len(raw) > MSGTYPE_SIZE:
        raise ValueError(f"message type {msgtype!r} is longer than {MSGTYPE_SIZE} bytes")
    return raw.ljust(MSGTYPE_SIZE, b"\0")


def encode_frame(magic: bytes, msgtype: str, payload: bytes) -> bytes:
    """A complete v1 wire message: header (with checksum) followed by the payload."""
    return encode_raw_frame(magic, encode_msgtype(msgtype), payload)


def encode_raw_frame(magic: bytes, raw_msgtype: bytes, payload: bytes) -> bytes:
    """:func:`encode_frame` with the 12-byte type field given as stored (a capture
    record's, byte for byte, whether or not it is a valid type)."""
    return _HEADER.pack(magic, raw_msgtype, len(payload), checksum(payload)) + payload


def v1_version_prefix(magic: bytes) -> bytes:
    """The first 16 bytes every v1 initiator sends: magic and the ``version`` type."""
    return magic + encode_msgtype("version")


# --- events -------------------------------------------------------------------------


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by :meth:`FrameDecoder.next_event` when more bytes are needed."""


@dataclass(frozen=True, slots=True)
class Frame:
    """A well-formed frame: valid message type and matching checksum."""

    msgtype: str
    payload: bytes
    offset: int
    """Stream offset of the frame's first header byte."""

    @property
    def wire_size(self) -> int:
        return HEADER_SIZE + len(self.payload)


class FrameProblem(enum.Enum):
    """Why a frame is not a message; the values are the event log's names.

    Core drops a frame with a bad checksum or an invalid type and keeps the connection
    (:class:`InvalidFrame`); a wrong magic or an oversize length ends the stream
    (:class:`StreamError`).
    """

    BAD_CHECKSUM = "bad_checksum"
    INVALID_TYPE = "invalid_type"
    BAD_MAGIC = "bad_magic"
    OVERSIZE = "oversize"


@dataclass(frozen=True, slots=True)
class InvalidFrame:
    """A complete frame Core would drop without disconnecting (bad checksum or type)."""

    reason: FrameProblem
    raw_msgtype: bytes
    length: int
    offset: int
    expected_checksum: bytes
    actual_checksum: bytes

    def describe(self) -> str:
        if self.reason is FrameProblem.BAD_CHECKSUM:
            return (
                f"bad checksum at offset {self.offset}: type {self.raw_msgtype!r} length "
                f"{self.length}, header says {self.expected_checksum.hex()}, payload hashes to "
                f"{self.actual_checksum.hex()}"
            )
        return f"invalid message type {self.raw_msgtype!r} at offset {self.offset}"


Event = Frame | InvalidFrame | _NeedData


class UncheckedFrame(NamedTuple):
    """A complete frame whose checksum and message type are not checked yet.

    The payload is kept as the pieces of the received chunks that hold it: the event loop
    never copies a large payload; whoever checks the frame joins the pieces. (A tuple:
    a proxy makes one per message, so it is cheap to make.)
    """

    raw_msgtype: bytes
    parts: tuple[bytes | memoryview, ...]
    length: int
    offset: int
    expected_checksum: bytes

    @property
    def payload(self) -> bytes:
        parts = self.parts
        if len(parts) == 1 and type(parts[0]) is bytes:
            return parts[0]
        return b"".join(parts)

    def check(self) -> Frame | InvalidFrame:
        """What Core makes of it: a Frame, or an InvalidFrame it would drop."""
        raw, length = self.raw_msgtype, self.length
        actual = checksum(self.payload)
        if actual != self.expected_checksum:
            return InvalidFrame(
                FrameProblem.BAD_CHECKSUM,
                raw,
                length,
                self.offset,
                self.expected_checksum,
                actual,
            )
        if not msgtype_is_valid(raw):
            return InvalidFrame(
                FrameProblem.INVALID_TYPE,
                raw,
                length,
                self.offset,
                self.expected_checksum,
                actual,
            )
        return Frame(MsgType.of(raw).label, self.payload, self.offset)


# --- errors ---------------------------------------------------------------------------


class StreamError(MsgcapError):
    """A framing error on which Core disconnects: nothing after it can be framed."""

    problem: FrameProblem

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class BadMagic(StreamError):
    problem = FrameProblem.BAD_MAGIC

    def __init__(self, expected: bytes, actual: bytes, offset: int) -> None:
        super().__init__(
            f"wrong magic at offset {offset}: expected {expected.hex()}, got {actual.hex()}", offset
        )
        self.expected = expected
        self.actual = actual


class Oversize(StreamError):
    problem = FrameProblem.OVERSIZE

    def __init__(self, length: int, limit: int, raw_msgtype: bytes, offset: int) -> None:
        super().__init__(
            f"oversize message at offset {offset}: type {raw_msgtype!r} declares {length} "
            f"bytes, limit {limit}",
            offset,
        )
        self.length = length
        self.limit = limit


# --- decoder --------------------------------------------------------------------------


class FrameDecoder:
    """Incremental v1 frame decoder for one direction of one connection.

    Received chunks are kept as they are; a payload is copied once, out of the chunks
    that hold it (and not at all when one chunk is exactly one payload).
    """

    def __init__(self, magic: bytes, max_length: int = MAX_PROTOCOL_MESSAGE_LENGTH) -> None:
        if len(magic) != 4:
            raise ValueError("magic must be 4 bytes")
        self.magic = magic
        self.max_length = max_length
        self._chunks: deque[bytes] = deque()
        self._head = 0  # read position inside _chunks[0]
        self._size = 0  # bytes received and not yet framed
        self._offset = 0  # stream offset of the first of them
        self._failed: StreamError | None = None

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet returned as part of an event."""
        return self._offset

    @property
    def buffered(self) -> int:
        """Bytes received but not yet framed."""
        return self._size

    @property
    def incomplete(self) -> int:
        """Bytes the frame being received will hold once complete (header included), as
        soon as its header is in; until then the bytes buffered. 0 when nothing is."""
        size = self._size
        if size < HEADER_SIZE or self._failed is not None:
            return size
        length = int.from_bytes(self._peek(HEADER_SIZE)[16:20], "little")
        return HEADER_SIZE + min(length, self.max_length)

    def discard(self) -> None:
        """Drop every buffered byte (the stream is over)."""
        self._chunks.clear()
        self._head = self._size = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._size += len(data)

    def _peek(self, n: int) -> bytes:
        """The next ``n`` buffered bytes (n <= buffered), not consumed."""
        first, head = self._chunks[0], self._head
        if len(first) - head >= n:
            return first[head : head + n]
        out = first[head:]
        for chunk in itertools.islice(self._chunks, 1, None):
            out += chunk[: n - len(out)]
            if len(out) >= n:
                break
        return out

    def _take(self, n: int) -> tuple[bytes | memoryview, ...]:
        """Consume the next ``n`` buffered bytes (n <= buffered), as chunk pieces."""
        chunks = self._chunks
        self._size -= n
        self._offset += n
        first, head = chunks[0], self._head
        if len(first) - head > n:  # inside the first chunk
            self._head = head + n
            return (first[head : head + n],)
        if head == 0 and len(first) == n:  # exactly the first chunk
            chunks.popleft()
            return (first,)
        parts: list[bytes | memoryview] = []
        while n:
            first = chunks[0]
            avail = len(first) - self._head
            if avail <= n:
                parts.append(memoryview(first)[self._head :] if self._head else first)
                chunks.popleft()
                self._head = 0
                n -= avail
            else:
                parts.append(memoryview(first)[:n])
                self._head = n
                n = 0
        return tuple(parts)

    def next_unchecked(self) -> UncheckedFrame | _NeedData:
        """The next complete frame with its checksum and type not yet checked (so that
        the hashing can happen elsewhere), or NEED_DATA. Raises StreamError."""
        if self._failed is not None:
            raise self._failed
        size = self._size
        if size >= HEADER_SIZE:
            # Fast path: the whole frame is inside the first chunk.
            first, head = self._chunks[0], self._head
            if len(first) - head >= HEADER_SIZE:
                magic, raw_type, length, expected = _HEADER.unpack_from(first, head)
                end = head + HEADER_SIZE + length
                if magic == self.magic and length <= self.max_length and end < len(first):
                    offset = self._offset
                    self._head = end
                    self._size = size - HEADER_SIZE - length
                    self._offset = offset + HEADER_SIZE + length
                    payload = first[head + HEADER_SIZE : end]
                    return UncheckedFrame(raw_type, (payload,), length, offset, expected)
        if size < HEADER_SIZE:
            # Reject a wrong magic as soon as its bytes are in, not a whole header later.
            have = min(size, 4)
            if have and self._peek(have) != self.magic[:have]:
                self._fail(BadMagic(self.magic, self._peek(have), self._offset))
            return NEED_DATA
        magic, raw_type, length, expected = _HEADER.unpack(self._peek(HEADER_SIZE))
        if magic != self.magic:
            self._fail(BadMagic(self.magic, magic, self._offset))
        if length > self.max_length:
            self._fail(Oversize(length, self.max_length, raw_type, self._offset))
        if size < HEADER_SIZE + length:
            return NEED_DATA
        offset = self._offset
        self._take(HEADER_SIZE)
        parts = self._take(length) if length else (b"",)
        return UncheckedFrame(raw_type, parts, length, offset, expected)

    def take_unchecked(self) -> tuple[list[UncheckedFrame], StreamError | None]:
        """Every frame complete so far (as :meth:`next_unchecked` would return them one
        by one), and the error that stopped the stream after them, if any."""
        frames: list[UncheckedFrame] = []
        append = frames.append
        chunks, magic, max_length, unpack = (
            self._chunks,
            self.magic,
            self.max_length,
            _HEADER.unpack_from,
        )
        while True:
            # Fast path, inlined: frames lying whole inside the first chunk.
            if chunks:
                first, head = chunks[0], self._head
                size, offset, n = self._size, self._offset, len(first)
                while n - head >= HEADER_SIZE:
                    magic_, raw_type, length, expected = unpack(first, head)
                    end = head + HEADER_SIZE + length
                    if magic_ != magic or length > max_length or end >= n:
                        break
                    append(
                        UncheckedFrame(
                            raw_type, (first[head + HEADER_SIZE : end],), length, offset, expected
                        )
                    )
                    size -= end - head
                    offset += end - head
                    head = end
                self._head, self._size, self._offset = head, size, offset
            try:
                ev = self.next_unchecked()
            except StreamError as e:
                return frames, e
            if ev is NEED_DATA:
                return frames, None
            append(ev)

    def next_event(self) -> Event:
        """The next frame, checked (checksum and message type), or NEED_DATA."""
        ev = self.next_unchecked()
        return ev if ev is NEED_DATA else ev.check()

    def _fail(self, error: StreamError) -> None:
        self._failed = error
        raise error
