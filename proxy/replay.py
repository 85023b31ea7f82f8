"""Replay one side of a recorded conversation against live software.

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

The end: once the live side has answered a ping of ours without making a new request in
the meantime it has processed everything we sent (a node handles one peer's messages in
order) and has nothing more to ask. The replay ends there if the live side has made the
recording's last answered request, else after ``timeout`` seconds without a new request.
A request the recording cannot answer ends it at most ``timeout`` seconds later.

The report separates substantive divergence (the live side asked for what the recording
does not hold, never made a request the recording answers, disconnected or misbehaved)
from benign divergence (unsolicited messages missing, extra or reordered).

:class:`Recording` and :class:`Conversation` decide (no I/O); :class:`Replayer` moves the
bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import enum
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from msgcap.capture.bip324 import V2Error, V2Session
from msgcap.capture.conversation import DamageReport, conversation, warn_damage
from msgcap.capture.errors import MsgcapError, UsageError, describe_exception
from msgcap.capture.framing import StreamError, hash256, v1_version_prefix
from msgcap.capture.records import Direction
from msgcap.parser import messages as m
from msgcap.parser.structures import (
    MSG_WITNESS_FLAG,
    Block,
    BlockHeader,
    BlockTransactions,
    Inventory,
    InvType,
    Transaction,
)
from msgcap.parser.wire import DecodeError, Reader, display_hash
from msgcap.proxy.v2 import Leg, Message, V1Leg, V2Leg, handshake

Transport = Literal["v1", "v2"]
"""What the replayer speaks when it dials (``--transport``); listening, it takes either."""

Side = Literal["peer", "node"]
"""Which recorded party the replayer plays: the peer said what the node received."""

SIDE_DIRECTION: dict[Side, Direction] = {"peer": Direction.RECV, "node": Direction.SENT}

HANDSHAKE = frozenset({"version", "verack", "wtxidrelay", "sendaddrv2", "sendtxrcncl"})
"""Types exchanged before ``verack``; the replayer's own handshake takes care of them."""

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
BLOCK_TYPES = frozenset({"block", "cmpctblock", "merkleblock"})
"""Answers that start with an 80-byte block header."""

OPTIONAL_REQUESTS = frozenset({"ping", "getaddr"})
"""Requests a healthy node makes at other times or not at all: not making them is benign."""
SILENCE_ANSWERS = frozenset({"getaddr", "mempool"})
"""Requests that an empty answer (no message at all) answers."""
BY_PAYLOAD = frozenset({"getaddr", "mempool", "getcfilters", "getcfheaders", "getcfcheckpt"})
"""Requests answered with the recorded answers to the same request, byte for byte."""
NOT_BENIGN = frozenset({"version", "verack", "ping", "pong"}) | (ANSWERS.keys() - OPTIONAL_REQUESTS)
"""Types left out of the benign comparison: the handshake, timing, and the requests that
are checked one by one."""

MAX_HEADERS = 2000
"""Headers in one answer to ``getheaders`` (Core's MAX_HEADERS_RESULTS)."""
MAX_BLOCKS_INV = 500
"""Block hashes in one answer to ``getblocks`` (Core's limit)."""

Content = tuple[str, bytes]
"""What an answer delivers, comparable between recorded and live: ``("block", hash)``,
``("header", hash)``, ``("tx", txid)``, ``("inv", hash)``, ... (hashes in wire order)."""


class ReplayError(MsgcapError):
    """The capture cannot be replayed (no version message on the played side, ...)."""


class ReplayFailed(MsgcapError):
    """The replayer itself failed: an exception of ours (not something the live side
    did) while it set up, read or played a connection, or one that asyncio reported to the
    event loop. Such a replay proves nothing: no report is returned, the command exits 1
    with this reason."""


class _LoopFailures:
    """While a replay runs, exceptions asyncio hands to the loop's exception handler (a
    callback that raised, a task nobody awaited) fail the replay instead of being logged
    and forgotten; other reports go to the handler that was there before."""

    def __init__(self, on_failure: Callable[[str], None]) -> None:
        self.on_failure = on_failure
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def __enter__(self) -> _LoopFailures:
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.set_exception_handler(self._previous)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, Exception):
            self.on_failure(f"{context.get('message', 'asyncio')}: {describe_exception(error)}")
        elif self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


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


def _header(payload: bytes) -> BlockHeader | None:
    """The 80-byte header a block, cmpctblock or merkleblock payload starts with."""
    try:
        return BlockHeader.read(Reader(payload[:80], "header"))
    except DecodeError:
        return None


def _decode(msgtype: str, payload: bytes) -> Any:
    try:
        return m.decode_message(msgtype, payload)
    except DecodeError:
        return None


def _family(inv_type: int) -> str | None:
    """What a getdata item asks for: ``block``, ``merkleblock`` or ``tx`` (None: unknown)."""
    base = inv_type & ~MSG_WITNESS_FLAG
    if base in (InvType.MSG_BLOCK, InvType.MSG_CMPCT_BLOCK):
        return "block"
    if base == InvType.MSG_FILTERED_BLOCK:
        return "merkleblock"
    if base in (InvType.MSG_TX, InvType.MSG_WTX):
        return "tx"
    return None


def delivered(msgtype: str, payload: bytes) -> frozenset[Content]:
    """What an answer delivers (see :data:`Content`); addr and pong deliver nothing that
    is checked."""
    if msgtype in BLOCK_TYPES:
        kind = "merkleblock" if msgtype == "merkleblock" else "block"
        return frozenset({(kind, hash256(payload[:80]))})
    if msgtype in ("addr", "addrv2", "pong"):
        return frozenset()
    msg = _decode(msgtype, payload)
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
    msg = _decode(msgtype, payload)
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


# --- the recorded chain ------------------------------------------------------------------


class HeaderChain:
    """The best chain the recorded headers form (headers, blocks, compact and merkle
    blocks of the played side): the longest path through them, its first header's parent
    as its base (the genesis block when the recording starts from a fresh node)."""

    def __init__(self, headers: Iterable[BlockHeader]) -> None:
        self.by_hash: dict[bytes, BlockHeader] = {}
        for header in headers:
            self.by_hash.setdefault(header.hash, header)
        height: dict[bytes, int] = {}
        for start in self.by_hash:
            path = []
            at = start
            while at in self.by_hash and at not in height:
                path.append(at)
                at = self.by_hash[at].prev_block
            n = height.get(at, 0)
            for h in reversed(path):
                n += 1
                height[h] = n
        tip = max(self.by_hash, key=lambda h: height[h], default=None)
        hashes: list[bytes] = []
        while tip in self.by_hash:
            assert tip is not None
            hashes.append(tip)
            tip = self.by_hash[tip].prev_block
        hashes.reverse()
        self.headers = [self.by_hash[h] for h in hashes]
        self.hashes = [self.headers[0].prev_block, *hashes] if hashes else []
        """The base, then the hash of each header: ``hashes[i + 1]`` is ``headers[i]``'s."""
        self.position = {h: i for i, h in enumerate(self.hashes)}

    def after(self, locator: Sequence[bytes]) -> list[bytes] | None:
        """The hashes that follow the first locator hash on the chain; None when no
        locator hash is on it. An empty chain has nothing after anything."""
        if not self.hashes:
            return []
        for h in locator:
            i = self.position.get(h)
            if i is not None:
                return self.hashes[i + 1 :]
        return None


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
            header = _header(s.payload)
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
        msg = _decode(s.msgtype, s.payload)
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
                    msg = _decode(s.msgtype, s.payload)
                    if msg is not None:
                        items = getattr(msg, "inv", None) if s.msgtype == "getdata" else None
                        wanted = (
                            {(f, i.hash) for i in items if (f := _family(i.type))}
                            if items is not None
                            else {("", b"")}
                        )
                        requests.append(_Request(s, msg, wanted))
                        pending.append(requests[-1])
                continue
            if s.msgtype not in ANSWER_TYPES - {"pong"}:
                merkle_txs = None
                continue
            is_block = s.msgtype in BLOCK_TYPES
            msg = hash256(s.payload[:80]) if is_block else _decode(s.msgtype, s.payload)
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


# --- divergence ----------------------------------------------------------------------------


class Kind(enum.StrEnum):
    """What differs between the live conversation and the recorded one."""

    UNANSWERABLE = "unanswerable"
    """Substantive: the live side asked for something the recording does not hold."""
    NOT_REQUESTED = "not_requested"
    """Substantive: a request the recording answers was never made."""
    DISCONNECTED = "disconnected"
    """Substantive: the live side closed the connection before the replay ended."""
    MISBEHAVED = "misbehaved"
    """Substantive: invalid frames or payloads, or no pong to our ping."""
    MISSING = "missing"
    """Benign: an unsolicited message the recording has and the live side did not send."""
    EXTRA = "extra"
    """Benign: an unsolicited message the live side sent beyond the recording."""
    REORDERED = "reordered"
    """Benign: unsolicited messages sent in another order than recorded."""


@dataclass(frozen=True, slots=True)
class Divergence:
    kind: Kind
    msgtype: str
    count: int = 1
    items: tuple[str, ...] = ()
    """What was asked for, not requested, or went wrong (hashes as RPC shows them)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "msgtype": self.msgtype,
            "count": self.count,
            "items": list(self.items),
        }

    def __str__(self) -> str:
        text = f"{self.kind.value.replace('_', ' ')} {self.msgtype}".rstrip()
        if self.count > 1:
            text += f" x{self.count}"
        if self.items:
            shown = ", ".join(self.items[:3])
            more = len(self.items) - 3
            text += f": {shown}" + (f" and {more} more" if more > 0 else "")
        return text


def _grouped(kind: Kind, pairs: Iterable[tuple[str, str]]) -> list[Divergence]:
    """One divergence per message type, its items in first-seen order."""
    by_type: dict[str, list[str]] = {}
    for msgtype, item in pairs:
        by_type.setdefault(msgtype, []).append(item)
    return [Divergence(kind, t, len(items), tuple(items)) for t, items in by_type.items()]


def benign(recorded: Sequence[str], live: Sequence[str]) -> list[Divergence]:
    """Unsolicited messages (by type) missing, extra, or in another order than recorded."""
    rec = [t for t in recorded if t not in NOT_BENIGN]
    liv = [t for t in live if t not in NOT_BENIGN]
    have, got = Counter(rec), Counter(liv)
    out = []
    for t in sorted(have.keys() | got.keys()):
        if have[t] > got[t]:
            out.append(Divergence(Kind.MISSING, t, have[t] - got[t]))
        elif got[t] > have[t]:
            out.append(Divergence(Kind.EXTRA, t, got[t] - have[t]))
    common = have & got

    def trimmed(seq: list[str]) -> list[str]:
        seen: Counter[str] = Counter()
        out = []
        for t in seq:
            if seen[t] < common[t]:
                seen[t] += 1
                out.append(t)
        return out

    a, b = trimmed(rec), trimmed(liv)
    moved: set[str] = set()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            moved.update(a[i1:i2], b[j1:j2])
    out += [Divergence(Kind.REORDERED, t) for t in sorted(moved)]
    return out


@dataclass(slots=True)
class Report:
    """One replayed connection."""

    played: Side
    transport: str = "v1"
    """The transport spoken with the live side."""
    sent: int = 0
    received: int = 0
    sent_types: Counter[str] = field(default_factory=Counter)
    received_types: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)
    """Live requests answered, by type."""
    substantive: list[Divergence] = field(default_factory=list)
    benign: list[Divergence] = field(default_factory=list)
    last_request: str | None = None
    """The recording's last answered request (None: the recording answers none)."""
    reached: bool = False
    """Whether the live side made it."""
    error: str | None = None
    seconds: float = 0.0
    handshaked: bool = False
    """Whether the live side sent its ``version`` (a connection counts from then on)."""
    live: list[tuple[str, bytes, bool]] = field(default_factory=list, repr=False)
    """With ``transcript``: every message the live side sent, in order: type, payload,
    and whether its ``verack`` had arrived before it (what differential replay compares;
    not in JSON)."""
    local: tuple[str, int] | None = None
    """The replayer's end of the connection (host, port), as the live side sees it."""
    remote: tuple[str, int] | None = None
    """The live side's end of the connection."""

    @property
    def diverged(self) -> bool:
        """Substantive divergence (benign divergence does not count)."""
        return bool(self.substantive or self.error)

    def to_json(self) -> dict[str, Any]:
        return {
            "played": self.played,
            "transport": self.transport,
            "sent": self.sent,
            "received": self.received,
            "sent_types": dict(self.sent_types),
            "received_types": dict(self.received_types),
            "answered": dict(sorted(self.answered.items())),
            "last_request": self.last_request,
            "reached": self.reached,
            "substantive": [d.to_json() for d in self.substantive],
            "benign": [d.to_json() for d in self.benign],
            "error": self.error,
            "diverged": self.diverged,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        answered = ", ".join(f"{t} {n}" for t, n in sorted(self.answered.items()))
        lines = [
            f"replayed the recorded {self.played} over {self.transport}: sent {self.sent} "
            f"messages, received {self.received} in {self.seconds:.1f}s",
            f"answered {sum(self.answered.values())} live requests"
            + (f" ({answered})" if answered else ""),
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.last_request is not None:
            did = "reached" if self.reached else "did not reach"
            lines.append(f"the live side {did} the recording's last answered request "
                         f"({self.last_request})")  # fmt: skip
        for title, found in (("substantive", self.substantive), ("benign", self.benign)):
            lines.append(f"{title} divergence:" + ("" if found else " none"))
            lines += [f"  {d}" for d in found]
        lines.append("DIVERGED" if self.diverged else "reproduced")
        return "\n".join(lines)


# --- the live side, sans IO ----------------------------------------------------------------


class Conversation:
    """The live side of one connection: :meth:`receive` takes each message it sends and
    returns the answers to send; :meth:`divergence` compares it with the recording."""

    def __init__(self, recording: Recording, *, fast: bool = False) -> None:
        self.recording = recording
        self.fast = fast
        """Answers were sent unasked: live requests are checked but not answered again."""
        self.live: list[str] = []
        self.requests = 0
        """Live requests so far (pings left out)."""
        self.answered: Counter[str] = Counter()
        self.served: set[Content] = set()
        self.unanswerable: dict[tuple[str, str], None] = {}
        self.misbehaved: list[tuple[str, str]] = []

    @property
    def reached(self) -> bool:
        last = self.recording.last
        return last is None or last.delivers <= self.served

    def played(self, msgtype: str, payload: bytes) -> None:
        """A recorded message was sent unasked (with ``fast`` answers are, too)."""
        if self.fast:
            self.served |= delivered(msgtype, payload)

    def receive(self, msgtype: str, payload: bytes) -> list[Message]:
        self.live.append(msgtype)
        if msgtype not in ANSWERS:
            return []
        if msgtype == "ping":
            self.answered["ping"] += 1
            return [("pong", payload)]
        self.requests += 1
        msg = _decode(msgtype, payload)
        if msg is None:
            self.misbehaved.append((msgtype, f"undecodable {msgtype}"))
            return []
        answers = self._answer(msgtype, payload, msg)
        if answers is None:
            return []
        self.answered[msgtype] += 1
        for t, p in answers:
            self.served |= delivered(t, bytes(p))
        return [] if self.fast else answers

    def _cannot(self, msgtype: str, what: str) -> None:
        self.unanswerable[(msgtype, what)] = None

    def _answer(self, msgtype: str, payload: bytes, msg: Any) -> list[Message] | None:
        """The answers to one live request; None when the recording cannot answer it."""
        rec = self.recording
        if isinstance(msg, m.GetData):
            return self._getdata(msg.inv)
        if isinstance(msg, m.GetHeaders | m.GetBlocks):
            after = rec.chain.after(msg.locator.hashes)
            if after is None:
                self._cannot(msgtype, f"locator {display_hash(msg.locator.hashes[0])}"
                             if msg.locator.hashes else "empty locator")  # fmt: skip
                return None
            limit = MAX_HEADERS if msgtype == "getheaders" else MAX_BLOCKS_INV
            hashes = after[:limit]
            if msg.stop_hash in hashes:  # getheaders sends the stop block, getblocks not
                stop = hashes.index(msg.stop_hash)
                hashes = hashes[: stop + 1 if msgtype == "getheaders" else stop]
            if msgtype == "getheaders":
                headers = tuple(rec.chain.by_hash[h] for h in hashes)
                return [("headers", m.Headers(headers).encode())]
            if not hashes:
                return []
            return [("inv", m.Inv(tuple(Inventory(InvType.MSG_BLOCK, h) for h in hashes)).encode())]
        if isinstance(msg, m.GetBlockTxn):
            answer = self._blocktxn(msg)
            if answer is None:
                self._cannot(msgtype, f"block {display_hash(msg.block_txn_request.block_hash)}")
            return answer
        recorded = rec.by_request.get((msgtype, payload))
        if recorded is not None:
            return list(recorded)
        if msgtype in SILENCE_ANSWERS:
            return []
        what = msgtype
        if isinstance(msg, m.GetCFilters | m.GetCFHeaders | m.GetCFCheckpt):
            what = f"filter type {msg.filter_type} to {display_hash(msg.stop_hash)}"
        self._cannot(msgtype, what)
        return None

    def _getdata(self, items: tuple[Inventory, ...]) -> list[Message] | None:
        rec = self.recording
        out: list[Message] = []
        missing: list[Inventory] = []
        for item in items:
            family, h = _family(item.type), item.hash
            answer: list[Message] = []
            if family == "block":
                cmpct = item.type & ~MSG_WITNESS_FLAG == InvType.MSG_CMPCT_BLOCK
                if cmpct and h in rec.cmpctblocks:
                    answer = [("cmpctblock", rec.cmpctblocks[h])]
                elif (block := rec.blocks.get(h) or self._block_from_cmpct(h)) is not None:
                    answer = [("block", block)]
            elif family == "merkleblock":
                answer = rec.merkleblocks.get(h, [])
            elif family == "tx" and h in rec.txs:
                answer = [("tx", rec.txs[h])]
            if answer:
                out += answer
            elif family is not None and h in rec.notfound:
                missing.append(item)
            else:
                self._cannot("getdata", item.describe())
        if missing:
            out.append(("notfound", m.NotFound(tuple(missing)).encode()))
        return out or None

    def _block_from_cmpct(self, h: bytes) -> bytes | None:
        """A full block from a recorded compact block that prefills every transaction."""
        payload = self.recording.cmpctblocks.get(h)
        msg = _decode("cmpctblock", payload) if payload is not None else None
        if not isinstance(msg, m.CmpctBlock) or msg.header_and_shortids.short_ids:
            return None
        cb = msg.header_and_shortids
        return Block(cb.header, tuple(p.tx for p in cb.prefilled)).encode()

    def _blocktxn(self, msg: m.GetBlockTxn) -> list[Message] | None:
        rec, req = self.recording, msg.block_txn_request
        if req.block_hash in rec.blocktxn:
            return [("blocktxn", rec.blocktxn[req.block_hash])]
        block = _decode("block", rec.blocks.get(req.block_hash, b""))
        if not isinstance(block, m.BlockMsg):
            return None
        txs: list[Transaction] = []
        at = -1
        for diff in req.indexes:  # differentially encoded (BIP152)
            at += diff + 1
            if at >= len(block.block.transactions):
                return None
            txs.append(block.block.transactions[at])
        answer = m.BlockTxn(BlockTransactions(req.block_hash, tuple(txs)))
        return [("blocktxn", answer.encode())]

    def divergence(self) -> tuple[list[Divergence], list[Divergence]]:
        """Substantive and benign divergence so far."""
        not_requested = [
            (a.request.msgtype, describe(a.step.msgtype, a.step.payload))
            for a in self.recording.answers
            if not a.delivers <= self.served
        ]
        substantive = (
            _grouped(Kind.UNANSWERABLE, self.unanswerable)
            + _grouped(Kind.NOT_REQUESTED, not_requested)
            + _grouped(Kind.MISBEHAVED, self.misbehaved)
        )
        recorded = [s.msgtype for s in self.recording.theirs]
        return substantive, benign(recorded, self.live)


# --- moving the bytes -------------------------------------------------------------------


def _fresh_version(payload: bytes) -> bytes:
    """The recorded version with the current time and a new random nonce (as it was
    recorded when it does not decode)."""
    version = _decode("version", payload)
    if not isinstance(version, m.Version):
        return payload
    fresh = dataclasses.replace(version, timestamp=int(time.time()), nonce=random.getrandbits(64))
    return fresh.encode()


class Replayer:
    """Plays a :class:`Recording` over one connection and fills in a :class:`Report`."""

    def __init__(
        self,
        recording: Recording,
        *,
        magic: bytes,
        fast: bool = False,
        verbatim: bool = False,
        timeout: float = 10.0,
        on_version: Callable[[], None] | None = None,
        transcript: bool = False,
    ) -> None:
        self.recording = recording
        self.transcript = transcript
        """Keep every message of the live side in :attr:`Report.live` (differential
        replay compares them)."""
        self.magic = magic
        self.verbatim = verbatim
        self.timeout = timeout
        self.on_version = on_version
        """Called once the live side's ``version`` has arrived."""
        self.conversation = Conversation(recording, fast=fast)
        self.report = Report(recording.play)
        self.leg: Leg = V1Leg(magic)
        """The transport spoken with the live side (v1, or a BIP324 session)."""
        self._writer: asyncio.StreamWriter | None = None
        self._changed = asyncio.Event()
        self._reader_done = False
        self._closing = False
        self._verack = False
        self._pongs: set[int] = set()
        self._deadline = float("inf")
        """When the first unanswerable request has waited ``timeout`` seconds."""

    def _send(self, msgtype: str, payload: bytes | memoryview) -> None:
        assert self._writer is not None
        self._writer.write(self.leg.encode([(msgtype, payload)]))
        self.report.sent += 1
        self.report.sent_types[msgtype] += 1

    def _received(self, messages: list[Message]) -> None:
        conv = self.conversation
        for msgtype, payload in messages:
            self.report.received += 1
            self.report.received_types[msgtype] += 1
            data = bytes(payload)
            if self.transcript:
                self.report.live.append((msgtype, data, self._verack))
            if msgtype == "version" and not self.report.handshaked:
                self.report.handshaked = True
                if self.on_version is not None:
                    self.on_version()
            elif msgtype == "verack":
                self._verack = True
            elif msgtype == "pong" and len(data) == 8:
                self._pongs.add(int.from_bytes(data, "little"))
            unanswerable = len(conv.unanswerable)
            for answer in conv.receive(msgtype, data):
                self._send(*answer)
            if len(conv.unanswerable) > unanswerable and self._deadline == float("inf"):
                self._deadline = time.monotonic() + self.timeout
        self._changed.set()

    async def _read(self, reader: asyncio.StreamReader, first: bytes = b"") -> None:
        try:
            data = first or await reader.read(1 << 16)
            while data:
                messages, dropped, fatal = self.leg.receive(data)
                self._received(messages)
                self.conversation.misbehaved += [("frame", text) for _, text in dropped]
                if fatal is not None:
                    raise fatal
                assert self._writer is not None
                await self._writer.drain()
                data = await reader.read(1 << 16)
            if not self._closing:
                self._disconnected("the live side closed the connection")
        except (StreamError, V2Error) as e:
            self.report.error = f"live side: {e}"
        except ConnectionError as e:  # the connection's fate, not a failure of ours
            if not self._closing:
                self._disconnected(f"{type(e).__name__}: {e}")
        finally:
            self._reader_done = True
            self._changed.set()

    def _disconnected(self, why: str) -> None:
        self.report.substantive.append(Divergence(Kind.DISCONNECTED, "", 1, (why,)))

    async def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``done()``; False when the live side is gone, ``timeout`` passed or
        an unanswerable request has waited long enough."""
        deadline = min(time.monotonic() + timeout, self._deadline)
        while not done():
            left = deadline - time.monotonic()
            if self._reader_done or left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def _handshake(self, initiator: bool) -> bool:
        version = self.recording.version.payload
        payload = version if self.verbatim else _fresh_version(version)
        if initiator:
            self._send("version", payload)
        if not await self._until(lambda: self.report.handshaked, self.timeout):
            self._handshake_failed("version")
            return False
        if not initiator:
            self._send("version", payload)
        for s in self.recording.features:
            self._send(s.msgtype, s.payload)
        self._send("verack", b"")
        assert self._writer is not None
        await self._writer.drain()
        if not await self._until(lambda: self._verack, self.timeout):
            self._handshake_failed("verack")
            return False
        return True

    def _handshake_failed(self, missing: str) -> None:
        if self.report.error is None and not self._reader_done:
            self.report.error = f"no {missing} from the live side within {self.timeout:g}s"
        elif self.report.error is None:
            self.report.error = f"the live side closed the connection before its {missing}"

    async def _settle(self) -> None:
        """Until the live side has processed everything and has no more to ask (see the
        module docstring)."""
        while await self._ping_round():
            pass

    async def _ping_round(self) -> bool:
        """Ping and wait for the pong; True when the live side asked for more meanwhile or
        after (then settle again)."""
        conv = self.conversation
        requests = conv.requests
        nonce = random.getrandbits(64)
        self._send("ping", m.Ping(nonce).encode())
        assert self._writer is not None
        await self._writer.drain()
        if not await self._until(lambda: nonce in self._pongs, self.timeout):
            if not self._reader_done and time.monotonic() < self._deadline:
                conv.misbehaved.append(("ping", f"no pong within {self.timeout:g}s"))
            return False
        if conv.requests != requests:
            return True
        if conv.reached:
            return False
        return await self._until(lambda: conv.requests != requests, self.timeout)

    async def run(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        initiator: bool,
        leg: Leg | None = None,
        early: list[Message] | None = None,
        first: bytes = b"",
    ) -> Report:
        """Play over a connection: ``leg`` is its transport once set up (default v1),
        ``early`` the messages its handshake already read, ``first`` bytes already read."""
        started = time.monotonic()
        self._writer = writer
        if leg is not None:
            self.leg = leg
        self.report.transport = self.leg.transport
        self.report.local = _address(writer.get_extra_info("sockname"))
        self.report.remote = _address(writer.get_extra_info("peername"))
        rec = self.recording
        if early:
            self._received(early)
        reading = asyncio.create_task(self._read(reader, first))
        read_error: BaseException | None = None
        handshaken = False
        try:
            if await self._handshake(initiator):
                handshaken = True
                fast = self.conversation.fast
                for s in rec.played if fast else rec.script:
                    self._send(s.msgtype, s.payload)
                    self.conversation.played(s.msgtype, s.payload)
                await writer.drain()
                await self._settle()
        except ConnectionError as e:  # the connection's fate; any other exception is ours
            if not self._reader_done:
                self._disconnected(f"{type(e).__name__}: {e}")
        finally:
            self._closing = True
            writer.close()
            try:  # (a live side that stops reading would hold a closing connection open)
                await asyncio.wait_for(writer.wait_closed(), self.timeout)
            except OSError:  # TimeoutError included
                writer.transport.abort()
            reading.cancel()
            await asyncio.wait([reading])
            read_error = None if reading.cancelled() else reading.exception()
        if read_error is not None:  # the reading task failed: the replay is void
            raise read_error
        if not handshaken and self.report.error is None:  # the connection broke in it
            self._handshake_failed("verack" if self.report.handshaked else "version")
        report = self.report
        substantive, report.benign = self.conversation.divergence()
        report.substantive = substantive + report.substantive
        report.answered = self.conversation.answered
        report.last_request = rec.last.describe() if rec.last is not None else None
        report.reached = self.conversation.reached
        report.seconds = time.monotonic() - started
        return report

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Report:
        """Play to a client that dialed us, in whichever transport it speaks."""
        try:
            leg, early, first = await _accept_transport(reader, writer, self)
        except (V2Error, ConnectionError, TimeoutError) as e:  # what the client did
            writer.close()
            self.report.error = f"no transport: {_why(e, self.timeout)}"
            return self.report
        return await self.run(reader, writer, initiator=False, leg=leg, early=early, first=first)


class _StreamIO:
    """A stream pair as :func:`msgcap.proxy.v2.handshake` reads and writes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self, n: int) -> bytes:
        return await self.reader.read(n)


async def replay_to(
    steps: list[Step],
    host: str,
    port: int,
    *,
    play: Side = "peer",
    transport: Transport = "v1",
    **options: Any,
) -> Report:
    """Dial a live node and play one side of the recording to it, over v1 or BIP324.

    Raises ``OSError`` when the node cannot be reached and :class:`ReplayFailed` when the
    replayer fails (an exception of ours, never a report of such a replay)."""
    recording = Recording(steps, play)
    replayer = Replayer(recording, **options)
    reader, writer = await asyncio.open_connection(host, port)
    failures: list[str] = []
    where = f"replay to {host}:{port}"
    try:
        with _LoopFailures(failures.append):
            report = await _play_to(replayer, reader, writer, transport)
    except MsgcapError:
        raise
    except Exception as e:
        writer.close()
        raise ReplayFailed(f"{where} failed: {describe_exception(e)}") from e
    if failures:
        raise ReplayFailed(f"{where} failed: {failures[0]}")
    return report


async def _play_to(
    replayer: Replayer,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    transport: Transport,
) -> Report:
    if transport == "v1":
        return await replayer.run(reader, writer, initiator=True)
    session = V2Session(initiator=True, magic=replayer.magic)
    try:
        async with asyncio.timeout(replayer.timeout or None):
            early = await handshake(_StreamIO(reader, writer), session)
    except (V2Error, ConnectionError, TimeoutError) as e:  # what the node did
        writer.close()
        replayer.report.transport = "v2"
        replayer.report.error = f"BIP324 handshake failed: {_why(e, replayer.timeout)}"
        return replayer.report
    return await replayer.run(reader, writer, initiator=True, leg=V2Leg(session), early=early)


async def _accept_transport(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replayer: Replayer
) -> tuple[Leg, list[Message], bytes]:
    """Whichever transport the client speaks: v1 when its first 16 bytes are the v1
    ``version`` header (Core's rule), else a BIP324 handshake as responder."""
    prefix = v1_version_prefix(replayer.magic)
    first = b""
    async with asyncio.timeout(replayer.timeout or None):
        while len(first) < len(prefix) and prefix.startswith(first):
            chunk = await reader.read(len(prefix) - len(first))
            if not chunk:
                raise ConnectionError("the client closed before it said anything")
            first += chunk
        if first == prefix:
            return V1Leg(replayer.magic), [], first
        session = V2Session(initiator=False, magic=replayer.magic)
        early = await handshake(_StreamIO(reader, writer), session, first)
    return V2Leg(session), early, b""


async def replay_listen(
    steps: list[Step],
    host: str,
    port: int,
    *,
    play: Side = "node",
    connections: int = 1,
    ready: asyncio.Future[tuple[str, int]] | None = None,
    accept_timeout: float = 60.0,
    **options: Any,
) -> list[Report]:
    """Wait for clients and play one side of the recording to each, until ``connections``
    of them have sent their ``version`` (a connection closed before that, such as a probe
    or a retried v2 attempt, does not count) and have been played to. Returns their
    reports in the order they started; raises :class:`TimeoutError` when no client
    starts within ``accept_timeout`` seconds (fewer than asked: the reports of those that
    did).

    A failure of the replayer on any connection (an exception of ours in its handler,
    counted or not) ends the whole replay at once: the other connections are closed and
    :class:`ReplayFailed` is raised, naming the connection and the exception."""
    recording = Recording(steps, play)
    reports: list[Report] = []
    failures: list[str] = []
    handlers: set[asyncio.Task[Any]] = set()
    running = 0
    changed = asyncio.Event()
    closed = False

    def failed(why: str) -> None:
        failures.append(why)
        changed.set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal running
        if closed or failures or len(reports) >= connections:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        replayer: Replayer | None = None

        def counted() -> None:
            nonlocal running
            assert replayer is not None
            reports.append(replayer.report)
            running += 1
            changed.set()

        try:
            replayer = Replayer(recording, on_version=counted, **options)
            await replayer.accept(reader, writer)
        except Exception as e:  # ours: asyncio would only log it
            writer.close()
            failed(f"replay to the client at {_peer(writer)} failed: {describe_exception(e)}")
        finally:
            handlers.discard(task)
            if replayer is not None and replayer.report.handshaked:
                running -= 1
                changed.set()

    with _LoopFailures(failed):
        server = await asyncio.start_server(serve, host, port)
        try:
            if ready is not None:
                ready.set_result(server.sockets[0].getsockname()[:2])
            deadline = time.monotonic() + accept_timeout
            while (
                len(reports) < connections
                and not failures
                and (left := deadline - time.monotonic()) > 0
            ):
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)
            server.close()
            while running and not failures:
                changed.clear()
                await changed.wait()
        finally:
            closed = True
            server.close()
            # Connections still being set up (not counted), or cut short by a failure.
            for task in handlers:
                task.cancel()
            if handlers:
                await asyncio.wait(handlers)
    if failures:
        more = f" (and {len(failures) - 1} more failures)" if len(failures) > 1 else ""
        raise ReplayFailed(failures[0] + more)
    if not reports:
        raise TimeoutError(f"no client connected within {accept_timeout:g}s")
    return reports


def _why(e: BaseException, timeout: float) -> str:
    """What the live side did, from the exception it caused."""
    if isinstance(e, TimeoutError) and not str(e):
        return f"no answer within {timeout:g}s"
    return f"{type(e).__name__}: {e}"


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


def _address(name: object) -> tuple[str, int] | None:
    """A socket's (host, port), or None (not an IP socket)."""
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return None
