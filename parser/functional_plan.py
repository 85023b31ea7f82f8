"""Reading a recorded connection as the plan of a Bitcoin Core functional test: what the
recorded peer sends unasked and when, what it answers, which requests of the node and
which tip the test expects (:func:`plan`). :mod:`msgcap.parser.functional_test` renders
the plan as the test file.

The peer's unasked messages are ordered by the node's requests that preceded them in the
recording, and by how much of the chain the peer had shown by then. Blocks the recorded
node had of its own (it sent them and had not received them) become ``submitblock``
steps where the node first sent them; compact blocks are rebuilt into whole blocks from
the recorded transactions their short ids name (BIP152). No I/O but reading the capture.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from msgcap.capture.conversation import DamageReport, conversation, warn_damage
from msgcap.capture.errors import MsgcapError
from msgcap.capture.records import Direction
from msgcap.parser import messages as m
from msgcap.parser.chain import (
    BLOCK_TYPES,
    HANDSHAKE,
    HeaderChain,
    block_family,
    leading_header,
    try_decode,
)
from msgcap.parser.structures import Block, BlockHeader, Transaction
from msgcap.parser.wire import display_hash


class ExportError(MsgcapError, ValueError):
    """The capture cannot become a functional test (no version of the peer, ...)."""


@dataclass(slots=True)
class Plan:
    """What the generated test does, read from the recording."""

    peer_version: m.Version
    peer_features: list[str]
    node_version: m.Version | None
    node_features: list[str]
    script: list[tuple[int, int, str, bytes]] = field(default_factory=list)
    """Unasked messages of the peer, each with how many expected requests precede it and
    how much of the chain the peer had shown by then (its height: headers, blocks and
    block announcements so far)."""
    getheaders_heights: list[int] = field(default_factory=list)
    """How far along the chain the peer's recorded answer to each getheaders went."""
    expected: list[str] = field(default_factory=list)
    """The node's requests the recording answers, in recorded order (``block HASH``,
    ``tx HASH`` as the node named them, hashes in RPC order)."""
    getheaders: int = 0
    """The node's getheaders the recording answers with headers."""
    blocks: dict[str, str] = field(default_factory=dict)
    cmpctblocks: dict[str, str] = field(default_factory=dict)
    txs: dict[str, str] = field(default_factory=dict)
    """By txid and by wtxid (RPC order), payload hex."""
    headers: dict[str, str] = field(default_factory=dict)
    blocktxn: dict[str, str] = field(default_factory=dict)
    notfound: list[str] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)
    """The recorded headers' best chain, hashes in RPC order, from its first block."""
    tip: str | None = None
    """The last block of that chain the peer delivered whole (block or compact block)."""


def plan(paths: Iterable[str | os.PathLike[str]], on_damage: DamageReport = warn_damage) -> Plan:
    """Read a recorded connection (a capture folder or its files) as a :class:`Plan`."""
    reading = _Reading()
    for item in conversation(paths, on_damage):
        if (kind := item.record.msgtype).valid:
            reading.step(item.direction, kind.label, bytes(item.record.payload))
    return reading.plan()


@dataclass(slots=True)
class _Moment:
    """A recorded moment the test reproduces, in recorded order: a message the peer sent
    unasked, a block of the node's own to submit (``submit``: its hash as RPC prints it),
    or recorded answers of the peer (``answered``: the requests they answered)."""

    msgtype: str = ""
    payload: bytes = b""
    submit: str | None = None
    answered: list[str] = field(default_factory=list)
    mark: int = 0
    """How many chain mentions preceded it, its own included."""


class _Reading:
    """The recording read message by message (:meth:`step`), then as a :class:`Plan`."""

    def __init__(self) -> None:
        self.peer_version: m.Version | None = None
        self.node_version: m.Version | None = None
        self.peer_features: list[str] = []
        self.node_features: list[str] = []
        self.peer_verack = self.node_verack = False
        self.open_items: dict[tuple[str, bytes], str] = {}
        """The node's getdata items not answered yet, and how the test names them."""
        self.open_getheaders = self.open_getblocktxn = 0
        self.moments: list[_Moment] = []
        self.block_headers: dict[bytes, BlockHeader] = {}
        """The headers of the blocks the peer sent."""
        self.all_headers: dict[bytes, BlockHeader] = {}
        self.delivered: set[bytes] = set()
        """The blocks the peer sent whole (block or compact block)."""
        self.own: dict[bytes, tuple[str, bytes]] = {}
        """Blocks of the node's own: sent by the node before the peer sent them."""
        self.own_headers: dict[bytes, BlockHeader] = {}
        self.recorded_txs: list[Transaction] = []
        self.stores: dict[str, dict[str, str]] = {
            "blocks": {},
            "cmpctblocks": {},
            "txs": {},
            "blocktxn": {},
        }
        """Recorded payloads by hash (RPC order), the first of each kept: the Plan's dicts."""
        self.notfound: list[str] = []
        self.mentions: list[bytes] = []
        """The peer's block hashes as it showed them: headers, blocks, announcements."""

    def step(self, direction: Direction, msgtype: str, payload: bytes) -> None:
        before = len(self.moments)
        if msgtype == "tx" and isinstance(tx_msg := try_decode(msgtype, payload), m.Tx):
            self.recorded_txs.append(tx_msg.tx)
        if direction is Direction.SENT:
            self._node(msgtype, payload)
        else:
            self._peer(msgtype, payload)
        for moment in self.moments[before:]:
            moment.mark = len(self.mentions)

    def _node(self, msgtype: str, payload: bytes) -> None:
        if msgtype == "version" and self.node_version is None:
            self.node_version = _decode_version(payload)
        elif msgtype == "verack":
            self.node_verack = True
        elif msgtype in HANDSHAKE and not self.node_verack and self.node_version is not None:
            self.node_features.append(msgtype)
        elif msgtype == "getdata":
            msg = try_decode(msgtype, payload)
            for item in getattr(msg, "inv", ()):
                family = block_family(item.type)
                if family is not None:
                    self.open_items[(family, item.hash)] = f"{family} {display_hash(item.hash)}"
        elif msgtype == "getheaders":
            self.open_getheaders += 1
        elif msgtype == "getblocktxn":
            self.open_getblocktxn += 1
        elif msgtype in ("block", "cmpctblock"):
            header = leading_header(payload)
            if header is None:
                return
            h = header.hash
            if h not in self.delivered and h not in self.own:
                # A block of the node's own (mined, or had before): the test gives it to
                # the fresh node with submitblock, where the node first sent it.
                self.own[h] = (msgtype, payload)
                self.own_headers[h] = header
                self.moments.append(_Moment(submit=display_hash(h)))

    def _peer(self, msgtype: str, payload: bytes) -> None:
        if msgtype == "version" and self.peer_version is None:
            self.peer_version = _decode_version(payload)
            return
        if msgtype == "verack":
            self.peer_verack = True
            return
        if msgtype in HANDSHAKE and not self.peer_verack:
            self.peer_features.append(msgtype)
            return
        if msgtype == "pong":  # answers the node's ping; the framework answers pings itself
            return
        answered: list[str] = []
        if msgtype in BLOCK_TYPES:
            header = leading_header(payload)
            if header is None:
                self.moments.append(_Moment(msgtype, payload))
                return
            answered = self._block(msgtype, payload, header)
        elif msgtype == "tx":
            msg = try_decode(msgtype, payload)
            if isinstance(msg, m.Tx):
                for h in (msg.tx.txid, msg.tx.wtxid):
                    self.stores["txs"].setdefault(display_hash(h), payload.hex())
                    key = self.open_items.pop(("tx", h), None)
                    if key is not None:
                        answered.append(key)
        elif msgtype == "headers":
            msg = try_decode(msgtype, payload)
            if isinstance(msg, m.Headers):
                for hd in msg.headers:
                    self.all_headers[hd.hash] = hd
                    self.mentions.append(hd.hash)
            if self.open_getheaders:
                self.open_getheaders -= 1
                answered.append("getheaders")
        elif msgtype == "notfound":
            msg = try_decode(msgtype, payload)
            for item in getattr(msg, "inv", ()):
                self.notfound.append(display_hash(item.hash))
                gone = self.open_items.pop((block_family(item.type) or "", item.hash), "")
                if gone:
                    answered.append("notfound")
        elif msgtype == "blocktxn":
            msg = try_decode(msgtype, payload)
            if isinstance(msg, m.BlockTxn):
                bh = display_hash(msg.block_transactions.block_hash)
                self.stores["blocktxn"].setdefault(bh, payload.hex())
            if self.open_getblocktxn:
                self.open_getblocktxn -= 1
                answered.append("blocktxn")
        if msgtype == "inv":
            items = getattr(try_decode(msgtype, payload), "inv", ())
            self.mentions += [i.hash for i in items if block_family(i.type) == "block"]
        if answered:
            self.moments.append(_Moment(answered=answered))
        else:
            self.moments.append(_Moment(msgtype, payload))

    def _block(self, msgtype: str, payload: bytes, header: BlockHeader) -> list[str]:
        """A block, compact block or merkleblock of the peer; the request it answered."""
        h = header.hash
        self.mentions.append(h)
        self.block_headers[h] = header
        self.all_headers[h] = header
        if msgtype != "merkleblock":
            self.delivered.add(h)
        store = {"block": "blocks", "cmpctblock": "cmpctblocks"}.get(msgtype)
        if store is not None:
            self.stores[store].setdefault(display_hash(h), payload.hex())
        key = self.open_items.pop(("block", h), None)
        return [] if key is None else [key]

    def plan(self) -> Plan:
        if self.peer_version is None:
            raise ExportError("the recorded peer (msgs_recv.dat) has no version message")
        out = Plan(self.peer_version, self.peer_features, self.node_version, self.node_features)
        stores = self.stores
        out.blocks, out.cmpctblocks = stores["blocks"], stores["cmpctblocks"]
        out.txs, out.blocktxn, out.notfound = stores["txs"], stores["blocktxn"], self.notfound
        chain = HeaderChain(self.all_headers.values()).blocks
        position = {h: i + 1 for i, h in enumerate(chain)}
        reach = [0]
        for h in self.mentions:
            reach.append(max(reach[-1], position.get(h, 0)))
        for moment in self.moments:
            height = reach[moment.mark]
            if moment.answered:
                for key in moment.answered:
                    if key == "getheaders":
                        out.getheaders += 1
                        out.getheaders_heights.append(height)
                    elif key.startswith(("block ", "tx ")):
                        out.expected.append(key)
            elif moment.submit is not None:
                out.script.append((len(out.expected), height, "submit", moment.submit.encode()))
            else:
                out.script.append((len(out.expected), height, moment.msgtype, moment.payload))
        for name, cmpct in list(out.cmpctblocks.items()):
            if name not in out.blocks:
                block = full_block(bytes.fromhex(cmpct), self.recorded_txs)
                if block is not None:
                    out.blocks[name] = block.hex()
        for h, hd in self.all_headers.items():
            out.headers[display_hash(h)] = hd.encode().hex()
        out.chain = [display_hash(h) for h in chain]
        unusable = set()
        for h, (msgtype, payload) in self.own.items():
            name = display_hash(h)
            block = payload if msgtype == "block" else full_block(payload, self.recorded_txs)
            if block is None:
                unusable.add(name)  # a compact block whose transactions were not recorded
            else:
                out.blocks.setdefault(name, block.hex())
        out.script = [s for s in out.script if s[2] != "submit" or s[3].decode() not in unusable]
        both = {**self.block_headers, **self.own_headers}
        kept = self.delivered | self.own.keys()
        on_chain = [h for h in HeaderChain(both.values()).blocks if h in kept]
        out.tip = display_hash(on_chain[-1]) if on_chain else None
        return out


def _siphash24(k0: int, k1: int, data: bytes) -> int:
    """SipHash-2-4 (BIP152 short ids)."""
    mask = (1 << 64) - 1

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & mask

    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & mask
            v1 = rotl(v1, 13) ^ v0
            v0 = rotl(v0, 32)
            v2 = (v2 + v3) & mask
            v3 = rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & mask
            v3 = rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & mask
            v1 = rotl(v1, 17) ^ v2
            v2 = rotl(v2, 32)

    tail = len(data) % 8
    for i in range(0, len(data) - tail, 8):
        word = int.from_bytes(data[i : i + 8], "little")
        v3 ^= word
        rounds(2)
        v0 ^= word
    last = ((len(data) & 0xFF) << 56) | int.from_bytes(data[len(data) - tail :], "little")
    v3 ^= last
    rounds(2)
    v0 ^= last
    v2 ^= 0xFF
    rounds(4)
    return v0 ^ v1 ^ v2 ^ v3


def full_block(payload: bytes, txs: Iterable[Transaction]) -> bytes | None:
    """The block a compact block stands for, from its prefilled transactions and the
    recorded transactions its short ids name (BIP152); None when one is not recorded."""
    msg = try_decode("cmpctblock", payload)
    if not isinstance(msg, m.CmpctBlock):
        return None
    cb = msg.header_and_shortids
    key = hashlib.sha256(cb.header.encode() + cb.nonce.to_bytes(8, "little")).digest()
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")
    by_id: dict[int, Transaction] = {}
    for tx in txs:
        by_id.setdefault(_siphash24(k0, k1, tx.wtxid) & 0xFFFFFFFFFFFF, tx)
    n = len(cb.short_ids) + len(cb.prefilled)
    slots: list[Transaction | None] = [None] * n
    at = -1
    for p in cb.prefilled:  # differentially encoded indexes
        at += p.index + 1
        if at >= n:
            return None
        slots[at] = p.tx
    ids = iter(cb.short_ids)
    for i in range(n):
        if slots[i] is None:
            found = by_id.get(next(ids))
            if found is None:
                return None
            slots[i] = found
    return Block(cb.header, tuple(t for t in slots if t is not None)).encode()


def _decode_version(payload: bytes) -> m.Version:
    msg = try_decode("version", payload)
    if not isinstance(msg, m.Version):
        raise ExportError("a recorded version message does not decode")
    return msg
