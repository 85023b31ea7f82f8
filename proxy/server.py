"""The proxy: listeners for routes and SOCKS5, connection setup, shutdown.

Only the I/O: plain objects decide what to answer a SOCKS5 client (``socks5.Negotiation``),
how to go on after the first bytes (``policy.FirstBytes``) and whether to admit a
connection (``policy.Admission``); this module reads, feeds them, writes what they answer."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from msgcap.capture import native
from msgcap.capture.bip324 import V2Session, session_id_hex
from msgcap.capture.bip324_events import V2Error
from msgcap.capture.bip324_pipe import NATIVE_PIPE
from msgcap.capture.errors import MsgcapError
from msgcap.capture.framing import Message
from msgcap.capture.layout import peer_folder_name
from msgcap.capture.records import Direction
from msgcap.capture.writer import LinkRefused
from msgcap.proxy import socks5, transparent
from msgcap.proxy.budget import FrameBudget
from msgcap.proxy.config import (
    CaptureErrorPolicy,
    Config,
    HostPort,
    Route,
    Socks5,
    Transparent,
    V2Policy,
)
from msgcap.proxy.conn import Conn, accept, connect
from msgcap.proxy.events import (
    Close,
    ConnectionLimit,
    EventLog,
    Listen,
    LiveView,
    Open,
    ResourceExhausted,
    SocksError,
    Stop,
    Timeout,
    UpstreamError,
    V2Fallback,
    V2SessionEvent,
    V2StreamError,
)
from msgcap.proxy.flow import DirectionStats
from msgcap.proxy.listener import Listener, RateLimit, bind, is_exhaustion
from msgcap.proxy.metrics import Metrics
from msgcap.proxy.policy import Admission, FirstBytes, Opening, Verdict
from msgcap.proxy.relay import Relay, Side
from msgcap.proxy.store import CaptureStopped, CaptureStore
from msgcap.proxy.v2 import (
    HandshakeClosed,
    Leg,
    MessageRelay,
    V1Leg,
    V2Leg,
    handshake,
)
from msgcap.proxy.worker import CaptureWorker

log = logging.getLogger("msgcap")


async def connect_any(host: str | Sequence[str], port: int, timeout: float, mark: int = 0) -> Conn:
    """Connect to the first address of ``host`` (or of the first of several hosts) that
    accepts; raise the first error. ``mark``: SO_MARK on the socket (transparent route)."""
    loop = asyncio.get_running_loop()
    hosts = (host,) if isinstance(host, str) else tuple(host)
    async with asyncio.timeout(timeout or None):
        infos = []
        first: OSError | None = None
        for h in hosts:
            try:
                infos += await loop.getaddrinfo(h, port, type=socket.SOCK_STREAM)
            except OSError as e:
                first = first or e
        for family, _type, proto, _name, addr in infos:
            try:
                sock = socket.socket(family, socket.SOCK_STREAM, proto)
            except OSError as e:
                first = first or e
                continue
            try:
                transparent.set_mark(sock, mark)
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
            except OSError as e:
                sock.close()
                first = first or e
                continue
            return await connect(sock)
        raise first or OSError(f"no address for {', '.join(hosts)}")


async def negotiate(
    conn: Conn, negotiation: socks5.Negotiation, timeout: float
) -> socks5.Request | socks5.Fail:
    """Move bytes between ``conn`` and a SOCKS5 negotiation until it has a result."""
    try:
        async with asyncio.timeout(timeout or None):
            while negotiation.result is None:
                data = await conn.read(negotiation.wanted)
                for out in negotiation.receive_data(data) if data else negotiation.receive_eof():
                    if isinstance(out, socks5.Send):
                        conn.write(out.data)
    except TimeoutError:
        negotiation.timed_out()
    assert negotiation.result is not None
    return negotiation.result


def tune_allocator() -> None:
    """Keep freed large buffers in the process (glibc only; elsewhere nothing happens).

    Relaying 1 MB messages allocates and frees a megabyte-sized buffer per message and
    per step; by default glibc maps each with mmap and returns the heap top to the kernel,
    so every buffer comes back as fresh pages (about 240 page faults per MB). Raising the
    mmap and trim thresholds keeps up to 128 MiB of freed heap for reuse: measured under
    ``v2 = "decrypt"``, 0.3-0.6 ms less CPU per MB.
    """
    libc = native.libc()
    with contextlib.suppress(AttributeError):  # not glibc: no mallopt
        if libc is not None:
            libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD


class StartupError(MsgcapError):
    """The proxy cannot start: a one-line reason that names the step (capture directory,
    event log, listener, metrics), the file or address, and the cause (exit status 1; a
    bad config is a :class:`~msgcap.capture.errors.ConfigError`, exit status 2, before this)."""


def _startup_error(step: str, error: OSError) -> StartupError:
    """``<step>: <cause>`` for an OSError of a start-up step."""
    if isinstance(error, LinkRefused):
        return StartupError(f"{step}: {error}")
    if isinstance(error, socket.gaierror):
        cause = f"cannot resolve the host ({error.strerror or error})"
    elif error.errno and error.errno > 0:
        cause = os.strerror(error.errno)  # not the wording of whoever raised it
    else:
        cause = error.strerror or str(error) or type(error).__name__
    if error.filename and str(error.filename) not in step:
        cause += f" ({error.filename})"
    return StartupError(f"{step}: {cause}")


def _close(conn: Conn | None) -> None:
    if conn is not None:
        conn.close()


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics() if config.metrics is not None else None
        self.metrics_address: tuple[str, int] | None = None
        try:
            self.events = EventLog(config.event_log_path, self.metrics,
                                   beneath=config.capture_dir)  # fmt: skip
        except OSError as e:
            raise _startup_error(f"cannot open event log {config.event_log_path}", e) from None
        self.store = CaptureStore(config, self.events, self.metrics)
        self.live = LiveView() if config.live else None
        self.worker = CaptureWorker()
        self.budget = FrameBudget(config.limits.frame_buffer_bytes)
        self.servers: list[Listener] = []
        self.exhaustion = RateLimit(EXHAUSTION_LOG_INTERVAL)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.admission = Admission(config.limits.max_connections)

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if not self.store.writable and self.config.on_capture_error is CaptureErrorPolicy.STOP:
            await self.stop()
            raise StartupError(f"{self.store.problem} (on_capture_error is 'stop')")
        if self.config.v2 is V2Policy.DECRYPT and not NATIVE_PIPE:
            log.warning("native BIP324 step not in use (not built, or pure Python forced)")
        try:
            for route in self.config.routes:
                await self._listen(route.listen, functools.partial(self._on_route, route),
                                   route.kind)  # fmt: skip
                self.events.emit(
                    Listen(route=route.kind, listen=str(route.listen),
                           upstream=str(route.upstream), node_name=route.node_name)
                )  # fmt: skip
            if self.metrics is not None and self.config.metrics is not None:
                self.metrics.watch(lambda: self.admission.active, lambda: self.store.total,
                                   lambda: self.worker.queued)  # fmt: skip
                at = self.config.metrics
                try:
                    self.metrics_address = self.metrics.serve(
                        at.host, at.port, functools.partial(self._accept_failed, f"metrics {at}")
                    )
                except OSError as e:
                    raise _startup_error(f"cannot serve metrics on {at}", e) from None
            for socks in self.config.socks5:
                await self._listen(socks.listen, functools.partial(self._on_socks, socks,
                                   socks5.AllowList(socks.allow)), "socks5")  # fmt: skip
                self.events.emit(
                    Listen(route="socks5", listen=str(socks.listen), node_name=socks.node_name)
                )
            for tp in self.config.transparent:
                try:
                    transparent.check_mark(tp.mark)
                except OSError as e:
                    raise _startup_error(
                        f"cannot set SO_MARK 0x{tp.mark:x} for the transparent route on "
                        f"{tp.listen} (needs CAP_NET_ADMIN; mark = 0 sets none)",
                        e,
                    ) from None
                await self._listen(tp.listen, functools.partial(self._on_transparent, tp),
                                   "transparent", transparent.allow_tproxy)  # fmt: skip
                self.events.emit(Listen(route="transparent", listen=str(tp.listen),
                                        upstream=tp.node, node_name=tp.node_name))  # fmt: skip
        except BaseException:
            await self.stop()
            raise

    async def _listen(
        self,
        at: HostPort,
        handler: Callable[[Conn], Awaitable[None]],
        kind: str,
        setup: Callable[[socket.socket], None] | None = None,
    ) -> None:
        async def run(conn: Conn) -> None:
            try:
                await handler(conn)
            except asyncio.CancelledError:
                pass  # shutdown; finishing normally keeps asyncio from logging it

        def spawn(conn: Conn) -> None:
            task = asyncio.get_running_loop().create_task(run(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

        try:
            sockets = bind(at.host, at.port)
        except OSError as e:
            raise _startup_error(f"cannot listen on {at} ({kind})", e) from None
        if setup is not None:
            for sock in sockets:
                setup(sock)
        bound = str(HostPort(*sockets[0].getsockname()[:2]))
        listener = Listener(
            sockets,
            functools.partial(accept, on_open=spawn),
            functools.partial(self._accept_failed, bound),
        )
        listener.start()
        self.servers.append(listener)

    def _accept_failed(self, where: str, error: OSError) -> None:
        """A listener's ``accept()`` failed (it pauses and tries again by itself)."""
        if is_exhaustion(error):
            self._exhausted(f"accept on {where}", error)
        elif self.exhaustion.allow(f"accept error on {where}", time.monotonic()) is not None:
            log.warning("accept on %s failed: %s", where, describe_error(error))

    def _exhausted(
        self, where: str, error: BaseException, conn: int | None = None, peer: str | None = None
    ) -> None:
        """Log running out of descriptors or socket memory (``error``: anything, only those
        are logged), at most once every :data:`EXHAUSTION_LOG_INTERVAL` seconds per place."""
        if not isinstance(error, OSError) or not is_exhaustion(error):
            return
        held = self.exhaustion.allow(where, time.monotonic())
        if held is None:
            return
        code = errno.errorcode.get(error.errno or 0, str(error.errno))
        self.events.emit(
            ResourceExhausted(
                where=where,
                error=f"{code}: {os.strerror(error.errno or 0)}",
                held_back=held,
                open_connections=self.admission.active,
                conn=conn,
                peer=peer,
            )
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) of each listener, routes first, in config order."""
        out = []
        for s in self.servers:
            host, port = s.sockets[0].getsockname()[:2]
            out.append((host, port))
        return out

    async def stop(self) -> None:
        """Stop accepting, close every connection, flush and close files."""
        for s in self.servers:
            s.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for s in self.servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
        # Everything forwarded is queued for capture: let the capture thread finish it.
        await asyncio.get_running_loop().run_in_executor(None, self.worker.close)
        self.events.emit(Stop(captured_bytes=self.store.total))
        self.events.close()
        if self.metrics is not None:
            self.metrics.close()

    def handle_signals(self) -> asyncio.Event:
        """SIGINT and SIGTERM set the returned event (install before announcing)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return stop

    async def run_until(self, stop: asyncio.Event) -> None:
        await stop.wait()
        await self.stop()

    # --- connections ----------------------------------------------------------------

    def _admit(self, conn: Conn, kind: str) -> int | None:
        """The connection's id, or None when it was dropped at the limit (logged)."""
        admitted = self.admission.admit(kind, _peername(conn))
        if isinstance(admitted, ConnectionLimit):
            self.events.emit(admitted)
            conn.abort()
            return None
        return admitted

    async def _on_route(self, route: Route, conn: Conn) -> None:
        conn_id = self._admit(conn, route.kind)
        if conn_id is None:
            return
        client = _peername(conn)
        if route.peer is not None:
            peer = peer_folder_name(route.peer.host, route.peer.port)
        else:
            peer = peer_folder_name(*conn.peer_address())
        upstream: Conn | None = None
        try:
            first = await self._initial(conn_id, conn, peer)
            if first is None:
                return
            upstream = await self._connect(conn_id, peer, route.upstream)
            if upstream is None:
                return
            await self._relay(
                conn_id,
                route.kind,
                client,
                peer,
                route.peer is not None,
                conn,
                upstream,
                first,
                route.upstream,
                route.node_name,
            )
        finally:
            self.admission.release()
            _close(conn)
            _close(upstream)

    async def _on_transparent(self, route: Transparent, conn: Conn) -> None:
        """A connection the kernel redirected here: relayed to its original destination;
        the node is the client unless that destination is the node's own address."""
        conn_id = self._admit(conn, "transparent")
        if conn_id is None:
            return
        client = _peername(conn)
        upstream: Conn | None = None
        try:
            assert conn.transport is not None
            sock = conn.transport.get_extra_info("socket")
            try:
                dest = transparent.original_destination(sock)
                listener_port = int(sock.getsockname()[1])
            except OSError as e:
                peer = peer_folder_name(*conn.peer_address())
                self.events.emit(UpstreamError(conn=conn_id, peer=peer, upstream="?",
                    error=f"no original destination: {describe_error(e)}"))  # fmt: skip
                return
            decision = transparent.classify(dest, listener_port, route.node)
            outbound = decision.kind is transparent.Kind.OUTBOUND
            peer = decision.peer(conn.peer_address())
            if decision.kind is transparent.Kind.LOOP:
                self.events.emit(UpstreamError(conn=conn_id, peer=peer, upstream=str(dest),
                                               error=f"refused: {decision.reason}"))  # fmt: skip
                conn.abort()
                return
            first = await self._initial(conn_id, conn, peer)
            if first is None:
                return
            upstream = await self._connect(conn_id, peer, decision.upstream, route.mark)
            if upstream is None:
                return
            await self._relay(conn_id, "transparent", client, peer, outbound, conn, upstream,
                              first, decision.upstream, route.node_name, route.mark)  # fmt: skip
        finally:
            self.admission.release()
            _close(conn)
            _close(upstream)

    async def _on_socks(self, cfg: Socks5, allow: socks5.AllowList, conn: Conn) -> None:
        conn_id = self._admit(conn, "socks5")
        if conn_id is None:
            return
        client = _peername(conn)
        upstream: Conn | None = None
        try:
            negotiation = socks5.Negotiation(cfg)
            req = await negotiate(conn, negotiation, self.config.limits.handshake_timeout)
            if isinstance(req, socks5.Fail):
                self.events.emit(SocksError(conn=conn_id, client=client, error=req.reason))
                if req.reply is not None:
                    with contextlib.suppress(ConnectionError):
                        await conn.drain()
                return
            peer = peer_folder_name(req.host, req.port)
            dest = HostPort(req.host, req.port)
            try:
                upstream = await self._socks_dial(allow, req)
            except (OSError, TimeoutError, socks5.SocksError) as e:
                self._exhausted("upstream connect", e, conn_id, peer)
                code = socks5.reply_for(e)
                self.events.emit(SocksError(conn=conn_id, client=client, peer=peer,
                    destination=str(dest), error=describe_error(e), reply=code.name))  # fmt: skip
                conn.write(socks5.reply_bytes(code))
                with contextlib.suppress(ConnectionError):
                    await conn.drain()
                return
            conn.write(socks5.reply_bytes(socks5.Reply.SUCCEEDED))
            await conn.drain()
            first = await self._initial(conn_id, conn, peer, negotiation.trailing)
            if first is None:
                return
            await self._relay(
                conn_id, "socks5", client, peer, True, conn, upstream, first, dest, cfg.node_name
            )
        except (ConnectionError, OSError) as e:
            self.events.emit(SocksError(conn=conn_id, client=client, error=str(e)))
        finally:
            self.admission.release()
            _close(conn)
            _close(upstream)

    async def _socks_dial(self, allow: socks5.AllowList, req: socks5.Request) -> Conn:
        """Connect to a SOCKS5 destination the listener's allow list admits: a name that
        only address entries can admit is resolved first, and then only the admitted
        addresses are dialed. Raises :class:`socks5.SocksError` (reply 2) when refused,
        also when such a name does not resolve (the reply does not tell whether a name
        exists)."""
        timeout = self.config.limits.handshake_timeout
        verdict = allow.decide(req.host, req.port)
        if isinstance(verdict, socks5.Resolve):
            addresses: list[str] = []
            try:
                async with asyncio.timeout(timeout or None):
                    infos = await asyncio.get_running_loop().getaddrinfo(
                        verdict.host, req.port, type=socket.SOCK_STREAM
                    )
                addresses = [str(info[4][0]) for info in infos]
            except (OSError, TimeoutError) as e:  # no address: refused
                self._exhausted("name lookup", e)
            verdict = allow.resolved(req.host, req.port, addresses)
        if isinstance(verdict, socks5.Refuse):
            raise socks5.SocksError(verdict.reason, verdict.reply)
        return await connect_any(verdict.hosts, req.port, timeout)

    async def _initial(
        self, conn_id: int, conn: Conn, peer: str, received: bytes = b""
    ) -> Verdict | None:
        """How to relay, from the initiator's first bytes (``received``: those already
        read); None to close the connection (logged)."""
        decision = FirstBytes(self.config.magic, self.config.v2, conn_id, peer)
        verdict = decision.receive_data(received)
        try:
            async with asyncio.timeout(self.config.limits.handshake_timeout or None):
                while verdict is None:
                    data = await conn.read(decision.wanted)
                    verdict = decision.receive_data(data) if data else decision.receive_eof()
        except TimeoutError:
            verdict = decision.timed_out()
        except (ConnectionError, OSError):
            return None
        if verdict.event is not None:
            self.events.emit(verdict.event)
        return None if verdict.opening is Opening.CLOSE else verdict

    async def _connect(self, conn_id: int, peer: str, to: HostPort, mark: int = 0) -> Conn | None:
        try:
            return await connect_any(to.host, to.port, self.config.limits.handshake_timeout, mark)
        except (OSError, TimeoutError) as e:
            self._exhausted("upstream connect", e, conn_id, peer)
            self.events.emit(
                UpstreamError(conn=conn_id, peer=peer, upstream=str(to), error=describe_error(e))
            )
            return None

    async def _v2_legs(
        self,
        conn_id: int,
        peer: str,
        node_is_client: bool,
        client_side: Conn,
        upstream: Conn,
        first: bytes,
        upstream_addr: HostPort,
        mark: int = 0,
    ) -> tuple[tuple[Leg, Leg], tuple[list[Message], list[Message]], Conn | None] | None:
        """Set up both legs of a BIP324 connection under ``decrypt``: the client's as its
        responder, the upstream's as initiator (v1 if it closes first: then a new
        upstream connection is returned). None when it failed (logged)."""
        magic = self.config.magic
        responder = V2Session(initiator=False, magic=magic)
        initiator = V2Session(initiator=True, magic=magic)
        replaced: Conn | None = None

        def session_event(leg: str, role: str, session: V2Session) -> None:
            assert session.session_id is not None
            self.events.emit(V2SessionEvent(conn=conn_id, peer=peer, leg=leg, role=role,
                node=node_is_client == (leg == "client"),
                session_id=session_id_hex(session.session_id)))  # fmt: skip

        async def client_leg() -> list[Message]:
            early = await handshake(client_side, responder, first)
            session_event("client", "responder", responder)
            return early

        async def upstream_leg() -> tuple[Leg, list[Message]]:
            nonlocal replaced
            try:
                early = await handshake(upstream, initiator)
            except (HandshakeClosed, ConnectionError) as e:
                self.events.emit(V2Fallback(conn=conn_id, peer=peer, leg="upstream",
                                            error=describe_error(e)))  # fmt: skip
                upstream.close()
                replaced = await connect_any(
                    upstream_addr.host,
                    upstream_addr.port,
                    self.config.limits.handshake_timeout,
                    mark,
                )
                return V1Leg(magic), []
            session_event("upstream", "initiator", initiator)
            return V2Leg(initiator), early

        # The client side sends the node's bytes when the node is the client.
        client_dir = Direction.SENT if node_is_client else Direction.RECV
        failing = client_dir
        try:
            async with asyncio.timeout(self.config.limits.handshake_timeout or None):
                async with asyncio.TaskGroup() as tg:
                    a = tg.create_task(client_leg())
                    b = tg.create_task(upstream_leg())
            leg_b, early_b = b.result()
            return (V2Leg(responder), leg_b), (a.result(), early_b), replaced
        except* V2Error as group:
            e = group.exceptions[0]
            assert isinstance(e, V2Error)
            if b.done() and not b.cancelled() and b.exception() is e:
                failing = client_dir.opposite
            self.events.emit(V2StreamError(conn=conn_id, peer=peer, direction=failing,
                                           reason=e.reason.value, detail=str(e)))  # fmt: skip
        except* TimeoutError:
            self.events.emit(Timeout(conn=conn_id, peer=peer, during="BIP324 handshake"))
        except* (ConnectionError, OSError) as group:
            error = group.exceptions[0]
            if a.done() and not a.cancelled() and a.exception() is error:  # the client left
                reason = f"closed during the BIP324 handshake ({describe_error(error)})"
                self.events.emit(Close(conn=conn_id, peer=peer, reason=reason))
            else:
                self._exhausted("upstream connect", error, conn_id, peer)
                self.events.emit(UpstreamError(conn=conn_id, peer=peer,
                    upstream=str(upstream_addr), error=describe_error(error)))  # fmt: skip
        _close(replaced)
        return None

    async def _relay(
        self,
        conn_id: int,
        route: str,
        client: str,
        peer: str,
        node_is_client: bool,
        client_side: Conn,
        upstream: Conn,
        verdict: Verdict,
        upstream_addr: HostPort,
        node_name: str | None,
        mark: int = 0,
    ) -> None:
        decrypt = verdict.opening is Opening.V2_DECRYPT
        raw = verdict.opening is Opening.V2_PASSTHROUGH
        first = verdict.first
        replaced: Conn | None = None
        if decrypt:
            legs = await self._v2_legs(
                conn_id, peer, node_is_client, client_side, upstream, first, upstream_addr, mark
            )
            if legs is None:
                return
            (leg_a, leg_b), early, replaced = legs
            if replaced is not None:
                upstream = replaced
            first = b""
        try:
            capture = self.store.open(peer, conn_id, enabled=not raw, node_name=node_name)
        except CaptureStopped:
            _close(replaced)
            return
        args = (conn_id, peer, self.config.magic, capture, self.events, self.live,
                self.config.limits.idle_timeout, self.worker)  # fmt: skip
        relay = (
            MessageRelay(*args, legs=(leg_a, leg_b), early=early, budget=self.budget)
            if decrypt
            else Relay(*args, raw=raw, budget=self.budget)
        )
        # The node's received bytes come from the side that is not the node.
        a = Side(client_side, Direction.SENT if node_is_client else Direction.RECV)
        b = Side(upstream, Direction.RECV if node_is_client else Direction.SENT)
        self.events.emit(
            Open(
                conn=conn_id,
                route=route,
                client=client,
                peer=peer,
                node="client" if node_is_client else "upstream",
                node_name=node_name,
                capture=str(capture.writer.folder) if capture.writer else None,
            )
        )
        try:
            await relay.run(a, b, first)
        finally:
            _close(replaced)

            def finish() -> None:  # in the capture thread, after this connection's frames
                capture.close()
                recv, sent = (
                    (a.stats, b.stats) if a.direction is Direction.RECV else (b.stats, a.stats)
                )
                self.events.emit(
                    Close(
                        conn=conn_id,
                        route=route,
                        peer=peer,
                        reason=relay.close_reason,
                        recv=_stats(recv),
                        sent=_stats(sent),
                        captured_bytes=capture.bytes,
                        node_name=node_name,
                    )
                )

            self.worker.submit(finish)


EXHAUSTION_LOG_INTERVAL = 5.0
"""Seconds between two ``resource_exhausted`` events for one place."""


def describe_error(e: BaseException) -> str:
    """``ConnectionRefusedError: Connection refused`` rather than asyncio's wording."""
    detail = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _stats(s: DirectionStats) -> dict[str, int]:
    return {"bytes": s.bytes, "messages": s.messages, "captured": s.captured, "invalid": s.invalid}


def _peername(conn: Conn) -> str:
    host, port = conn.peer_address()
    return str(HostPort(host, port))
