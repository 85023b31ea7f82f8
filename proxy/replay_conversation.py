"""The live side of a replay, sans IO: :class:`Conversation` takes each message the live
side sends and returns the recorded answers to send; its :meth:`~Conversation.divergence`
and the :class:`Report` of a replayed connection.

The report separates substantive divergence (the live side asked for what the recording
does not hold, never made a request the recording answers, disconnected or misbehaved)
from benign divergence (unsolicited messages missing, extra or reordered). Differential
replay (:mod:`msgcap.proxy.diff`) reports its differences the same way
(:func:`listed`, :func:`findings`).
"""

from __future__ import annotations

import difflib
import enum
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from msgcap.capture.framing import Message
from msgcap.parser import messages as m
from msgcap.parser.chain import family, try_decode
from msgcap.parser.functional_plan import full_block
from msgcap.parser.structures import (
    MSG_WITNESS_FLAG,
    BlockTransactions,
    Inventory,
    InvType,
    Transaction,
)
from msgcap.parser.wire import display_hash
from msgcap.proxy.replay_plan import (
    ANSWERS,
    OPTIONAL_REQUESTS,
    Content,
    Recording,
    Side,
    delivered,
    describe,
)

SILENCE_ANSWERS = frozenset({"getaddr", "mempool"})
"""Requests that an empty answer (no message at all) answers."""
NOT_BENIGN = frozenset({"version", "verack", "ping", "pong"}) | (ANSWERS.keys() - OPTIONAL_REQUESTS)
"""Types left out of the benign comparison: the handshake, timing, and the requests that
are checked one by one."""

MAX_HEADERS = 2000
"""Headers in one answer to ``getheaders`` (Core's MAX_HEADERS_RESULTS)."""
MAX_BLOCKS_INV = 500
"""Block hashes in one answer to ``getblocks`` (Core's limit)."""


# --- what a replay report and a differential report share ------------------------------


class Finding(Protocol):
    """One divergence (:class:`Divergence`) or difference between nodes
    (:class:`msgcap.proxy.diff.Difference`): a line of text and a JSON object."""

    def to_json(self) -> dict[str, Any]: ...


def listed(items: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` items of a finding after a colon (``: a, b, c and 2 more``);
    nothing when there are none."""
    if not items:
        return ""
    more = len(items) - shown
    return ": " + ", ".join(items[:shown]) + (f" and {more} more" if more > 0 else "")


def findings(noun: str, substantive: Sequence[Finding], benign: Sequence[Finding]) -> list[str]:
    """A report's findings as text: each group under its heading (``substantive
    divergence:``, ``benign differences: none``), one finding a line."""
    lines = []
    for title, found in (("substantive", substantive), ("benign", benign)):
        lines.append(f"{title} {noun}:" + ("" if found else " none"))
        lines += [f"  {f}" for f in found]
    return lines


def findings_json(substantive: Sequence[Finding], benign: Sequence[Finding]) -> dict[str, Any]:
    """A report's findings as JSON: ``substantive`` and ``benign``, lists of objects."""
    return {
        "substantive": [f.to_json() for f in substantive],
        "benign": [f.to_json() for f in benign],
    }


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
        return text + listed(self.items)


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
            **findings_json(self.substantive, self.benign),
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
        lines += findings("divergence", self.substantive, self.benign)
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
        msg = try_decode(msgtype, payload)
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
            wanted, h = family(item.type), item.hash
            answer: list[Message] = []
            if wanted == "block":
                cmpct = item.type & ~MSG_WITNESS_FLAG == InvType.MSG_CMPCT_BLOCK
                if cmpct and h in rec.cmpctblocks:
                    answer = [("cmpctblock", rec.cmpctblocks[h])]
                elif (block := rec.blocks.get(h) or self._block_from_cmpct(h)) is not None:
                    answer = [("block", block)]
            elif wanted == "merkleblock":
                answer = rec.merkleblocks.get(h, [])
            elif wanted == "tx" and h in rec.txs:
                answer = [("tx", rec.txs[h])]
            if answer:
                out += answer
            elif wanted is not None and h in rec.notfound:
                missing.append(item)
            else:
                self._cannot("getdata", item.describe())
        if missing:
            out.append(("notfound", m.NotFound(tuple(missing)).encode()))
        return out or None

    def _block_from_cmpct(self, h: bytes) -> bytes | None:
        """A full block from a recorded compact block that prefills every transaction."""
        payload = self.recording.cmpctblocks.get(h)
        return None if payload is None else full_block(payload, ())

    def _blocktxn(self, msg: m.GetBlockTxn) -> list[Message] | None:
        rec, req = self.recording, msg.block_txn_request
        if req.block_hash in rec.blocktxn:
            return [("blocktxn", rec.blocktxn[req.block_hash])]
        block = try_decode("block", rec.blocks.get(req.block_hash, b""))
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
