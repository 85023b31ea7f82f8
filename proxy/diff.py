"""Differential replay: the same recorded side played into several live nodes, and the
difference between what the nodes did.

Each node's replay (:func:`msgcap.proxy.replay.replay_to`, or one connection of
:func:`~msgcap.proxy.replay.replay_listen`, with ``transcript=True``) keeps every message
the node sent (:attr:`Report.live`). :func:`compare` turns each node's messages into
normalised observations and reports where the nodes differ.

What is normalised (it differs between two runs of the same node on the same input), and
nothing else:

- ``version``: its ``nonce``, ``timestamp``, ``addr_recv`` and ``addr_from`` (the
  address it saw the replayer at and its own); compared: ``version``, ``services``,
  ``user_agent``, ``start_height`` and ``relay``;
- ``ping`` and ``pong``: left out (their nonces and how often a node pings are timing);
- ``sendtxrcncl``: its ``salt`` (random); its version is compared;
- ``feefilter``: fee rates equal within one step of Core's randomised rounding (a factor
  of 1.1, ``FeeFilterRounder``);
- ``addr``/``addrv2``: the address times; the replayer's address and the node's own
  address (the connection's two ends) are compared as ``replayer`` and ``node``;
- message boundaries and counts: inventory (``inv``, ``getdata``, ``notfound``) and
  ``headers`` are compared item by item, as sets; the same item sent a different number
  of times is benign (``count``);
- order: the order in which a node sent its messages is not compared (it follows the
  timing of the replayer's answers), except that the messages a node sends before its
  ``verack`` (the handshake round) are told apart from those after it; another order
  is benign (``reordered``).

Substantive: a request one node made and another did not (by item: a block, a header
locator, a transaction); a message or announcement one node sent and another did not (by
type and normalised content); a different ``version`` field or fee filter; a disconnect,
misbehaviour, replay error or the recording's last answered request reached on one side
only. Benign: the same items sent a different number of times, or in another order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from msgcap.capture.framing import hash256
from msgcap.parser import messages as m
from msgcap.parser.chain import BLOCK_TYPES, HANDSHAKE, try_decode
from msgcap.parser.structures import AddressV1, AddressV2
from msgcap.parser.wire import display_hash
from msgcap.proxy.replay import Transport, replay_to
from msgcap.proxy.replay_conversation import Kind, Report, findings, findings_json, listed
from msgcap.proxy.replay_plan import ANSWERS, Side, Step

NORMALISED = (
    "version: nonce, timestamp, addr_recv and addr_from (compared: version, services, "
    "user_agent, start_height, relay)",
    "ping and pong: left out (nonces and ping timing)",
    "sendtxrcncl: salt",
    "feefilter: fee rates within one step (x1.1) of Core's randomised rounding are equal",
    "addr/addrv2: address times; the replayer's and the node's own address",
    "inv, getdata, notfound, headers: compared item by item (message boundaries and "
    "repeats are benign)",
    "order of messages within a round (the handshake round: before the node's verack; "
    "then the session): benign",
)
"""What :func:`compare` normalises, in the words of the report."""

FEE_STEP = 1.1
"""Core's ``FeeFilterRounder`` spacing: a fee filter is rounded to a bucket at random
between two neighbours."""

REQUESTS = frozenset(ANSWERS) - {"ping"}
IGNORED = frozenset({"ping", "pong", "verack", "version"})
VERSION_FIELDS = ("version", "services", "user_agent", "start_height", "relay")


@dataclass(frozen=True, slots=True)
class Difference:
    """One way in which the nodes differ."""

    kind: str
    """``version``, ``feefilter``, ``request``, ``message``, ``disconnected``,
    ``misbehaved``, ``error``, ``reached`` (substantive); ``count``, ``reordered``
    (benign)."""
    msgtype: str
    field: str = ""
    """The field that differs (``relay``, ``services``, ...), if one does."""
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    items: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``version.relay``, ``request getdata``, ``disconnected``, ..."""
        if self.field:
            return f"{self.msgtype}.{self.field}"
        return f"{self.kind} {self.msgtype}".strip()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "msgtype": self.msgtype,
            "field": self.field,
            "name": self.name,
            "values": dict(self.values),
            "items": list(self.items),
        }

    def __str__(self) -> str:
        values = ", ".join(f"{k}: {v}" for k, v in self.values.items())
        text = f"{self.name} ({values})" if values else self.name
        return text + listed(self.items)


# --- one node's behaviour, normalised ----------------------------------------------------


@dataclass(slots=True)
class Behaviour:
    """What one node did, normalised (see the module docstring)."""

    version: dict[str, str] | None = None
    items: Counter[tuple[str, str, str]] = dataclasses.field(default_factory=Counter)
    """(stage, msgtype, normalised item) and how many times it was sent; stage is
    ``handshake`` (before the node's verack) or ``session``."""
    order: dict[str, list[tuple[str, str, str]]] = dataclasses.field(default_factory=dict)
    """Per stage, the items in the order first sent."""
    feefilters: list[int] = dataclasses.field(default_factory=list)


def _addr_text(ip: bytes, port: int, ends: dict[tuple[str, int], str]) -> str:
    try:
        address = ipaddress.IPv6Address(ip)
        host = str(address.ipv4_mapped or address)
    except ValueError:
        return f"{ip.hex()}:{port}"
    return ends.get((host, port), f"{host}:{port}")


def _addr_items(msg: Any, ends: dict[tuple[str, int], str]) -> list[str]:
    out = []
    for a in msg.addrs:
        if isinstance(a, AddressV1):
            where = _addr_text(a.ip, a.port, ends)
        elif isinstance(a, AddressV2) and a.net in (1, 2):  # IPv4, IPv6
            ip = a.addr if a.net == 2 else b"\0" * 10 + b"\xff\xff" + a.addr
            where = _addr_text(ip, a.port, ends)
        else:
            where = f"net {a.net} {a.addr.hex()}:{a.port}"
        out.append(f"{where} services {a.services:#x}")
    return out


def _short(payload: bytes) -> str:
    return f"{len(payload)} bytes sha256 {hashlib.sha256(payload).hexdigest()[:16]}"


def _items(msgtype: str, payload: bytes, ends: dict[tuple[str, int], str]) -> list[str]:
    """A message as normalised items."""
    msg = try_decode(msgtype, payload)
    if msg is None:
        return [f"undecodable {_short(payload)}"]
    if isinstance(msg, m.Inv | m.GetData | m.NotFound):
        return [i.describe() for i in msg.inv] or ["empty"]
    if isinstance(msg, m.Headers):
        return [f"header {display_hash(h.hash)}" for h in msg.headers] or ["empty"]
    if isinstance(msg, m.GetHeaders | m.GetBlocks):
        first = display_hash(msg.locator.hashes[0]) if msg.locator.hashes else "none"
        return [f"locator {first} ({len(msg.locator.hashes)} hashes) stop "
                f"{display_hash(msg.stop_hash)}"]  # fmt: skip
    if isinstance(msg, m.SendCmpct):
        return [f"announce {msg.announce} version {msg.version}"]
    if isinstance(msg, m.SendTxRcncl):
        return [f"version {msg.version}"]
    if isinstance(msg, m.Addr | m.AddrV2):
        return _addr_items(msg, ends) or ["empty"]
    if isinstance(msg, m.Tx):
        return [f"tx {display_hash(msg.tx.txid)}"]
    if msgtype in BLOCK_TYPES:
        return [f"block {display_hash(hash256(payload[:80]))}"]
    if isinstance(msg, m.BlockTxn):
        return [f"block {display_hash(msg.block_transactions.block_hash)}"]
    if isinstance(msg, m.GetBlockTxn):
        req = msg.block_txn_request
        return [f"block {display_hash(req.block_hash)} indexes {list(req.indexes)}"]
    if not payload:
        return [""]
    return [_short(payload)]


def behaviour(report: Report) -> Behaviour:
    """One node's messages (:attr:`Report.live`), normalised."""
    out = Behaviour()
    ends: dict[tuple[str, int], str] = {}
    if report.local is not None:
        ends[report.local] = "replayer"
    if report.remote is not None:
        ends[report.remote] = "node"
    for msgtype, payload, after_verack in report.live:
        if msgtype == "version" and out.version is None:
            v = try_decode("version", payload)
            if v is None:
                out.version = {"undecodable": _short(payload)}
                continue
            assert isinstance(v, m.Version)
            out.version = {
                "version": str(v.version),
                "services": f"{v.services:#x}",
                "user_agent": v.user_agent,
                "start_height": str(v.start_height),
                "relay": str(v.relay),
            }
        if msgtype in IGNORED:
            continue
        stage = "session" if after_verack else "handshake"
        if msgtype == "feefilter":
            msg = try_decode(msgtype, payload)
            if isinstance(msg, m.FeeFilter):
                out.feefilters.append(msg.feerate)
                items = [""]
            else:
                items = [f"undecodable {_short(payload)}"]
        else:
            items = _items(msgtype, payload, ends)
        seen = out.order.setdefault(stage, [])
        for item in items:
            key = (stage, msgtype, item)
            if not out.items[key]:
                seen.append(key)
            out.items[key] += 1
    return out


# --- the difference ------------------------------------------------------------------------


@dataclass(slots=True)
class DiffReport:
    """The nodes' behaviour compared: :attr:`substantive` and :attr:`benign` differences,
    and each node's own replay report."""

    labels: list[str]
    reports: list[Report]
    substantive: list[Difference]
    benign: list[Difference]
    normalised: tuple[str, ...] = NORMALISED

    @property
    def diverged(self) -> bool:
        """The nodes behaved differently (benign differences do not count)."""
        return bool(self.substantive)

    def names(self) -> list[str]:
        """The substantive differences' names (``version.relay``, ``request getdata``)."""
        return [d.name for d in self.substantive]

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": list(self.labels),
            "nodes": [r.to_json() for r in self.reports],
            "normalised": list(self.normalised),
            **findings_json(self.substantive, self.benign),
            "diverged": self.diverged,
        }

    def summary(self) -> str:
        played = self.reports[0].played if self.reports else "peer"
        lines = [f"differential replay of the recorded {played} into {len(self.reports)} nodes:"]
        for label, r in zip(self.labels, self.reports, strict=True):
            reached = "" if r.last_request is None else (
                ", reached the recording's last answered request" if r.reached
                else ", did not reach the recording's last answered request")  # fmt: skip
            error = f", error: {r.error}" if r.error else ""
            answered = sum(r.answered.values())
            lines.append(f"  {label}: sent {r.sent}, received {r.received}, answered "
                         f"{answered} in {r.seconds:.1f}s{reached}{error}")  # fmt: skip
        lines.append("normalised: " + "; ".join(self.normalised))
        lines += findings("differences", self.substantive, self.benign)
        lines.append("DIFFERENT" if self.diverged else "same behaviour")
        return "\n".join(lines)


def _named(items: list[str]) -> tuple[str, ...]:
    return tuple(i for i in (i.strip() for i in items) if i)


def _fee_same(a: int, b: int) -> bool:
    lo, hi = sorted((a, b))
    return hi == lo or (lo > 0 and hi <= lo * FEE_STEP * 1.001)


def compare(labels: Sequence[str], reports: Sequence[Report]) -> DiffReport:
    """The difference between the nodes' behaviour (see the module docstring)."""
    labels = list(labels)
    if len(labels) != len(reports) or len(labels) < 2:
        raise ValueError("compare needs two or more reports, one label each")
    seen = [behaviour(r) for r in reports]
    substantive: list[Difference] = []
    benign: list[Difference] = []

    # Disconnects, misbehaviour, errors and the recording's end, one side only.
    def state(r: Report, kind: Kind) -> str:
        found = [str(d) for d in r.substantive if d.kind is kind]
        return "; ".join(found) if found else "no"

    for kind, name in ((Kind.DISCONNECTED, "disconnected"), (Kind.MISBEHAVED, "misbehaved")):
        values = {lb: state(r, kind) for lb, r in zip(labels, reports, strict=True)}
        if len({v == "no" for v in values.values()}) > 1 or (
            name == "misbehaved" and len(set(values.values())) > 1
        ):
            substantive.append(Difference(name, "", values=values))
    errors = {lb: r.error or "none" for lb, r in zip(labels, reports, strict=True)}
    if len(set(errors.values())) > 1:
        substantive.append(Difference("error", "", values=errors))
    if any(r.last_request is not None for r in reports):
        reached = {lb: "yes" if r.reached else "no" for lb, r in zip(labels, reports, strict=True)}
        if len(set(reached.values())) > 1:
            substantive.append(Difference("reached", "", values=reached))

    # The handshake's version, field by field.
    for f in VERSION_FIELDS:
        values = {lb: (b.version or {}).get(f, "none") for lb, b in zip(labels, seen, strict=True)}
        if len(set(values.values())) > 1:
            substantive.append(Difference("version", "version", f, values))

    # Fee filters, within Core's rounding.
    fees = {lb: sorted(b.feefilters) for lb, b in zip(labels, seen, strict=True)}
    base = next(iter(fees.values()))
    for rates in fees.values():
        if rates and base and not all(_fee_same(a, b) for a, b in zip(base, rates, strict=False)):
            shown_rates = {k: ", ".join(map(str, v)) for k, v in fees.items()}
            substantive.append(Difference("feefilter", "feefilter", "feerate", shown_rates))
            break

    # Requests and messages: items sent by some nodes and not by others.
    keys: dict[tuple[str, str, str], None] = {}
    for b in seen:
        keys.update(dict.fromkeys(b.items))
    groups: dict[tuple[str, str, tuple[bool, ...]], list[str]] = {}
    counts: dict[str, list[str]] = {}
    for key in keys:
        stage, msgtype, item = key
        present = tuple(b.items[key] > 0 for b in seen)
        shown = item
        if (stage == "handshake") != (msgtype in HANDSHAKE):
            shown = f"{item} ({'before' if stage == 'handshake' else 'after'} verack)".lstrip()
        if not all(present):
            what = "request" if msgtype in REQUESTS else "message"
            groups.setdefault((what, msgtype, present), []).append(shown)
        elif len({b.items[key] for b in seen}) > 1:
            counts.setdefault(msgtype, []).append(
                f"{shown} " + "/".join(str(b.items[key]) for b in seen)
            )
    for (what, msgtype, present), items in groups.items():
        values = {lb: "sent" if p else "not sent" for lb, p in zip(labels, present, strict=True)}
        substantive.append(Difference(what, msgtype, values=values, items=_named(items)))
    for msgtype, items in counts.items():
        benign.append(Difference("count", msgtype, items=_named(items)))

    # Order within each round, of what every node sent.
    moved: set[str] = set()
    for stage in ("handshake", "session"):
        common = [k for k in keys if k[0] == stage and all(b.items[k] for b in seen)]
        shared = set(common)
        orders = [[k for k in b.order.get(stage, []) if k in shared] for b in seen]
        for sequence in orders[1:]:
            for x, y in zip(orders[0], sequence, strict=False):
                if x != y:
                    moved.update((x[1], y[1]))
    if moved:
        benign.append(Difference("reordered", ", ".join(sorted(moved))))
    return DiffReport(labels, list(reports), substantive, benign)


async def replay_many(
    steps: list[Step],
    targets: Sequence[tuple[str, int]],
    *,
    play: Side = "peer",
    transport: Transport = "v1",
    **options: Any,
) -> list[Report]:
    """The same recorded side played into each target at once; their reports in order."""
    return list(
        await asyncio.gather(
            *(
                replay_to(
                    steps, host, port, play=play, transport=transport, transcript=True, **options
                )
                for host, port in targets
            )
        )
    )
