"""The sans-IO plan of a replay: one side of a recorded conversation read as what it
sends unasked and what it answers to which request (no asyncio, no sockets).

A capture folder holds both sides of a connection from the node's point of view:
``msgs_recv.dat`` is what the peer sent, ``msgs_sent.dat`` what the node sent. The
replayer plays one side (``peer`` by default when dialing a node, ``node`` when listening
for a client under test) and the live software is the other side.

Pacing follows causality, not message counts:

- the handshake: the recorded ``version`` with a fresh nonce and the current time (unless
  ``verbatim``), the recorded pre-verack feature messages, then ``verack``;
- a recorded message that answered a request (``headers`` a ``getheaders``, a ``block`` a
  ``getdata``, ...: :data:`ANSWERS`) is sent only when the live side makes the matching
  request, matched by content wherever it stands in the recording: the block asked for
  is the recorded block with that hash; ``headers`` and ``getblocks`` answers are cut
  from the chain the recorded headers form; live pings are answered with pongs;
- everything else the played side recorded (announcements, preferences, its own
  requests) is sent in recorded order right after the handshake, without waiting.

:class:`Recording` pairs each recorded answer with the request it answered and indexes
what the played side can answer; :class:`msgcap.proxy.replay_conversation.Conversation`
answers the live side from it, and :mod:`msgcap.proxy.replay` moves the bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from msgcap.capture.conversation import DamageReport, conversation, warn_damage
from msgcap.capture.errors import MsgcapError, UsageError
from msgcap.capture.framing import Message, hash256
from msgcap.capture.records import Direction
from msgcap.parser import messages as m
from msgcap.parser.chain import (
    BLOCK_TYPES,
    HANDSHAKE,
    HeaderChain,
    family,
    leading_header,
    try_decode,
)
from msgcap.parser.structures import MSG_WITNESS_FLAG, BlockHeader, InvType
from msgcap.parser.wire import display_hash

Side = Literal["peer", "node"]
"""Which recorded party the replayer plays: the peer said what the node received."""

SIDE_DIRECTION: dict[Side, Direction] = {"peer": Direction.RECV, "node": Direction.SENT}

ANSWERS: dict[str, frozenset[str]] = {
    "getheaders": frozenset({"headers"}),
    "getblocks": frozenset({"inv"}),
    "getdata": frozenset({"block", "tx", "merkleblock", "cmpctblock", "notfound"}),
    "getblocktxn": frozenset({"blocktxn"}),
    "ping": frozenset({"pong"}),
    "getaddr": frozenset({"addr", "addrv2"}),
    "mempool": frozenset({"inv"}),
    "getcfilters": frozenset({"cfilter"}),
    "getcfheaders": frozenset({"cfheaders"}),
    "getcfcheckpt": frozenset({"cfcheckpt"}),
}
"""Each request type and the types that answer it."""
ANSWER_TYPES = frozenset().union(*ANSWERS.values())
OPTIONAL_REQUESTS = frozenset({"ping", "getaddr"})
"""Requests a healthy node makes at other times or not at all: not making them is benign."""
BY_PAYLOAD = frozenset({"getaddr", "mempool", "getcfilters", "getcfheaders", "getcfcheckpt"})
"""Requests answered with the recorded answers to the same request, byte for byte."""

Content = tuple[str, bytes]
"""What an answer delivers, comparable between recorded and live: ``("block", hash)``,
``("header", hash)``, ``("tx", txid)``, ``("inv", hash)``, ... (hashes in wire order)."""


class ReplayError(MsgcapError):
    """The capture cannot be replayed (no version message on the played side, ...)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One recorded message."""

    time: int
    direction: Direction
    """From the recorded node's point of view: RECV was said by the peer."""
    msgtype: str
    payload: bytes

    @property
    def side(self) -> Side:
        return "peer" if self.direction is Direction.RECV else "node"


def load_conversation(
    paths: Iterable[str | os.PathLike[str]], on_damage: DamageReport = warn_damage
) -> list[Step]:
    """Both sides of a recorded connection in time order (the conversation reader's order).

    A path is a capture folder (its two files) or capture files. Records whose type is
    not a valid message type are left out (they were never messages); damage is reported
    through ``on_damage``.
    """
    try:
        items = list(conversation(paths, on_damage))
    except UsageError as e:
        raise ReplayError(str(e)) from e
    return [
        Step(item.record.time, item.direction, kind.label, item.record.payload)
        for item in items
        if (kind := item.record.msgtype).valid
    ]


# --- what messages deliver ---------------------------------------------------------------


def delivered(msgtype: str, payload: bytes) -> frozenset[Content]:
    """What an answer delivers (see :data:`Content`); addr and pong deliver nothing that
    is checked."""
    if msgtype in BLOCK_TYPES:
        kind = "merkleblock" if msgtype == "merkleblock" else "block"
        return frozenset({(kind, hash256(payload[:80]))})
    if msgtype in ("addr", "addrv2", "pong"):
        return frozenset()
    msg = try_decode(msgtype, payload)
    if isinstance(msg, m.Tx):
        return frozenset({("tx", msg.tx.txid)})
    if isinstance(msg, m.Headers):
        if not msg.headers:
            return frozenset({("headers", b"")})
        return frozenset(("header", h.hash) for h in msg.headers)
    if isinstance(msg, m.Inv | m.NotFound):
        return frozenset((msgtype, i.hash) for i in msg.inv)
    if isinstance(msg, m.BlockTxn):
        return frozenset({("blocktxn", msg.block_transactions.block_hash)})
    return frozenset({(msgtype, payload)})


def describe(msgtype: str, payload: bytes) -> str:
    """An answer in a few words, hashes as RPC shows them."""
    if msgtype in BLOCK_TYPES:
        return f"{msgtype} {display_hash(hash256(payload[:80]))}"
    msg = try_decode(msgtype, payload)
    if isinstance(msg, m.Tx):
        return f"tx {display_hash(msg.tx.txid)}"
    if isinstance(msg, m.Headers):
        if not msg.headers:
            return "empty headers"
        return f"{len(msg.headers)} headers from {display_hash(msg.headers[0].hash)}"
    if isinstance(msg, m.Inv | m.NotFound) and msg.inv:
        more = f" and {len(msg.inv) - 1} more" if len(msg.inv) > 1 else ""
        return f"{msgtype} of {msg.inv[0].describe()}{more}"
    if isinstance(msg, m.BlockTxn):
        return f"blocktxn {display_hash(msg.block_transactions.block_hash)}"
    return msgtype


# --- the recording, read as requests and answers -----------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """A recorded message of the played side that answered a request of the other side."""

    step: Step
    request: Step
    delivers: frozenset[Content]

    def describe(self) -> str:
        return f"{self.request.msgtype}: {describe(self.step.msgtype, self.step.payload)}"


@dataclass(eq=False, slots=True)
class _Request:
    """A recorded request of the other side while its answer is being looked for."""

    step: Step
    msg: Any
    open: set[tuple[str, bytes]]
    """getdata: the (family, hash) items not answered yet; others: one placeholder."""
    answers: list[Message] = field(default_factory=list)

    def take(self, msgtype: str, msg: Any, chain: HeaderChain) -> bool:
        """Whether the played side's ``msg`` answers this request (then it is noted). For
        the block types ``msg`` is only the block hash (a block is not decoded)."""
        req, kind = self.msg, self.step.msgtype
        if msgtype not in ANSWERS[kind] or not self.open:
            return False
        if kind == "getcfilters":  # one cfilter per block, up to the stop hash
            if msg.filter_type != req.filter_type:
                return False
            if msg.block_hash == req.stop_hash:
                self.open.clear()
            return True
        hit: set[tuple[str, bytes]] = set()
        if kind == "getdata":
            if msgtype in BLOCK_TYPES:
                hit = {("merkleblock" if msgtype == "merkleblock" else "block", msg)}
            elif isinstance(msg, m.Tx):
                hit = {("tx", msg.tx.txid), ("tx", msg.tx.wtxid)}
            elif isinstance(msg, m.NotFound):
                hit = {(f, i.hash) for i in msg.inv for f in ("block", "merkleblock", "tx")}
            hit &= self.open
        elif kind == "getheaders":
            if not msg.headers or msg.headers[0].prev_block in req.locator.hashes:
                hit = set(self.open)
        elif kind == "getblocks" or kind == "mempool":
            want = (
                (InvType.MSG_BLOCK,) if kind == "getblocks" else (InvType.MSG_TX, InvType.MSG_WTX)
            )
            items = msg.inv
            if items and all(i.type & ~MSG_WITNESS_FLAG in want for i in items):
                first = chain.by_hash.get(items[0].hash)
                if kind == "mempool" or first is None or first.prev_block in req.locator.hashes:
                    hit = set(self.open)
        elif kind == "getblocktxn":
            if msg.block_transactions.block_hash == req.block_txn_request.block_hash:
                hit = set(self.open)
        elif kind in ("getcfheaders", "getcfcheckpt"):
            if (msg.filter_type, msg.stop_hash) == (req.filter_type, req.stop_hash):
                hit = set(self.open)
        else:  # getaddr
            hit = set(self.open)
        if not hit:
            return False
        self.open -= hit
        return True


class Recording:
    """One side of a recorded conversation as the replayer plays it: its handshake, the
    messages it sends unasked (``script``), what it can answer (indexes and the header
    chain) and the recorded answers the live side is expected to ask for (``answers``)."""

    def __init__(self, steps: list[Step], play: Side) -> None:
        self.play = play
        played = SIDE_DIRECTION[play]
        mine = [s for s in steps if s.direction is played]
        self.theirs = [s for s in steps if s.direction is not played]
        """The other side's recorded messages."""
        version = next((s for s in mine if s.msgtype == "version"), None)
        if version is None:
            raise ReplayError(f"the recorded {play} side has no version message")
        self.version = version
        verack_at = next((s.time for s in mine if s.msgtype == "verack"), None)
        self.features = [
            s
            for s in mine
            if s.msgtype in HANDSHAKE - {"version", "verack"}
            and (verack_at is None or s.time < verack_at)
        ]
        """The recorded messages sent between ``version`` and ``verack``."""
        in_handshake = {id(version), *(id(s) for s in self.features)}
        if verack_at is not None:
            in_handshake |= {id(s) for s in mine if s.msgtype == "verack"}

        self.blocks: dict[bytes, bytes] = {}
        self.cmpctblocks: dict[bytes, bytes] = {}
        self.merkleblocks: dict[bytes, list[Message]] = {}
        self.txs: dict[bytes, bytes] = {}
        """By txid and by wtxid."""
        self.blocktxn: dict[bytes, bytes] = {}
        self.notfound: set[bytes] = set()
        headers: list[BlockHeader] = []
        for s in mine:
            self._index(s, headers)
        self.chain = HeaderChain(headers)
        self.by_request: dict[tuple[str, bytes], list[Message]] = {}
        """Recorded answers of requests matched by their exact payload (getaddr, mempool,
        the BIP157 requests)."""
        answers, answer_ids = self._pair(steps, played)
        self.answers = [a for a in answers if a.request.msgtype not in OPTIONAL_REQUESTS]
        """The recorded answers to requests the live side should make, in recorded order."""
        self.last = self.answers[-1] if self.answers else None
        self.played = [s for s in mine if id(s) not in in_handshake and s.msgtype != "pong"]
        """Everything played after the handshake (``fast`` sends it all at once)."""
        self.script = [s for s in self.played if id(s) not in answer_ids]
        """What is sent unasked, in recorded order."""

    def _index(self, s: Step, headers: list[BlockHeader]) -> None:
        if s.msgtype in BLOCK_TYPES:
            header = leading_header(s.payload)
            if header is None:
                return
            headers.append(header)
            h = header.hash
            if s.msgtype == "block":
                self.blocks.setdefault(h, s.payload)
            elif s.msgtype == "cmpctblock":
                self.cmpctblocks.setdefault(h, s.payload)
            else:
                self.merkleblocks.setdefault(h, [(s.msgtype, s.payload)])
            return
        msg = try_decode(s.msgtype, s.payload)
        if isinstance(msg, m.Headers):
            headers.extend(msg.headers)
        elif isinstance(msg, m.Tx):
            self.txs.setdefault(msg.tx.txid, s.payload)
            self.txs.setdefault(msg.tx.wtxid, s.payload)
        elif isinstance(msg, m.BlockTxn):
            self.blocktxn.setdefault(msg.block_transactions.block_hash, s.payload)
        elif isinstance(msg, m.NotFound):
            self.notfound.update(i.hash for i in msg.inv)

    def _pair(self, steps: list[Step], played: Direction) -> tuple[list[Answer], set[int]]:
        """Each recorded answer with the request it answered: the earliest open request
        of the other side that it matches by content."""
        requests: list[_Request] = []
        pending: list[_Request] = []
        answers: list[Answer] = []
        claimed: set[int] = set()
        merkle_txs: list[Message] | None = None  # a merkleblock answer's transactions
        for s in steps:
            if s.direction is not played:
                if s.msgtype in ANSWERS and s.msgtype != "ping":
                    request = try_decode(s.msgtype, s.payload)
                    if request is not None:
                        items = getattr(request, "inv", None) if s.msgtype == "getdata" else None
                        wanted: set[tuple[str, bytes]] = (
                            {(f, i.hash) for i in items if (f := family(i.type))}
                            if items is not None
                            else {("", b"")}
                        )
                        requests.append(_Request(s, request, wanted))
                        pending.append(requests[-1])
                continue
            if s.msgtype not in ANSWER_TYPES - {"pong"}:
                merkle_txs = None
                continue
            is_block = s.msgtype in BLOCK_TYPES
            msg: Any = hash256(s.payload[:80]) if is_block else try_decode(s.msgtype, s.payload)
            answered = None
            if msg is not None:
                answered = next((r for r in pending if r.take(s.msgtype, msg, self.chain)), None)
            if answered is not None:
                if not answered.open:
                    pending.remove(answered)
                answered.answers.append((s.msgtype, s.payload))
                answers.append(Answer(s, answered.step, delivered(s.msgtype, s.payload)))
                claimed.add(id(s))
                merkle_txs = None
                if s.msgtype == "merkleblock" and len(self.merkleblocks.get(msg, ())) == 1:
                    merkle_txs = self.merkleblocks[msg]  # the txs that follow belong to it
            elif s.msgtype == "tx" and merkle_txs is not None:
                merkle_txs.append((s.msgtype, s.payload))
                claimed.add(id(s))
            else:
                merkle_txs = None
        for r in requests:
            if r.answers and r.step.msgtype in BY_PAYLOAD:
                self.by_request.setdefault((r.step.msgtype, r.step.payload), r.answers)
        return answers, claimed
