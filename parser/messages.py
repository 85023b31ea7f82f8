"""One typed class per P2P message type, and the registry from type to class.

``decode_message(msgtype, payload)`` gives a message object or raises
:class:`~msgcap.parser.wire.DecodeError`; types not in :data:`MESSAGES` become a lossless
:class:`Unknown`. For every well-formed payload ``m.encode() == payload``.

Its length is that of one cohesive protocol: Bitcoin Core's set of P2P messages (the
``NetMsgType`` list), one small class of the same shape per type, in the families the
section rules mark. Split by family, each file would hold a handful of classes and all of
them would meet again in the registry at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Protocol, Self, TypeVar, cast

from msgcap.parser import wire
from msgcap.parser.structures import (
    AddressV1,
    AddressV2,
    Block,
    BlockHeader,
    BlockLocator,
    BlockTransactions,
    BlockTransactionsRequest,
    HeaderAndShortIDs,
    Inventory,
    JsonDict,
    MerkleBlock,
    Transaction,
    encode_list,
    read_inventory,
)
from msgcap.parser.wire import HashHex, Reader

M = TypeVar("M", bound="Message")


class Message(Protocol):
    msgtype: ClassVar[str]

    @classmethod
    def read(cls: type[M], r: Reader) -> M: ...

    def encode(self) -> bytes: ...

    def json(self, hx: HashHex) -> JsonDict: ...


class _Empty:
    """Base for messages without a payload."""

    __slots__ = ()
    msgtype: ClassVar[str]

    @classmethod
    def read(cls, r: Reader) -> Any:
        return cls()

    def encode(self) -> bytes:
        return b""

    def json(self, hx: HashHex) -> JsonDict:
        return {}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --- handshake and addresses -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Version:
    msgtype: ClassVar[str] = "version"

    version: int
    """nVersion"""
    services: int
    """nServices"""
    timestamp: int
    """nTime"""
    addr_recv: AddressV1
    """addrTo"""
    addr_from: AddressV1
    """addrFrom"""
    nonce: int
    """nNonce"""
    user_agent: str
    """strSubVer"""
    start_height: int
    """nStartingHeight"""
    relay: int | None
    """relay (absent before protocol 70001: None)"""

    @classmethod
    def read(cls, r: Reader) -> Version:
        version, services, timestamp = r.i32(), r.u64(), r.i64()
        addr_recv = AddressV1.read(r, with_time=False)
        addr_from = AddressV1.read(r, with_time=False)
        nonce = r.u64()
        start = r.pos
        try:
            user_agent = r.var_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise r.fail("user agent is not UTF-8", start) from e
        start_height = r.i32()
        relay = r.u8() if r.remaining() else None
        return cls(
            version,
            services,
            timestamp,
            addr_recv,
            addr_from,
            nonce,
            user_agent,
            start_height,
            relay,
        )

    def encode(self) -> bytes:
        return b"".join(
            (
                wire.i32(self.version),
                wire.u64(self.services),
                wire.i64(self.timestamp),
                self.addr_recv.encode(),
                self.addr_from.encode(),
                wire.u64(self.nonce),
                wire.var_bytes(self.user_agent.encode("utf-8")),
                wire.i32(self.start_height),
                b"" if self.relay is None else bytes((self.relay,)),
            )
        )

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "addrFrom": self.addr_from.json(hx),
            "addrTo": self.addr_recv.json(hx),
            "nNonce": self.nonce,
            "relay": 0 if self.relay is None else self.relay,
            "nServices": self.services,
            "nStartingHeight": self.start_height,
            "nTime": self.timestamp,
            "nVersion": self.version,
            "strSubVer": self.user_agent,
        }


class Verack(_Empty):
    msgtype: ClassVar[str] = "verack"


class WtxidRelay(_Empty):
    msgtype: ClassVar[str] = "wtxidrelay"


class SendAddrV2(_Empty):
    msgtype: ClassVar[str] = "sendaddrv2"


class SendHeaders(_Empty):
    msgtype: ClassVar[str] = "sendheaders"


class GetAddr(_Empty):
    msgtype: ClassVar[str] = "getaddr"


class MemPool(_Empty):
    msgtype: ClassVar[str] = "mempool"


class FilterClear(_Empty):
    msgtype: ClassVar[str] = "filterclear"


_A = TypeVar("_A", AddressV1, AddressV2)


@dataclass(frozen=True, slots=True)
class _AddrMessage(Generic[_A]):
    """What ``addr`` and ``addrv2`` share: one list of addresses, in the message's format."""

    msgtype: ClassVar[str]
    entry: ClassVar[Any]
    """The address class (its ``read`` and the fewest bytes one takes)."""
    entry_size: ClassVar[int]

    addrs: tuple[_A, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        n = r.count(cls.entry_size)
        return cls(tuple(cls.entry.read(r) for _ in range(n)))

    def encode(self) -> bytes:
        return encode_list(self.addrs)

    def json(self, hx: HashHex) -> JsonDict:
        return {"addrs": [a.json(hx) for a in self.addrs]}


class Addr(_AddrMessage[AddressV1]):
    __slots__ = ()
    msgtype: ClassVar[str] = "addr"
    entry: ClassVar[Any] = AddressV1
    entry_size: ClassVar[int] = 30


class AddrV2(_AddrMessage[AddressV2]):
    __slots__ = ()
    msgtype: ClassVar[str] = "addrv2"
    entry: ClassVar[Any] = AddressV2
    entry_size: ClassVar[int] = 9


# --- inventory ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InventoryMessage:
    """What ``inv``, ``getdata`` and ``notfound`` share: one list of inventory vectors.

    Each is a named subclass (so ``isinstance(msg, Inv)`` tells them apart) that only
    sets its wire name and the JSON key Core's parser prints the list under.
    """

    msgtype: ClassVar[str]
    json_key: ClassVar[str] = "inv"

    inv: tuple[Inventory, ...]

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(read_inventory(r))

    def encode(self) -> bytes:
        return encode_list(self.inv)

    def json(self, hx: HashHex) -> JsonDict:
        return {self.json_key: [i.json(hx) for i in self.inv]}


class Inv(InventoryMessage):
    __slots__ = ()
    msgtype: ClassVar[str] = "inv"


class GetData(InventoryMessage):
    __slots__ = ()
    msgtype: ClassVar[str] = "getdata"


class NotFound(InventoryMessage):
    """``inv`` is Core's ``vec``."""

    __slots__ = ()
    msgtype: ClassVar[str] = "notfound"
    json_key: ClassVar[str] = "vec"


# --- blocks and headers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LocatorMessage:
    """What ``getblocks`` and ``getheaders`` share: a block locator and a stop hash."""

    msgtype: ClassVar[str]

    locator: BlockLocator
    stop_hash: bytes
    """hashstop"""

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(BlockLocator.read(r), r.hash())

    def encode(self) -> bytes:
        return self.locator.encode() + self.stop_hash

    def json(self, hx: HashHex) -> JsonDict:
        return {"locator": self.locator.json(hx), "hashstop": hx(self.stop_hash)}


class GetBlocks(_LocatorMessage):
    __slots__ = ()
    msgtype: ClassVar[str] = "getblocks"


class GetHeaders(_LocatorMessage):
    __slots__ = ()
    msgtype: ClassVar[str] = "getheaders"

    def json(self, hx: HashHex) -> JsonDict:
        # Core's msg_getheaders lists its fields in this order (msg_getblocks the other).
        return {"hashstop": hx(self.stop_hash), "locator": self.locator.json(hx)}


@dataclass(frozen=True, slots=True)
class Headers:
    msgtype: ClassVar[str] = "headers"

    headers: tuple[BlockHeader, ...]

    @classmethod
    def read(cls, r: Reader) -> Headers:
        n = r.count(81)
        headers = []
        for _ in range(n):
            headers.append(BlockHeader.read(r))
            at = r.pos
            if r.compact_size() != 0:
                raise r.fail("header with a non-zero transaction count", at)
        return cls(tuple(headers))

    def encode(self) -> bytes:
        return wire.compact_size(len(self.headers)) + b"".join(
            h.encode() + b"\x00" for h in self.headers
        )

    def json(self, hx: HashHex) -> JsonDict:
        return {"headers": [h.json(hx) for h in self.headers]}


class _OneStructure:
    """A message that is one structure (``block`` is a :class:`Block`): read, encoded and
    shown as that structure, under the name of the message's one field (Core's)."""

    __slots__ = ()
    msgtype: ClassVar[str]
    structure: ClassVar[Any]
    """The structure's class (with ``read``, ``encode`` and ``json``)."""
    field: ClassVar[str]

    @classmethod
    def read(cls, r: Reader) -> Self:
        make: Any = cls
        return cast(Self, make(cls.structure.read(r)))

    def encode(self) -> bytes:
        return cast(bytes, getattr(self, self.field).encode())

    def json(self, hx: HashHex) -> JsonDict:
        return {self.field: getattr(self, self.field).json(hx)}


@dataclass(frozen=True, slots=True)
class BlockMsg(_OneStructure):
    """The ``block`` message (Core's msg_block)."""

    msgtype: ClassVar[str] = "block"
    structure: ClassVar[type[Block]] = Block
    field: ClassVar[str] = "block"

    block: Block


@dataclass(frozen=True, slots=True)
class Tx(_OneStructure):
    msgtype: ClassVar[str] = "tx"
    structure: ClassVar[type[Transaction]] = Transaction
    field: ClassVar[str] = "tx"

    tx: Transaction


@dataclass(frozen=True, slots=True)
class MerkleBlockMsg(_OneStructure):
    """The ``merkleblock`` message (Core's msg_merkleblock)."""

    msgtype: ClassVar[str] = "merkleblock"
    structure: ClassVar[type[MerkleBlock]] = MerkleBlock
    field: ClassVar[str] = "merkleblock"

    merkleblock: MerkleBlock


# --- compact blocks (BIP152) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendCmpct:
    msgtype: ClassVar[str] = "sendcmpct"

    announce: int
    """announce: a bool on the wire; the raw byte is kept so encoding is exact"""
    version: int

    @classmethod
    def read(cls, r: Reader) -> SendCmpct:
        return cls(r.u8(), r.u64())

    def encode(self) -> bytes:
        return bytes((self.announce,)) + wire.u64(self.version)

    def json(self, hx: HashHex) -> JsonDict:
        return {"announce": bool(self.announce), "version": self.version}


@dataclass(frozen=True, slots=True)
class CmpctBlock(_OneStructure):
    msgtype: ClassVar[str] = "cmpctblock"
    structure: ClassVar[type[HeaderAndShortIDs]] = HeaderAndShortIDs
    field: ClassVar[str] = "header_and_shortids"

    header_and_shortids: HeaderAndShortIDs


@dataclass(frozen=True, slots=True)
class GetBlockTxn(_OneStructure):
    msgtype: ClassVar[str] = "getblocktxn"
    structure: ClassVar[type[BlockTransactionsRequest]] = BlockTransactionsRequest
    field: ClassVar[str] = "block_txn_request"

    block_txn_request: BlockTransactionsRequest


@dataclass(frozen=True, slots=True)
class BlockTxn(_OneStructure):
    msgtype: ClassVar[str] = "blocktxn"
    structure: ClassVar[type[BlockTransactions]] = BlockTransactions
    field: ClassVar[str] = "block_transactions"

    block_transactions: BlockTransactions


# --- small control messages -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _NonceMessage:
    """What ``ping`` and ``pong`` share: one 64-bit nonce."""

    msgtype: ClassVar[str]

    nonce: int

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.u64())

    def encode(self) -> bytes:
        return wire.u64(self.nonce)

    def json(self, hx: HashHex) -> JsonDict:
        return {"nonce": self.nonce}


class Ping(_NonceMessage):
    __slots__ = ()
    msgtype: ClassVar[str] = "ping"


class Pong(_NonceMessage):
    __slots__ = ()
    msgtype: ClassVar[str] = "pong"


@dataclass(frozen=True, slots=True)
class FeeFilter:
    msgtype: ClassVar[str] = "feefilter"

    feerate: int
    """sat/kvB"""

    @classmethod
    def read(cls, r: Reader) -> FeeFilter:
        return cls(r.u64())

    def encode(self) -> bytes:
        return wire.u64(self.feerate)

    def json(self, hx: HashHex) -> JsonDict:
        return {"feerate": self.feerate}


@dataclass(frozen=True, slots=True)
class SendTxRcncl:
    """BIP330 Erlay announcement."""

    msgtype: ClassVar[str] = "sendtxrcncl"

    version: int
    salt: int

    @classmethod
    def read(cls, r: Reader) -> SendTxRcncl:
        return cls(r.u32(), r.u64())

    def encode(self) -> bytes:
        return wire.u32(self.version) + wire.u64(self.salt)

    def json(self, hx: HashHex) -> JsonDict:
        return {"version": self.version, "salt": self.salt}


# --- BIP37 bloom filters --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilterLoad:
    msgtype: ClassVar[str] = "filterload"

    data: bytes
    hash_funcs: int
    """nHashFuncs"""
    tweak: int
    """nTweak"""
    flags: int
    """nFlags"""

    @classmethod
    def read(cls, r: Reader) -> FilterLoad:
        return cls(r.var_bytes(), r.u32(), r.u32(), r.u8())

    def encode(self) -> bytes:
        return (
            wire.var_bytes(self.data)
            + wire.u32(self.hash_funcs)
            + wire.u32(self.tweak)
            + bytes((self.flags,))
        )

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "data": self.data.hex(),
            "nHashFuncs": self.hash_funcs,
            "nTweak": self.tweak,
            "nFlags": self.flags,
        }


@dataclass(frozen=True, slots=True)
class FilterAdd:
    msgtype: ClassVar[str] = "filteradd"

    data: bytes

    @classmethod
    def read(cls, r: Reader) -> FilterAdd:
        return cls(r.var_bytes())

    def encode(self) -> bytes:
        return wire.var_bytes(self.data)

    def json(self, hx: HashHex) -> JsonDict:
        # Core's parser prints {"d": null, "a": null, "t": null} here (its __slots__ is a
        # string); we print the data.
        return {"data": self.data.hex()}


# --- BIP157 compact block filters -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class _FilterRangeRequest:
    """What ``getcfilters`` and ``getcfheaders`` share: a filter type and a block range."""

    msgtype: ClassVar[str]

    filter_type: int
    start_height: int
    stop_hash: bytes

    @classmethod
    def read(cls, r: Reader) -> Self:
        return cls(r.u8(), r.u32(), r.hash())

    def encode(self) -> bytes:
        return bytes((self.filter_type,)) + wire.u32(self.start_height) + self.stop_hash

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "filter_type": self.filter_type,
            "start_height": self.start_height,
            "stop_hash": hx(self.stop_hash),
        }


class GetCFilters(_FilterRangeRequest):
    __slots__ = ()
    msgtype: ClassVar[str] = "getcfilters"


@dataclass(frozen=True, slots=True)
class CFilter:
    msgtype: ClassVar[str] = "cfilter"

    filter_type: int
    block_hash: bytes
    filter_data: bytes

    @classmethod
    def read(cls, r: Reader) -> CFilter:
        return cls(r.u8(), r.hash(), r.var_bytes())

    def encode(self) -> bytes:
        return bytes((self.filter_type,)) + self.block_hash + wire.var_bytes(self.filter_data)

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "filter_type": self.filter_type,
            "block_hash": hx(self.block_hash),
            "filter_data": self.filter_data.hex(),
        }


class GetCFHeaders(_FilterRangeRequest):
    __slots__ = ()
    msgtype: ClassVar[str] = "getcfheaders"


@dataclass(frozen=True, slots=True)
class CFHeaders:
    msgtype: ClassVar[str] = "cfheaders"

    filter_type: int
    stop_hash: bytes
    prev_header: bytes
    hashes: tuple[bytes, ...]
    """filter hashes"""

    @classmethod
    def read(cls, r: Reader) -> CFHeaders:
        return cls(r.u8(), r.hash(), r.hash(), r.hashes())

    def encode(self) -> bytes:
        return (
            bytes((self.filter_type,))
            + self.stop_hash
            + self.prev_header
            + wire.hashes(self.hashes)
        )

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "filter_type": self.filter_type,
            "stop_hash": hx(self.stop_hash),
            "prev_header": hx(self.prev_header),
            "hashes": [hx(h) for h in self.hashes],
        }


@dataclass(frozen=True, slots=True)
class GetCFCheckpt:
    msgtype: ClassVar[str] = "getcfcheckpt"

    filter_type: int
    stop_hash: bytes

    @classmethod
    def read(cls, r: Reader) -> GetCFCheckpt:
        return cls(r.u8(), r.hash())

    def encode(self) -> bytes:
        return bytes((self.filter_type,)) + self.stop_hash

    def json(self, hx: HashHex) -> JsonDict:
        return {"filter_type": self.filter_type, "stop_hash": hx(self.stop_hash)}


@dataclass(frozen=True, slots=True)
class CFCheckpt:
    msgtype: ClassVar[str] = "cfcheckpt"

    filter_type: int
    stop_hash: bytes
    headers: tuple[bytes, ...]
    """filter headers"""

    @classmethod
    def read(cls, r: Reader) -> CFCheckpt:
        return cls(r.u8(), r.hash(), r.hashes())

    def encode(self) -> bytes:
        return bytes((self.filter_type,)) + self.stop_hash + wire.hashes(self.headers)

    def json(self, hx: HashHex) -> JsonDict:
        return {
            "filter_type": self.filter_type,
            "stop_hash": hx(self.stop_hash),
            "headers": [hx(h) for h in self.headers],
        }


# --- registry ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unknown:
    """Any message type not in :data:`MESSAGES`, kept losslessly."""

    command: str
    payload: bytes

    @property
    def msgtype(self) -> str:
        return self.command

    def encode(self) -> bytes:
        return self.payload


MESSAGES: Final[dict[str, type[Message]]] = {
    "addr": Addr,
    "addrv2": AddrV2,
    "block": BlockMsg,
    "blocktxn": BlockTxn,
    "cfcheckpt": CFCheckpt,
    "cfheaders": CFHeaders,
    "cfilter": CFilter,
    "cmpctblock": CmpctBlock,
    "feefilter": FeeFilter,
    "filteradd": FilterAdd,
    "filterclear": FilterClear,
    "filterload": FilterLoad,
    "getaddr": GetAddr,
    "getblocks": GetBlocks,
    "getblocktxn": GetBlockTxn,
    "getcfcheckpt": GetCFCheckpt,
    "getcfheaders": GetCFHeaders,
    "getcfilters": GetCFilters,
    "getdata": GetData,
    "getheaders": GetHeaders,
    "headers": Headers,
    "inv": Inv,
    "mempool": MemPool,
    "merkleblock": MerkleBlockMsg,
    "notfound": NotFound,
    "ping": Ping,
    "pong": Pong,
    "sendaddrv2": SendAddrV2,
    "sendcmpct": SendCmpct,
    "sendheaders": SendHeaders,
    "sendtxrcncl": SendTxRcncl,
    "tx": Tx,
    "verack": Verack,
    "version": Version,
    "wtxidrelay": WtxidRelay,
}
"""A class for each of :data:`~msgcap.capture.framing.KNOWN_MSGTYPES`, by wire name."""


def decode_message(msgtype: str, payload: bytes) -> Message | Unknown:
    """Decode one payload. Unknown types give :class:`Unknown`; bad payloads raise
    :class:`~msgcap.parser.wire.DecodeError`."""
    cls = MESSAGES.get(msgtype)
    if cls is None:
        return Unknown(msgtype, payload)
    r = Reader(payload, msgtype)
    msg = cls.read(r)
    r.finish()
    return msg
