"""Replay one side of a recorded conversation against live software: the asyncio client.

:mod:`msgcap.proxy.replay_plan` reads the recording as a plan (what to send unasked,
what answers which request) and :mod:`msgcap.proxy.replay_conversation` answers the live
side from it, both without I/O; :class:`Replayer` moves the bytes over one connection,
:func:`replay_to` dials a node and :func:`replay_listen` waits for clients. Import
each name from the module that defines it: this one does not re-export the others'.

The end: once the live side has answered a ping of ours without making a new request in
the meantime it has processed everything we sent (a node handles one peer's messages in
order) and has nothing more to ask. The replay ends there if the live side has made the
recording's last answered request, else after ``timeout`` seconds without a new request.
A request the recording cannot answer ends it at most ``timeout`` seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any, Literal

from msgcap.capture.bip324 import V1_PREFIX_LEN, V2Session, classify_prefix
from msgcap.capture.bip324_events import V2Error
from msgcap.capture.errors import MsgcapError, describe_exception
from msgcap.capture.framing import Message, StreamError
from msgcap.parser import messages as m
from msgcap.parser.chain import try_decode
from msgcap.proxy.replay_conversation import Conversation, Divergence, Kind, Report
from msgcap.proxy.replay_plan import Recording, Side, Step
from msgcap.proxy.v2 import Leg, V1Leg, V2Leg, handshake

Transport = Literal["v1", "v2"]
"""What the replayer speaks when it dials (``--transport``); listening, it takes either."""


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


# --- moving the bytes -------------------------------------------------------------------


def _fresh_version(payload: bytes) -> bytes:
    """The recorded version with the current time and a new random nonce (as it was
    recorded when it does not decode)."""
    version = try_decode("version", payload)
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


class StreamIO:
    """An asyncio stream pair as :func:`msgcap.proxy.v2.handshake` reads and writes it (the
    replayer's, and a test's scripted node's)."""

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
            early = await handshake(StreamIO(reader, writer), session)
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
    first = b""
    async with asyncio.timeout(replayer.timeout or None):
        while (transport := classify_prefix(first, replayer.magic)) is None:
            chunk = await reader.read(V1_PREFIX_LEN - len(first))
            if not chunk:
                raise ConnectionError("the client closed before it said anything")
            first += chunk
        if transport == "v1":
            return V1Leg(replayer.magic), [], first
        session = V2Session(initiator=False, magic=replayer.magic)
        early = await handshake(StreamIO(reader, writer), session, first)
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
