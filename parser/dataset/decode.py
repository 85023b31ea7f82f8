"""What the derived tables take from a payload, decoded in bulk: a transaction's ids,
size and counts, a block's header fields and BIP34 height, an inventory's entries.

Each decoder accepts exactly what the typed codec (:mod:`msgcap.parser.messages`)
accepts and rejects the rest with its :class:`~msgcap.parser.wire.DecodeError` (the
tests check them against each other), but builds only what its row needs: transactions
are walked by the one transaction walk, :func:`~msgcap.parser.txwalk.walk_tx`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from msgcap.capture.framing import hash256
from msgcap.capture.native import load
from msgcap.parser.structures import BlockHeader, Transaction
from msgcap.parser.txwalk import compact_size, walk_tx
from msgcap.parser.wire import DecodeError, Reader, display_hash


def bip34_height(header: BlockHeader, coinbase: Transaction | None) -> int | None:
    """The height a coinbase commits to (BIP34: ``CScript() << height`` starts its
    scriptSig), or None for a version 1 block or a script that does not start so."""
    if coinbase is None or header.version < 2 or len(coinbase.inputs) != 1:
        return None
    txin = coinbase.inputs[0]
    if txin.prevout.hash != b"\0" * 32 or txin.prevout.index != 0xFFFFFFFF:
        return None
    script = txin.script_sig
    if not script:
        return None
    op = script[0]
    if 0x51 <= op <= 0x60:  # OP_1 .. OP_16
        return op - 0x50
    if 1 <= op <= 4 and len(script) > op:
        num = script[1 : 1 + op]
        if num[-1] & 0x80:  # negative CScriptNum
            return None
        value = int.from_bytes(num, "little")
        return value if value <= 0x7FFFFFFF else None
    return None


def block_row(msgtype: str, payload: bytes | memoryview) -> tuple[str, str, int | None, int, int]:
    """``(hash, prev_hash, height, tx_count, block_time_us)`` of a ``block`` or
    ``cmpctblock`` payload, or DecodeError where the payload does not decode (as
    ``msgcap parse`` decides: :func:`check_payload`). Decodes the header, the counts and
    the coinbase (the first prefilled transaction of a compact block), not the other
    transactions (a memoryview payload is read in place)."""
    check_payload(msgtype, payload)
    r = Reader(payload, msgtype)  # type: ignore[arg-type]
    header = BlockHeader.read(r)
    coinbase: Transaction | None = None
    if msgtype == "block":
        tx_count = r.count(10)
        if tx_count:
            coinbase = Transaction.read(r)
    else:
        r.u64()  # nonce
        short_ids = r.count(6)
        r.read(6 * short_ids)
        prefilled = r.count(11)
        tx_count = short_ids + prefilled
        if prefilled and r.compact_size() == 0:
            coinbase = Transaction.read(r)
    return (
        display_hash(header.hash),
        display_hash(header.prev_block),
        bip34_height(header, coinbase),
        tx_count,
        header.time * 1_000_000,
    )


_native = load("msgcap.parser._fastjson")
_check: Final[Callable[[str, bytes | memoryview], bool] | None] = (
    None if _native is None else _native.check
)


def check_payload(msgtype: str, payload: bytes | memoryview) -> None:
    """Raise the DecodeError ``msgcap parse`` reports (the same reason at the same offset)
    unless ``payload`` is a valid serialization of ``msgtype``, all of it.

    Walks the payload without building anything: in ``parser/_fastjson.c`` (the render
    walk, writing nothing) when it was built, else, for a ``block``, with the one
    transaction walk (:func:`txs_end`). Where neither decides, the typed codec does."""
    if _check is not None:
        try:
            if _check(msgtype, payload):
                return
        except ValueError as e:  # args: the reason and the payload offset
            reason, offset = e.args
            raise DecodeError(msgtype, offset, reason) from None
    elif msgtype == "block":
        try:
            n, pos = compact_size(payload, 80, msgtype)
        except DecodeError:
            pass
        else:
            if txs_end(payload, pos, n) == len(payload):
                return
    from msgcap.parser.messages import decode_message  # only for what is left: slow, exact

    decode_message(msgtype, bytes(payload))


def txs_end(p: bytes | memoryview, pos: int, count: int) -> int | None:
    """Where ``count`` transactions from ``pos`` end (:func:`~msgcap.parser.txwalk.walk_tx`),
    or None where one does not decode (the typed codec then says why)."""
    try:
        for _ in range(count):
            pos = walk_tx(p, pos, "block")[0]
    except DecodeError:
        return None
    return pos


def tx_row(payload: bytes) -> tuple[str, str, int, int, int]:
    """``(txid, wtxid, vsize, inputs, outputs)`` of a ``tx`` payload, or the DecodeError
    of the typed codec (:meth:`Transaction.read`: the same walk; the tests check the
    two against each other).

    Builds nothing: the txid is the hash of the payload without marker, flag and
    witnesses, cut out of the payload itself.
    """
    end, flags, io_start, io_end, n_in, n_out = walk_tx(payload, 0)
    if end != len(payload):
        raise DecodeError("tx", end, f"{len(payload) - end} trailing bytes")
    wtxid = hash256(payload)
    if flags:
        base = payload[:4] + payload[io_start:io_end] + payload[end - 4 :]
        txid, base_size = hash256(base), len(base)
    else:
        txid, base_size = wtxid, end
    weight = 3 * base_size + end
    return txid[::-1].hex(), wtxid[::-1].hex(), (weight + 3) // 4, n_in, n_out


INV_MESSAGES: Final = frozenset(("inv", "getdata", "notfound"))
INV_ENTRY: Final = struct.Struct("<I32s")


def inv_entries(msgtype: str, payload: bytes) -> list[tuple[int, bytes]]:
    """``(type, hash)`` per inventory entry of an ``inv``, ``getdata`` or ``notfound``
    payload: what :class:`Inv`, :class:`GetData` and :class:`NotFound` decode (the tests
    check them against each other), in bulk."""
    start, n = inv_span(msgtype, payload)
    return list(INV_ENTRY.iter_unpack(memoryview(payload)[start : start + INV_ENTRY.size * n]))


def inv_span(msgtype: str, payload: bytes | memoryview) -> tuple[int, int]:
    """Where the entries of an inventory payload start, and how many there are (checked
    as :func:`inv_entries` checks them)."""
    if payload and payload[0] < 0xFD and 1 + INV_ENTRY.size * payload[0] == len(payload):
        return 1, payload[0]  # the usual case, where the Reader agrees
    r = Reader(payload, msgtype)  # type: ignore[arg-type]
    n = r.count(INV_ENTRY.size)
    start = r.pos
    r.read(INV_ENTRY.size * n)
    r.finish()
    return start, n
