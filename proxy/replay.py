"""Replay one side of a recorded conversation against live software.

A capture folder holds both sides of a connection from the node's point of view:
``msgs_recv.dat`` is what the peer sent, ``msgs_sent.dat`` what the node sent. The
replayer plays one side (``peer`` by default when dialing a node, ``node`` when listening
for a client under test) and expects the other from the live software:

- its own handshake: the recorded ``version`` with a fresh nonce and the current time
  (unless ``verbatim``), the recorded pre-verack feature messages, then ``verack``;
- then the played side's recorded messages in order, re-framed for the chosen network;
  recorded ``pong``s are dropped and live ``ping``s are answered instead;
- pacing: before the k-th message it waits, up to ``timeout``, until the live side has
  sent at least as many messages of each type as the recording shows by then (``fast``
  skips this);
- a report: what was sent and received, where it stalled, and a diff of the other
  side's message types, recorded against live.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import os
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from msgcap.capture.bip324 import V2Error, V2Session
from msgcap.capture.conversation import DamageReport, conversation, warn_damage
from msgcap.capture.framing import StreamError, v1_version_prefix
from msgcap.capture.records import Direction
from msgcap.errors import UsageError
from msgcap.parser.messages import Version, decode_message
from msgcap.parser.wire import DecodeError
from msgcap.proxy.v2 import Leg, Message, V1Leg, V2Leg, handshake

Transport = Literal["v1", "v2"]
"""What the replayer speaks when it dials (``--transport``); listening, it takes either."""

Side = Literal["peer", "node"]
"""Which recorded party the replayer plays: the peer said what the node received."""

SIDE_DIRECTION: dict[Side, Direction] = {"peer": Direction.RECV, "node": Direction.SENT}

HANDSHAKE = frozenset({"version", "verack", "wtxidrelay", "sendaddrv2", "sendtxrcncl"})
"""Types exchanged before ``verack``; the replayer's own handshake takes care of them."""
NOISE = frozenset({"ping", "pong"})
"""Types whose count depends on timing, not on the conversation."""


class ReplayError(Exception):
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


@dataclass(slots=True)
class Stall:
    before: int
    """Index (in played order) of the message that was waiting."""
    msgtype: str
    missing: dict[str, int]
    """Message types (and how many) the live side had not sent when the wait timed out."""


@dataclass(slots=True)
class Report:
    played: Side
    sent: int = 0
    received: int = 0
    sent_types: Counter[str] = field(default_factory=Counter)
    received_types: Counter[str] = field(default_factory=Counter)
    stalls: list[Stall] = field(default_factory=list)
    diff: list[dict[str, Any]] = field(default_factory=list)
    """Opcodes turning the recorded type sequence of the other side into the live one."""
    error: str | None = None
    seconds: float = 0.0
    transport: str = "v1"
    """The transport spoken with the live side."""

    @property
    def diverged(self) -> bool:
        return bool(self.stalls or self.diff or self.error)

    def to_json(self) -> dict[str, Any]:
        return {
            "played": self.played,
            "transport": self.transport,
            "sent": self.sent,
            "received": self.received,
            "sent_types": dict(self.sent_types),
            "received_types": dict(self.received_types),
            "stalls": [
                {"before": s.before, "msgtype": s.msgtype, "missing": s.missing}
                for s in self.stalls
            ],
            "diff": self.diff,
            "error": self.error,
            "diverged": self.diverged,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        lines = [
            f"replayed the recorded {self.played}: sent {self.sent} messages, received "
            f"{self.received} in {self.seconds:.1f}s",
        ]
        if self.error:
            lines.append(f"error: {self.error}")
        for s in self.stalls:
            missing = ", ".join(f"{n} {t}" for t, n in sorted(s.missing.items()))
            lines.append(
                f"stalled before message {s.before} ({s.msgtype}): still missing {missing}"
            )
        if self.diff:
            lines.append("the live side's messages differ from the recording (ping/pong ignored):")
            for d in self.diff:
                lines.append(
                    f"  {d['op']}: recorded[{d['recorded_at']}] {d['recorded']} -> "
                    f"live[{d['live_at']}] {d['live']}"
                )
        else:
            lines.append("the live side's message types match the recording (ping/pong ignored)")
        lines.append("DIVERGED" if self.diverged else "reproduced")
        return "\n".join(lines)


def _fresh_version(payload: bytes) -> bytes:
    """The recorded version with the current time and a new random nonce (as it was
    recorded when it does not decode)."""
    try:
        version = decode_message("version", payload)
    except DecodeError:
        return payload
    assert isinstance(version, Version)
    fresh = dataclasses.replace(version, timestamp=int(time.time()), nonce=random.getrandbits(64))
    return fresh.encode()


def _type_diff(recorded: list[str], live: list[str]) -> list[dict[str, Any]]:
    ops = difflib.SequenceMatcher(a=recorded, b=live, autojunk=False).get_opcodes()
    return [
        {
            "op": op,
            "recorded_at": i1,
            "recorded": recorded[i1:i2],
            "live_at": j1,
            "live": live[j1:j2],
        }
        for op, i1, i2, j1, j2 in ops
        if op != "equal"
    ]


class Replayer:
    def __init__(
        self,
        steps: list[Step],
        *,
        play: Side,
        magic: bytes,
        fast: bool = False,
        verbatim: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.steps = steps
        self.play = play
        self.magic = magic
        self.fast = fast
        self.verbatim = verbatim
        self.timeout = timeout
        self.report = Report(play)
        self._live: list[str] = []
        self._changed = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_done = False
        self._given_up: Counter[str] = Counter()
        """Messages a stall stopped waiting for: later waits do not wait for them again."""
        self.leg: Leg = V1Leg(magic)
        """The transport spoken with the live side (v1, or a BIP324 session)."""

    def _send(self, msgtype: str, payload: bytes) -> None:
        assert self._writer is not None
        self._writer.write(self.leg.encode([(msgtype, payload)]))
        self.report.sent += 1
        self.report.sent_types[msgtype] += 1

    def _received(self, messages: list[Message]) -> None:
        for msgtype, payload in messages:
            self.report.received += 1
            self.report.received_types[msgtype] += 1
            self._live.append(msgtype)
            if msgtype == "ping" and self._writer is not None:
                self._send("pong", bytes(payload))
        self._changed.set()

    async def _read(self, reader: asyncio.StreamReader, first: bytes = b"") -> None:
        try:
            data = first or await reader.read(1 << 16)
            while data:
                messages, _dropped, fatal = self.leg.receive(data)
                self._received(messages)
                if fatal is not None:
                    raise fatal
                data = await reader.read(1 << 16)
        except (StreamError, V2Error, ConnectionError) as e:
            self.report.error = f"live side: {e}"
        finally:
            self._changed.set()

    async def _wait_for(self, expected: Counter[str], before: int, msgtype: str) -> bool:
        """Wait until the live side has sent ``expected``; record a stall on timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            have = Counter(self._live) + self._given_up
            missing = {t: n - have[t] for t, n in expected.items() if have[t] < n}
            if not missing:
                return True
            left = deadline - time.monotonic()
            if left <= 0 or self._reader_done:
                self.report.stalls.append(Stall(before, msgtype, missing))
                self._given_up.update(missing)
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

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
        if early:
            self._received(early)
        played = SIDE_DIRECTION[self.play]
        mine = [s for s in self.steps if s.direction is played]
        theirs = [s for s in self.steps if s.direction is not played]
        version = next((s for s in mine if s.msgtype == "version"), None)
        if version is None:
            raise ReplayError(f"the recorded {self.play} side has no version message")
        verack_at = next((s.time for s in mine if s.msgtype == "verack"), None)
        features = [
            s
            for s in mine
            if s.msgtype in HANDSHAKE - {"version", "verack"}
            and (verack_at is None or s.time < verack_at)
        ]
        handshake_ids = {id(version), *(id(s) for s in features)}
        if verack_at is not None:
            handshake_ids |= {id(s) for s in mine if s.msgtype == "verack"}
        to_play = [s for s in mine if id(s) not in handshake_ids and s.msgtype != "pong"]
        expected_after = [s for s in theirs if s.msgtype not in HANDSHAKE | NOISE]

        reading = asyncio.create_task(self._read(reader, first))
        reading.add_done_callback(lambda _: setattr(self, "_reader_done", True))
        try:
            payload = version.payload if self.verbatim else _fresh_version(version.payload)
            if initiator:
                self._send("version", payload)
                await self._wait_for(Counter(version=1), 0, "(handshake)")
            else:
                await self._wait_for(Counter(version=1), 0, "(handshake)")
                self._send("version", payload)
            for s in features:
                self._send(s.msgtype, s.payload)
            self._send("verack", b"")
            await writer.drain()
            await self._wait_for(Counter(verack=1), 0, "(first message)")
            for k, step in enumerate(to_play):
                if not self.fast:
                    expected = Counter(s.msgtype for s in expected_after if s.time < step.time)
                    await self._wait_for(expected, k, step.msgtype)
                self._send(step.msgtype, step.payload)
                await writer.drain()
            final = Counter(s.msgtype for s in expected_after)
            await self._wait_for(final, len(to_play), "(end)")
            await asyncio.sleep(0.2)  # let in-flight replies arrive
        except ConnectionError as e:
            self.report.error = f"connection lost: {e}"
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
        recorded = [s.msgtype for s in theirs if s.msgtype not in HANDSHAKE | NOISE]
        live = [t for t in self._live if t not in HANDSHAKE | NOISE]
        self.report.diff = _type_diff(recorded, live)
        self.report.seconds = time.monotonic() - started
        return self.report


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
    """Dial a live node and play one side of the recording to it, over v1 or BIP324."""
    reader, writer = await asyncio.open_connection(host, port)
    replayer = Replayer(steps, play=play, **options)
    if transport == "v1":
        return await replayer.run(reader, writer, initiator=True)
    session = V2Session(initiator=True, magic=replayer.magic)
    try:
        async with asyncio.timeout(replayer.timeout or None):
            early = await handshake(_StreamIO(reader, writer), session)
    except (V2Error, ConnectionError, TimeoutError) as e:
        writer.close()
        replayer.report.transport = "v2"
        replayer.report.error = f"BIP324 handshake failed: {type(e).__name__}: {e}"
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
    ready: asyncio.Future[tuple[str, int]] | None = None,
    accept_timeout: float = 60.0,
    **options: Any,
) -> Report:
    """Wait for one client and play one side of the recording to it."""
    conn: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if conn.done():
            w.close()
            return
        conn.set_result((r, w))

    server = await asyncio.start_server(on_client, host, port)
    try:
        if ready is not None:
            ready.set_result(server.sockets[0].getsockname()[:2])
        reader, writer = await asyncio.wait_for(conn, accept_timeout)
    finally:
        server.close()
    replayer = Replayer(steps, play=play, **options)
    try:
        leg, early, first = await _accept_transport(reader, writer, replayer)
    except (V2Error, ConnectionError, TimeoutError) as e:
        writer.close()
        replayer.report.error = f"no transport: {type(e).__name__}: {e}"
        return replayer.report
    return await replayer.run(reader, writer, initiator=False, leg=leg, early=early, first=first)
