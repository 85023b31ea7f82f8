"""The one walk of a transaction's serialization, in Python: where its parts are.

A transaction is read in three ways, and all of them walk it here: the typed codec
(:meth:`msgcap.parser.structures.Transaction.read`) builds objects from the positions
this walk marks, the pure-Python JSON renderer (:mod:`msgcap.parser.fastjson`) cuts its
hex strings at them, and the dataset export (:mod:`msgcap.parser.dataset.decode`) needs
only where the transaction ends and which bytes its txid hashes. A transaction is most
of the bytes of a capture, so the walk uses plain indexing and builds nothing unless
asked to.

It is exact all the same: it reads the serialization as Core's test framework and
``UnserializeTransaction`` do (an empty input vector followed by a non-zero byte is the
segwit marker) and rejects what :class:`~msgcap.parser.wire.Reader` rejects, with the
same :class:`~msgcap.parser.wire.DecodeError` (reason and payload offset): a read past
the end, a non-canonical CompactSize, a count the bytes left cannot hold.
"""

from __future__ import annotations

import struct
from typing import Final

from msgcap.parser.wire import DecodeError

Buffer = bytes | bytearray | memoryview

_U16: Final = struct.Struct("<H").unpack_from
_U32: Final = struct.Struct("<I").unpack_from
_U64: Final = struct.Struct("<Q").unpack_from

# The smallest serialized input (36 outpoint + 1 script length + 4 sequence) and output.
MIN_TXIN: Final = 41
MIN_TXOUT: Final = 9

TxLayout = tuple[int, int, int, int, int, int]
"""``(end, flags, io_start, io_end, inputs, outputs)`` of a walked transaction: where it
ends, the byte after the segwit marker (0: legacy), where its inputs and outputs start
(after marker and flag) and end (before the witnesses), and how many of each there are.
The txid hashes ``version + buf[io_start:io_end] + lock time``."""


def short(msgtype: str, buf: Buffer, pos: int, *sizes: int) -> DecodeError:
    """The error of reading fields of ``sizes`` bytes one after another from ``pos``,
    where one of them does not fit: :class:`~msgcap.parser.wire.Reader`'s."""
    size = len(buf)
    for n in sizes:
        if pos + n > size:
            return DecodeError(msgtype, pos, f"need {n} bytes, {max(size - pos, 0)} left")
        pos += n
    raise AssertionError("every field fits")


def too_many(msgtype: str, at: int, n: int, min_item: int, left: int) -> DecodeError:
    """The error of a count (at ``at``) of ``n`` items that ``left`` bytes cannot hold."""
    return DecodeError(msgtype, at, f"count {n} needs at least {n * min_item} bytes, {left} left")


def big_compact(buf: Buffer, pos: int, msgtype: str = "?") -> tuple[int, int]:
    """A CompactSize whose first byte (at ``pos``) is 0xfd or more, and where it ends."""
    first = buf[pos]
    if first == 0xFD:
        n, floor, unpack = 2, 0xFD, _U16
    elif first == 0xFE:
        n, floor, unpack = 4, 0x10000, _U32
    else:
        n, floor, unpack = 8, 0x100000000, _U64
    if pos + 1 + n > len(buf):
        raise short(msgtype, buf, pos + 1, n)
    value: int = unpack(buf, pos + 1)[0]
    if value < floor:
        raise DecodeError(msgtype, pos, f"non-canonical CompactSize {value}")
    return value, pos + 1 + n


def compact_size(buf: Buffer, pos: int, msgtype: str = "?") -> tuple[int, int]:
    """The CompactSize at ``pos`` and where it ends."""
    if pos >= len(buf):
        raise short(msgtype, buf, pos, 1)
    n = buf[pos]
    return (n, pos + 1) if n < 0xFD else big_compact(buf, pos, msgtype)


def count(buf: Buffer, pos: int, min_item: int, msgtype: str = "?") -> tuple[int, int]:
    """A CompactSize count at ``pos`` of items of ``min_item`` bytes or more that the rest
    of ``buf`` can hold, and where it ends."""
    n, end = compact_size(buf, pos, msgtype)
    if n * min_item > len(buf) - end:
        raise too_many(msgtype, pos, n, min_item, len(buf) - end)
    return n, end


def walk_tx(buf: Buffer, pos: int, msgtype: str = "tx", marks: list[int] | None = None) -> TxLayout:
    """Walk the transaction that starts at ``pos`` of ``buf`` (see :data:`TxLayout`), or
    raise the DecodeError the typed codec raises for it (``msgtype``: the message it is in).

    With ``marks``, appends where the parts are: per input its start (the outpoint) and
    the start and end of its scriptSig (the sequence follows); per output its start (the
    value) and the start and end of its scriptPubKey; then, with witnesses, per input the
    number of stack items and the start and end of each.
    """
    size = len(buf)
    if pos + 5 > size:
        raise short(msgtype, buf, pos, 4, 1)
    io_start = pos = pos + 4
    flags = 0
    n_in = buf[pos]
    mark = marks is not None
    fields: tuple[int, ...] = (1,)  # what is read where an IndexError says the end came
    try:
        if n_in == 0:  # then the segwit flag, or (legacy, no inputs) the output count 0
            pos += 1
            flags = buf[pos]
            if flags:
                io_start = pos = pos + 1
                n_in = buf[pos]
        at = pos
        pos += 1
        if n_in >= 0xFD:
            n_in, pos = big_compact(buf, at, msgtype)
        if n_in * MIN_TXIN > size - pos:
            raise too_many(msgtype, at, n_in, MIN_TXIN, size - pos)
        fields = (32, 4, 1)
        for _ in range(n_in):
            n = buf[pos + 36]  # after the outpoint: the scriptSig's length
            if n < 0xFD:
                e = pos + 37 + n
            else:
                n, e = big_compact(buf, pos + 36, msgtype)
                e += n
            if e + 4 > size:  # the scriptSig, then the sequence
                if e > size:
                    raise too_many(msgtype, pos + 36, n, 1, size - e + n)
                raise short(msgtype, buf, e, 4)
            if mark:
                marks += (pos, e - n, e)  # type: ignore[operator]
            pos = e + 4
        fields = (1,)
        n_out = 0
        if n_in or flags:
            at = pos
            n_out = buf[pos]
            pos += 1
            if n_out >= 0xFD:
                n_out, pos = big_compact(buf, at, msgtype)
            if n_out * MIN_TXOUT > size - pos:
                raise too_many(msgtype, at, n_out, MIN_TXOUT, size - pos)
            fields = (8, 1)
            for _ in range(n_out):
                n = buf[pos + 8]  # after the value: the scriptPubKey's length
                if n < 0xFD:
                    e = pos + 9 + n
                else:
                    n, e = big_compact(buf, pos + 8, msgtype)
                    e += n
                if e > size:
                    raise too_many(msgtype, pos + 8, n, 1, size - e + n)
                if mark:
                    marks += (pos, e - n, e)  # type: ignore[operator]
                pos = e
            fields = (1,)
        io_end = pos
        if flags:
            for _ in range(n_in):
                at = pos
                items = buf[pos]
                pos += 1
                if items >= 0xFD:
                    items, pos = big_compact(buf, at, msgtype)
                if items > size - pos:
                    raise too_many(msgtype, at, items, 1, size - pos)
                if mark:
                    marks.append(items)  # type: ignore[union-attr]
                for _ in range(items):
                    n = buf[pos]
                    if n < 0xFD:
                        e = pos + 1 + n
                    else:
                        n, e = big_compact(buf, pos, msgtype)
                        e += n
                    if e > size:
                        raise too_many(msgtype, pos, n, 1, size - e + n)
                    if mark:
                        marks += (e - n, e)  # type: ignore[operator]
                    pos = e
    except IndexError:  # a read past the end: said as the Reader says it
        raise short(msgtype, buf, pos, *fields) from None
    if pos + 4 > size:
        raise short(msgtype, buf, pos, 4)
    return pos + 4, flags, io_start, io_end, n_in, n_out
