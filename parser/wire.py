"""Strict binary reading and writing of Bitcoin's serialization primitives.

:class:`Reader` never pads: reading past the end, a non-canonical CompactSize, a count
that cannot fit in the bytes left, or bytes left over at the end raise
:class:`DecodeError`, which names the message type and the payload offset.
Byte order lives here: hashes stay in wire order, :func:`display_hash` reverses them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from msgcap.capture.errors import MsgcapError

_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_U64: Final = struct.Struct("<Q")
_I64: Final = struct.Struct("<q")

HashHex = Callable[[bytes], str]
"""How a 32-byte hash is rendered: :func:`wire_hash` (Core's parser) or :func:`display_hash`."""


def wire_hash(h: bytes) -> str:
    """Hex in serialized (internal) byte order, as Core's message-capture-parser prints."""
    return h.hex()


def display_hash(h: bytes) -> str:
    """Hex in RPC display order (the reverse of the wire order)."""
    return h[::-1].hex()


class DecodeError(MsgcapError, ValueError):
    """A payload that is not a valid serialization of its message type."""

    def __init__(self, msgtype: str, offset: int, reason: str) -> None:
        super().__init__(f"{msgtype}: {reason} at payload offset {offset}")
        self.msgtype = msgtype
        self.offset = offset
        self.reason = reason


class Reader:
    """A cursor over one payload."""

    __slots__ = ("buf", "msgtype", "pos")

    def __init__(self, buf: bytes, msgtype: str = "?") -> None:
        self.buf = buf
        self.pos = 0
        self.msgtype = msgtype

    def fail(self, reason: str, at: int | None = None) -> DecodeError:
        return DecodeError(self.msgtype, self.pos if at is None else at, reason)

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def _need(self, n: int) -> int:
        pos = self.pos
        if pos + n > len(self.buf):
            raise self.fail(f"need {n} bytes, {len(self.buf) - pos} left")
        self.pos = pos + n
        return pos

    def read(self, n: int) -> bytes:
        pos = self._need(n)
        return self.buf[pos : pos + n]

    def hash(self) -> bytes:
        pos = self._need(32)
        return self.buf[pos : pos + 32]

    def u8(self) -> int:
        return self.buf[self._need(1)]

    def u16(self) -> int:
        return int(_U16.unpack_from(self.buf, self._need(2))[0])

    def u16be(self) -> int:
        pos = self._need(2)
        return (self.buf[pos] << 8) | self.buf[pos + 1]

    def u32(self) -> int:
        return int(_U32.unpack_from(self.buf, self._need(4))[0])

    def i32(self) -> int:
        return int(_I32.unpack_from(self.buf, self._need(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.buf, self._need(8))[0])

    def i64(self) -> int:
        return int(_I64.unpack_from(self.buf, self._need(8))[0])

    def compact_size(self) -> int:
        start = self.pos
        first = self.u8()
        if first < 0xFD:
            return first
        if first == 0xFD:
            value, floor = self.u16(), 0xFD
        elif first == 0xFE:
            value, floor = self.u32(), 0x10000
        else:
            value, floor = self.u64(), 0x100000000
        if value < floor:
            raise self.fail(f"non-canonical CompactSize {value}", start)
        return value

    def count(self, min_item_size: int) -> int:
        """A CompactSize element count that the remaining bytes can hold."""
        start = self.pos
        n = self.compact_size()
        if n * min_item_size > len(self.buf) - self.pos:
            raise self.fail(
                f"count {n} needs at least {n * min_item_size} bytes, "
                f"{len(self.buf) - self.pos} left",
                start,
            )
        return n

    def var_bytes(self) -> bytes:
        n = self.count(1)
        pos = self.pos
        self.pos = pos + n
        return self.buf[pos : pos + n]

    def hashes(self) -> tuple[bytes, ...]:
        n = self.count(32)
        buf, pos = self.buf, self.pos
        self.pos = pos + 32 * n
        return tuple(buf[p : p + 32] for p in range(pos, pos + 32 * n, 32))

    def finish(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} trailing bytes")


def compact_size(n: int) -> bytes:
    if n < 0xFD:
        return bytes((n,))
    if n <= 0xFFFF:
        return b"\xfd" + _U16.pack(n)
    if n <= 0xFFFFFFFF:
        return b"\xfe" + _U32.pack(n)
    return b"\xff" + _U64.pack(n)


def var_bytes(b: bytes) -> bytes:
    return compact_size(len(b)) + b


def hashes(hs: tuple[bytes, ...]) -> bytes:
    return compact_size(len(hs)) + b"".join(hs)


def u32(n: int) -> bytes:
    return _U32.pack(n)


def i32(n: int) -> bytes:
    return _I32.pack(n)


def u64(n: int) -> bytes:
    return _U64.pack(n)


def i64(n: int) -> bytes:
    return _I64.pack(n)
