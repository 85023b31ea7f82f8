"""Typed building blocks of P2P messages: addresses, inventory, transactions, blocks.

Every class is a frozen, slotted dataclass with ``read(Reader)`` (decode from a cursor),
``encode()`` (the exact wire bytes) and ``json(hx)`` (the object as Core's
message-capture-parser renders it: the field names and order of Core's test framework
classes, with hashes rendered by ``hx``). Field names are ours, in snake_case; the
docstrings give Core's name where it differs. A transaction's parts (outpoint, input,
output) are cut out by :meth:`Transaction.read`, where the one transaction walk marks
them, so they have no ``read`` of their own.
"""

from __future__ import annotations

import enum
import hashlib
import socket
import struct
from base64 import b32encode
from dataclasses import dataclass
from typing import Any, Final

from msgcap.capture.framing import hash256
from msgcap.parser import wire
from msgcap.parser.txwalk import walk_tx
from msgcap.parser.wire import HashHex, Reader

JsonDict = dict[str, Any]


class Net:
    """BIP155 network ids."""

    IPV4: Final = 1
    IPV6: Final = 2
    TORV3: Final = 4
    I2P: Final = 5
    CJDNS: Final = 6


ADDRV2_LENGTHS: Final[dict[int, int]] = {
    Net.IPV4: 4,
    Net.IPV6: 16,
    Net.TORV3: 32,
    Net.I2P: 32,
    Net.CJDNS: 16,
}

_IPV4_MAPPED_PREFIX: Final = b"\0" * 10 + b"\xff\xff"


def _torv3_name(pubkey: bytes) -> str:
    version = b"\x03"
    check = hashlib.sha3_256(b".onion checksum" + pubkey + version).digest()[:2]
    return b32encode(pubkey + check + version).decode("ascii").lower() + ".onion"


def addr_text(net: int, addr: bytes) -> str:
    """The textual form of a BIP155 address."""
    if net == Net.IPV4:
        return socket.inet_ntoa(addr)
    if net in (Net.IPV6, Net.CJDNS):
        # inet_ntop, as Core's test framework: it writes IPv4-mapped addresses dotted.
        return socket.inet_ntop(socket.AF_INET6, addr)
    if net == Net.TORV3:
        return _torv3_name(addr)
    if net == Net.I2P:
        return b32encode(addr).decode("ascii").rstrip("=").lower() + ".b32.i2p"
    raise ValueError(f"unknown BIP155 network {net}")


@dataclass(frozen=True, slots=True)
class AddressV1:
    """A pre-BIP155 network address (Core's CAddress in ``addr`` and ``version``).

    ``time`` is None inside ``version``, which serializes addresses without it.
    """

    time: int | None
    services: int
    """nServices"""
    ip: bytes
    """16 bytes: IPv6, or IPv4 mapped into IPv6."""
    port: int

    @classmethod
    def read(cls, r: Reader, with_time: bool = True) -> AddressV1:
        time = r.u32() if with_time else None
        return cls(time, r.u64(), r.read(16), r.u16be())

    def encode(self) -> bytes:
        head = b"" if self.time is None else wire.u32(self.time)
        return head + wire.u64(self.services) + self.ip + self.port.to_bytes(2, "big")

    @property
    def host(self) -> str:
        if self.ip.startswith(_IPV4_MAPPED_PREFIX):
            return socket.inet_ntoa(self.ip[12:])
        return socket.inet_ntop(socket.AF_INET6, self.ip)

    def json(self, hx: HashHex) -> JsonDict:
        # Core's test framework reads only the last 4 bytes, as IPv4, whatever they hold.
        return {
            "net": Net.IPV4,
            "ip": socket.inet_ntoa(self.ip[12:]),
            "nServices": self.services,
            "port": self.port,
            "time": 0 if self.time is None else self.time,
        }


@dataclass(frozen=True, slots=True)
class AddressV2:
    """A BIP155 address (``addrv2``): IPv4, IPv6, TorV3, I2P or CJDNS."""

    time: int
    services: int
    """nServices (a CompactSize in addrv2)"""
    net: int
    addr: bytes
    port: int

    @classmethod
    def read(cls, r: Reader) -> AddressV2:
        time = r.u32()
        services = r.compact_size()
        start = r.pos
        net = r.u8()
        length = r.compact_size()
        if ADDRV2_LENGTHS.get(net) != length:
            raise r.fail(f"unsupported BIP155 network {net} with address length {length}", start)
        return cls(time, services, net, r.read(length), r.u16be())

    def encode(self) -> bytes:
        return b"".join(
            (
                wire.u32(self.time),
                wire.compact_size(self.services),
                bytes((self.net,)),
                wire.var_bytes(self.addr),
                self.port.to_bytes(2, "big"),
            )
        )

    @property
    def host(self) -> str:
        return addr_text(self.net, self.addr)

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "net": self.net,
            "ip": self.host,
            "nServices": self.services,
            "port": self.port,
            "time": self.time,
        }


MSG_WITNESS_FLAG: Final = 1 << 30
"""Set on an inventory type to ask for the witness serialization (protocol.h)."""


class InvType(enum.IntEnum):
    """CInv.type: Bitcoin Core's ``GetDataMsg`` (protocol.h), by Core's names."""

    UNDEFINED = 0
    MSG_TX = 1
    MSG_BLOCK = 2
    MSG_FILTERED_BLOCK = 3
    MSG_CMPCT_BLOCK = 4
    MSG_WTX = 5
    MSG_WITNESS_TX = 0x40000001
    MSG_WITNESS_BLOCK = 0x40000002
    MSG_FILTERED_WITNESS_BLOCK = 0x40000003

    @classmethod
    def name_of(cls, value: int) -> str:
        """Core's name for ``value`` (``MSG_WITNESS_TX``), or ``0x%08x`` for any other."""
        try:
            return cls(value).name
        except ValueError:
            return f"0x{value:08x}"

    @classmethod
    def base(cls, value: int) -> InvType | None:
        """The type ``value`` names without the witness flag, if it is one of Core's."""
        try:
            return cls(value & ~MSG_WITNESS_FLAG)
        except ValueError:
            return None


_ITEM_WORDS: Final = {
    InvType.MSG_BLOCK: "block",
    InvType.MSG_CMPCT_BLOCK: "cmpctblock",
    InvType.MSG_FILTERED_BLOCK: "filtered block",
    InvType.MSG_TX: "tx",
    InvType.MSG_WTX: "wtx",
}


@dataclass(frozen=True, slots=True)
class Inventory:
    """CInv"""

    type: int
    hash: bytes

    @classmethod
    def read(cls, r: Reader) -> Inventory:
        return cls(r.u32(), r.hash())

    def encode(self) -> bytes:
        return wire.u32(self.type) + self.hash

    def json(self, hx: HashHex) -> JsonDict:
        return {"hash": hx(self.hash), "type": self.type}

    def describe(self) -> str:
        """``block 0f91…`` (the hash as RPC prints it); ``type 7 …`` for an unknown type."""
        base = InvType.base(self.type)
        word = _ITEM_WORDS.get(base) if base is not None else None
        return f"{word or f'type {self.type}'} {wire.display_hash(self.hash)}"


def read_inventory(r: Reader) -> tuple[Inventory, ...]:
    n = r.count(36)
    return tuple(Inventory.read(r) for _ in range(n))


def encode_list(items: tuple[Any, ...]) -> bytes:
    return wire.compact_size(len(items)) + b"".join(i.encode() for i in items)


@dataclass(frozen=True, slots=True)
class BlockLocator:
    """CBlockLocator"""

    version: int
    """nVersion (ignored by Core; Core's test framework does not read it)"""
    hashes: tuple[bytes, ...]
    """vHave"""

    @classmethod
    def read(cls, r: Reader) -> BlockLocator:
        return cls(r.i32(), r.hashes())

    def encode(self) -> bytes:
        return wire.i32(self.version) + wire.hashes(self.hashes)

    def json(self, hx: HashHex) -> JsonDict:
        return {"nVersion": self.version, "vHave": [hx(h) for h in self.hashes]}


@dataclass(frozen=True, slots=True)
class OutPoint:
    """COutPoint"""

    hash: bytes
    index: int
    """n"""

    def json(self, hx: HashHex) -> JsonDict:
        return {"hash": hx(self.hash), "n": self.index}


@dataclass(frozen=True, slots=True)
class TxIn:
    """CTxIn"""

    prevout: OutPoint
    script_sig: bytes
    """scriptSig"""
    sequence: int
    """nSequence"""

    def encode(self) -> bytes:
        return b"".join(
            (
                self.prevout.hash,
                wire.u32(self.prevout.index),
                wire.var_bytes(self.script_sig),
                wire.u32(self.sequence),
            )
        )

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "nSequence": self.sequence,
            "prevout": {"hash": hx(self.prevout.hash), "n": self.prevout.index},
            "scriptSig": self.script_sig.hex(),
        }


@dataclass(frozen=True, slots=True)
class TxOut:
    """CTxOut"""

    value: int
    """nValue (satoshis)"""
    script_pubkey: bytes
    """scriptPubKey"""

    def encode(self) -> bytes:
        return wire.i64(self.value) + wire.var_bytes(self.script_pubkey)

    def json(self, hx: HashHex) -> JsonDict:
        return {"nValue": self.value, "scriptPubKey": self.script_pubkey.hex()}


_U32: Final = struct.Struct("<I").unpack_from
_I64: Final = struct.Struct("<q").unpack_from


@dataclass(frozen=True, slots=True)
class Transaction:
    """CTransaction, legacy or segwit (BIP144).

    ``flags`` is the byte after the segwit marker, 0 for a legacy serialization; with
    it the encoding reproduces the input exactly.
    """

    version: int
    inputs: tuple[TxIn, ...]
    """vin"""
    outputs: tuple[TxOut, ...]
    """vout"""
    witnesses: tuple[tuple[bytes, ...], ...]
    """wit: one stack per input when flags != 0, else empty"""
    lock_time: int
    """nLockTime"""
    flags: int = 0

    @classmethod
    def read(cls, r: Reader) -> Transaction:
        # The one transaction walk (parser/txwalk.py) says where the parts are; the
        # objects are cut out there.
        buf, start = r.buf, r.pos
        m: list[int] = []
        end, flags, _, _, n_in, n_out = walk_tx(buf, start, r.msgtype, m)
        inputs = tuple(
            TxIn(
                OutPoint(buf[m[i] : m[i] + 32], _U32(buf, m[i] + 32)[0]),
                buf[m[i + 1] : m[i + 2]],
                _U32(buf, m[i + 2])[0],
            )
            for i in range(0, 3 * n_in, 3)
        )
        outputs = tuple(
            TxOut(_I64(buf, m[i])[0], buf[m[i + 1] : m[i + 2]])
            for i in range(3 * n_in, 3 * (n_in + n_out), 3)
        )
        stacks = []
        i = 3 * (n_in + n_out)
        for _ in range(n_in if flags else 0):
            j = i + 1 + 2 * m[i]
            stacks.append(tuple(buf[m[k] : m[k + 1]] for k in range(i + 1, j, 2)))
            i = j
        r.pos = end
        return cls(
            _U32(buf, start)[0], inputs, outputs, tuple(stacks), _U32(buf, end - 4)[0], flags
        )

    def encode(self, with_witness: bool = True) -> bytes:
        parts = [wire.u32(self.version)]
        segwit = with_witness and self.flags
        if segwit:
            parts.append(b"\x00" + bytes((self.flags,)))
        parts.append(encode_list(self.inputs))
        parts.append(encode_list(self.outputs))
        if segwit:
            for stack in self.witnesses:
                parts.append(wire.compact_size(len(stack)))
                parts.extend(wire.var_bytes(item) for item in stack)
        parts.append(wire.u32(self.lock_time))
        return b"".join(parts)

    @property
    def txid(self) -> bytes:
        """The transaction id in wire order (hash of the serialization without witness)."""
        return hash256(self.encode(with_witness=False))

    @property
    def wtxid(self) -> bytes:
        return hash256(self.encode())

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "nLockTime": self.lock_time,
            "version": self.version,
            "vin": [i.json(hx) for i in self.inputs],
            "vout": [
                {"nValue": o.value, "scriptPubKey": o.script_pubkey.hex()} for o in self.outputs
            ],
            "wit": {
                "vtxinwit": [
                    {"scriptWitness": {"stack": [item.hex() for item in stack]}}
                    for stack in self.witnesses
                ]
            },
        }


def read_transactions(r: Reader) -> tuple[Transaction, ...]:
    n = r.count(10)
    return tuple(Transaction.read(r) for _ in range(n))


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """CBlockHeader"""

    version: int
    """nVersion"""
    prev_block: bytes
    """hashPrevBlock"""
    merkle_root: bytes
    """hashMerkleRoot"""
    time: int
    """nTime"""
    bits: int
    """nBits"""
    nonce: int
    """nNonce"""

    @classmethod
    def read(cls, r: Reader) -> BlockHeader:
        return cls(r.i32(), r.hash(), r.hash(), r.u32(), r.u32(), r.u32())

    def encode(self) -> bytes:
        return b"".join(
            (
                wire.i32(self.version),
                self.prev_block,
                self.merkle_root,
                wire.u32(self.time),
                wire.u32(self.bits),
                wire.u32(self.nonce),
            )
        )

    @property
    def hash(self) -> bytes:
        """The block hash in wire order."""
        return hash256(self.encode())

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "hashMerkleRoot": hx(self.merkle_root),
            "hashPrevBlock": hx(self.prev_block),
            "nBits": self.bits,
            "nNonce": self.nonce,
            "nTime": self.time,
            "nVersion": self.version,
        }


@dataclass(frozen=True, slots=True)
class Block:
    """CBlock"""

    header: BlockHeader
    transactions: tuple[Transaction, ...]
    """vtx"""

    @classmethod
    def read(cls, r: Reader) -> Block:
        return cls(BlockHeader.read(r), read_transactions(r))

    def encode(self) -> bytes:
        return self.header.encode() + encode_list(self.transactions)

    @property
    def hash(self) -> bytes:
        return self.header.hash

    def json(self, hx: HashHex) -> JsonDict:
        # Core's parser walks CBlock's own __slots__, ("vtx",): the header fields are not
        # in its output, so they are not in ours.
        return {"vtx": [tx.json(hx) for tx in self.transactions]}


@dataclass(frozen=True, slots=True)
class PrefilledTransaction:
    index: int
    """Differentially encoded index, as on the wire."""
    tx: Transaction

    @classmethod
    def read(cls, r: Reader) -> PrefilledTransaction:
        return cls(r.compact_size(), Transaction.read(r))

    def encode(self) -> bytes:
        return wire.compact_size(self.index) + self.tx.encode()

    def json(self, hx: HashHex) -> JsonDict:
        return {"index": self.index, "tx": self.tx.json(hx)}


@dataclass(frozen=True, slots=True)
class HeaderAndShortIDs:
    """BIP152 compact block as sent on the wire (Core's P2PHeaderAndShortIDs)."""

    header: BlockHeader
    nonce: int
    short_ids: tuple[int, ...]
    """shortids: 6-byte little-endian integers"""
    prefilled: tuple[PrefilledTransaction, ...]
    """prefilled_txn"""

    @classmethod
    def read(cls, r: Reader) -> HeaderAndShortIDs:
        header = BlockHeader.read(r)
        nonce = r.u64()
        n = r.count(6)
        raw = r.read(6 * n)
        short_ids = tuple(int.from_bytes(raw[i : i + 6], "little") for i in range(0, 6 * n, 6))
        prefilled = tuple(PrefilledTransaction.read(r) for _ in range(r.count(11)))
        return cls(header, nonce, short_ids, prefilled)

    def encode(self) -> bytes:
        return b"".join(
            (
                self.header.encode(),
                wire.u64(self.nonce),
                wire.compact_size(len(self.short_ids)),
                b"".join(s.to_bytes(6, "little") for s in self.short_ids),
                encode_list(self.prefilled),
            )
        )

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "header": self.header.json(hx),
            "nonce": self.nonce,
            "prefilled_txn": [p.json(hx) for p in self.prefilled],
            "prefilled_txn_length": len(self.prefilled),
            "shortids": list(self.short_ids),
            "shortids_length": len(self.short_ids),
        }


@dataclass(frozen=True, slots=True)
class BlockTransactionsRequest:
    block_hash: bytes
    """blockhash"""
    indexes: tuple[int, ...]
    """Differentially encoded, as on the wire."""

    @classmethod
    def read(cls, r: Reader) -> BlockTransactionsRequest:
        block_hash = r.hash()
        n = r.count(1)
        return cls(block_hash, tuple(r.compact_size() for _ in range(n)))

    def encode(self) -> bytes:
        return (
            self.block_hash
            + wire.compact_size(len(self.indexes))
            + b"".join(wire.compact_size(i) for i in self.indexes)
        )

    def json(self, hx: HashHex) -> JsonDict:
        return {"blockhash": hx(self.block_hash), "indexes": list(self.indexes)}


@dataclass(frozen=True, slots=True)
class BlockTransactions:
    block_hash: bytes
    """blockhash"""
    transactions: tuple[Transaction, ...]

    @classmethod
    def read(cls, r: Reader) -> BlockTransactions:
        return cls(r.hash(), read_transactions(r))

    def encode(self) -> bytes:
        return self.block_hash + encode_list(self.transactions)

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "blockhash": hx(self.block_hash),
            "transactions": [tx.json(hx) for tx in self.transactions],
        }


@dataclass(frozen=True, slots=True)
class PartialMerkleTree:
    """CPartialMerkleTree"""

    total: int
    """nTransactions"""
    hashes: tuple[bytes, ...]
    """vHash"""
    flag_bytes: bytes
    """vBits, packed as on the wire (least significant bit first)"""

    @classmethod
    def read(cls, r: Reader) -> PartialMerkleTree:
        return cls(r.u32(), r.hashes(), r.var_bytes())

    def encode(self) -> bytes:
        return wire.u32(self.total) + wire.hashes(self.hashes) + wire.var_bytes(self.flag_bytes)

    @property
    def bits(self) -> list[bool]:
        return [bool(b >> i & 1) for b in self.flag_bytes for i in range(8)]

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "nTransactions": self.total,
            "vBits": self.bits,
            "vHash": [hx(h) for h in self.hashes],
        }


@dataclass(frozen=True, slots=True)
class MerkleBlock:
    """CMerkleBlock"""

    header: BlockHeader
    txn: PartialMerkleTree

    @classmethod
    def read(cls, r: Reader) -> MerkleBlock:
        return cls(BlockHeader.read(r), PartialMerkleTree.read(r))

    def encode(self) -> bytes:
        return self.header.encode() + self.txn.encode()

    def json(self, hx: HashHex) -> JsonDict:
        return {"header": self.header.json(hx), "txn": self.txn.json(hx)}
