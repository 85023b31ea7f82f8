"""Payload-to-JSON rendering for the bulk message types, without intermediate objects.

Transactions, blocks, headers, compact blocks and inventories carry nearly all the bytes
of a capture. For these, rendering straight from the payload is several times faster
than decoding into the typed classes of :mod:`msgcap.parser.messages` and calling ``json()``.
The output is the same: ``tests/test_fastjson.py`` checks both paths agree, value for
value and on which payloads are rejected, for every vector and for random payloads.

A native twin, ``parser/_fastjson.c``, renders the same JSON text an order of magnitude
faster (and every other message type too, whole batches of records at a time: see
:class:`~msgcap.parser.render.BatchRenderer`); it is used when it was built (``pip install``
compiles it where a C compiler is available). Set ``MSGCAP_PURE_PYTHON=1`` to use the
Python code regardless.

Hex strings are cut out of one ``payload.hex()`` per message; a transaction's, where
the one transaction walk (:func:`~msgcap.parser.txwalk.walk_tx`, which the typed codec
builds on too) marks its parts. Any read past the end shows up as an IndexError,
struct.error or DecodeError, or as a final position past the end, and becomes a
:class:`~msgcap.parser.wire.DecodeError`. That error is the typed codec's, with its reason and
payload offset: the Python renderer does not track where it stopped, so a rejected
payload is decoded again with :func:`~msgcap.parser.messages.decode_message` (only rejected
payloads pay for it). The native renderer tracks the offset itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

import orjson

from msgcap.capture.native import load
from msgcap.parser.txwalk import big_compact, count, walk_tx
from msgcap.parser.wire import DecodeError

_module = load(
    "msgcap.parser._fastjson"
)  # None: not compiled, or turned off; the Python renderer below is used
_native: Callable[[str, bytes, bool], bytes | None] | None = (
    None if _module is None else _module.render
)
NATIVE: Final = _native is not None
"""Whether the native renderer is in use."""

RenderBatch = Callable[
    [
        bytearray,
        int,
        int,
        list[bytes],
        bytes,
        int,
        int,
        list[tuple[bytes, bytes]],
        tuple[Any, ...],
        bool,
    ],
    tuple[int, int, bool, int],
]
render_batch: Final[RenderBatch | None] = None if _module is None else _module.render_batch
"""The native renderer of whole batches of records (see ``parser/_fastjson.c``), or None."""

_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_I64 = struct.Struct("<q").unpack_from
_HEADER = struct.Struct("<i32s32sIII").unpack_from


class _Ctx:
    """Per-message state: the payload, its hex, and the hash byte order."""

    __slots__ = ("buf", "hexed", "reverse", "size")

    def __init__(self, buf: bytes, reverse: bool) -> None:
        self.buf = buf
        self.hexed = buf.hex()
        self.reverse = reverse
        self.size = len(buf)

    def hash(self, pos: int) -> str:
        if self.reverse:
            return self.buf[pos : pos + 32][::-1].hex()
        return self.hexed[2 * pos : 2 * pos + 64]


def _tx(c: _Ctx, pos: int) -> tuple[dict[str, Any], int]:
    """A transaction as Core's parser prints it, cut out where the one walk
    (:func:`~msgcap.parser.txwalk.walk_tx`) marks its parts."""
    buf, hexed = c.buf, c.hexed
    marks: list[int] = []
    end, flags, _, _, n_in, n_out = walk_tx(buf, pos, "tx", marks)
    vin = []
    for i in range(0, 3 * n_in, 3):
        p, s, e = marks[i], marks[i + 1], marks[i + 2]
        vin.append(
            {
                "nSequence": _U32(buf, e)[0],
                "prevout": {"hash": c.hash(p), "n": _U32(buf, p + 32)[0]},
                "scriptSig": hexed[2 * s : 2 * e],
            }
        )
    vout = []
    for i in range(3 * n_in, 3 * (n_in + n_out), 3):
        p, s, e = marks[i], marks[i + 1], marks[i + 2]
        vout.append({"nValue": _I64(buf, p)[0], "scriptPubKey": hexed[2 * s : 2 * e]})
    wit = []
    if flags:
        i = 3 * (n_in + n_out)
        for _ in range(n_in):
            j = i + 1 + 2 * marks[i]
            stack = []
            for k in range(i + 1, j, 2):
                stack.append(hexed[2 * marks[k] : 2 * marks[k + 1]])
            wit.append({"scriptWitness": {"stack": stack}})
            i = j
    return {
        "nLockTime": _U32(buf, end - 4)[0],
        "version": _U32(buf, pos)[0],
        "vin": vin,
        "vout": vout,
        "wit": {"vtxinwit": wit},
    }, end


def _txs(c: _Ctx, pos: int) -> tuple[list[dict[str, Any]], int]:
    n, pos = count(c.buf, pos, 10)
    out = []
    for _ in range(n):
        tx, pos = _tx(c, pos)
        out.append(tx)
    return out, pos


def _header(c: _Ctx, pos: int) -> dict[str, Any]:
    version, _, _, time, bits, nonce = _HEADER(c.buf, pos)
    return {
        "hashMerkleRoot": c.hash(pos + 36),
        "hashPrevBlock": c.hash(pos + 4),
        "nBits": bits,
        "nNonce": nonce,
        "nTime": time,
        "nVersion": version,
    }


def _inventory(c: _Ctx, pos: int) -> tuple[list[dict[str, Any]], int]:
    buf = c.buf
    n, pos = count(buf, pos, 36)
    out = []
    for p in range(pos, pos + 36 * n, 36):
        out.append({"hash": c.hash(p + 4), "type": _U32(buf, p)[0]})
    return out, pos + 36 * n


def tx_body(c: _Ctx) -> tuple[Any, int]:
    tx, pos = _tx(c, 0)
    return {"tx": tx}, pos


def block_body(c: _Ctx) -> tuple[Any, int]:
    _HEADER(c.buf, 0)
    txs, pos = _txs(c, 80)
    # Core's parser prints only CBlock's own slot, "vtx" (see parser.structures.Block).
    return {"block": {"vtx": txs}}, pos


def headers_body(c: _Ctx) -> tuple[Any, int]:
    buf = c.buf
    n, pos = count(buf, 0, 81)
    out = []
    for _ in range(n):
        out.append(_header(c, pos))
        if buf[pos + 80] != 0:
            raise IndexError  # a transaction count other than zero
        pos += 81
    return {"headers": out}, pos


def cmpctblock_body(c: _Ctx) -> tuple[Any, int]:
    buf = c.buf
    header = _header(c, 0)
    nonce = _U64(buf, 80)[0]
    n, pos = count(buf, 88, 6)
    end = pos + 6 * n
    short_ids = [int.from_bytes(buf[p : p + 6], "little") for p in range(pos, end, 6)]
    n, pos = count(buf, end, 11)
    prefilled = []
    for _ in range(n):
        index = buf[pos]
        pos += 1
        if index >= 0xFD:
            index, pos = big_compact(buf, pos - 1)
        tx, pos = _tx(c, pos)
        prefilled.append({"index": index, "tx": tx})
    return {
        "header_and_shortids": {
            "header": header,
            "nonce": nonce,
            "prefilled_txn": prefilled,
            "prefilled_txn_length": len(prefilled),
            "shortids": short_ids,
            "shortids_length": len(short_ids),
        }
    }, pos


def blocktxn_body(c: _Ctx) -> tuple[Any, int]:
    if c.size < 32:
        raise IndexError
    txs, pos = _txs(c, 32)
    return {"block_transactions": {"blockhash": c.hash(0), "transactions": txs}}, pos


def _inv_body(key: str) -> Callable[[_Ctx], tuple[Any, int]]:
    def body(c: _Ctx) -> tuple[Any, int]:
        inv, pos = _inventory(c, 0)
        return {key: inv}, pos

    return body


FAST_BODIES: Final[dict[str, Callable[[_Ctx], tuple[Any, int]]]] = {
    "tx": tx_body,
    "block": block_body,
    "headers": headers_body,
    "cmpctblock": cmpctblock_body,
    "blocktxn": blocktxn_body,
    "inv": _inv_body("inv"),
    "getdata": _inv_body("inv"),
    "notfound": _inv_body("vec"),
}
"""Message types rendered by this module, with the function that renders each."""


def fast_body(msgtype: str, payload: bytes, reverse: bool) -> Any:
    """The JSON body of a ``FAST_BODIES`` message (a dict, or an ``orjson.Fragment`` of
    JSON text from the native renderer), or DecodeError."""
    if _native is not None:
        return orjson.Fragment(native_body(msgtype, payload, reverse))
    return python_body(msgtype, payload, reverse)


def native_body(msgtype: str, payload: bytes, reverse: bool) -> bytes:
    """JSON text from the native renderer; only call when :data:`NATIVE`."""
    assert _native is not None
    try:
        body = _native(msgtype, payload, reverse)
    except ValueError as e:  # args: the reason and the payload offset, as DecodeError's
        reason, offset = e.args
        raise DecodeError(msgtype, offset, reason) from None
    assert body is not None  # only some addrv2 and version payloads are left to Python
    return body


def python_body(msgtype: str, payload: bytes, reverse: bool) -> Any:
    """The body as a dict, from the Python renderer."""
    c = _Ctx(payload, reverse)
    try:
        body, pos = FAST_BODIES[msgtype](c)
    except (IndexError, struct.error, DecodeError):
        raise _rejection(msgtype, payload) from None
    if pos != len(payload):
        raise _rejection(msgtype, payload)
    return body


def _rejection(msgtype: str, payload: bytes) -> DecodeError:
    """The typed codec's error for a payload this renderer rejected: the same reason at
    the same offset whichever renderer runs."""
    from msgcap.parser.messages import decode_message  # only rejected payloads need it

    try:
        decode_message(msgtype, payload)
    except DecodeError as e:
        return e
    # The renderers disagree on this payload (the tests check they never do).
    return DecodeError(msgtype, len(payload), "rejected by the fast renderer only")
