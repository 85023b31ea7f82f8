"""msgcap's Python API for tests: capturing proxies, captures as typed messages, replay.

The pytest fixtures (:mod:`msgcap.pytest_plugin`, entry point ``pytest11``) are thin
wrappers over this module, which they import only when a test uses them, so that having
msgcap installed costs other projects' pytest runs next to nothing.

- :func:`start_proxy` / :func:`proxy_factory` (fixture ``msgcap_proxy(config)``): start a
  capturing proxy (the ``msgcap proxy`` TOML keys, as a dict) on its own event loop in a
  background thread, and get a :class:`RunningProxy`: its listen addresses, capture
  folder, typed messages captured so far and event log.
- :func:`load_capture` (fixture ``msgcap_capture(path, ...)``): a capture folder or files
  as a time-ordered list of :class:`CapturedMessage` with typed messages.
- :func:`replay` (fixture ``msgcap_replay(path, to="HOST:PORT", ...)``): play one side of
  a capture against a live node and return the
  :class:`msgcap.proxy.replay_conversation.Report`: ``.diverged`` (substantive divergence
  only), ``.substantive`` and ``.benign`` (lists of ``Divergence``), ``.reached``,
  ``.answered``, ``.summary()``. Usable from sync and async
  tests alike (it runs its own event loop in a thread). With several targets
  (``to=[A, B]``, or ``listen=`` with ``connections=N``) it plays the same recording into
  each and returns a :class:`msgcap.proxy.diff.DiffReport` of how the nodes differ.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

import orjson

from msgcap.capture.framing import parse_magic
from msgcap.capture.layout import peer_folder_name
from msgcap.capture.records import Direction
from msgcap.parser.messages import Message, Unknown, decode_message
from msgcap.proxy.config import Config, HostPort, config_from_dict
from msgcap.proxy.diff import DiffReport, compare, replay_many
from msgcap.proxy.replay import Transport, replay_listen, replay_to
from msgcap.proxy.replay_conversation import Report
from msgcap.proxy.replay_plan import Side, Step, load_conversation
from msgcap.proxy.server import Proxy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    time: int
    direction: Direction
    """``recv`` or ``sent`` (a string enum), from the recorded node's point of view."""
    msgtype: str
    message: Message | Unknown
    """The typed message (``msgcap.parser.messages``), or ``Unknown``."""
    payload: bytes


def _typed(steps: Iterable[Step]) -> list[CapturedMessage]:
    return [
        CapturedMessage(
            s.time, s.direction, s.msgtype, decode_message(s.msgtype, s.payload), s.payload
        )
        for s in steps
    ]


def load_capture(*paths: str | os.PathLike[str]) -> list[CapturedMessage]:
    """Decode a capture; raises ``msgcap.parser.wire.DecodeError`` on an undecodable
    payload."""
    return _typed(load_conversation(paths))


@overload
def replay(
    *paths: str | os.PathLike[str],
    to: str,
    play: Side | None = ...,
    network: str = ...,
    fast: bool = ...,
    verbatim: bool = ...,
    transport: Transport = ...,
    timeout: float = ...,
) -> Report: ...


@overload
def replay(
    *paths: str | os.PathLike[str],
    to: list[str] | tuple[str, ...],
    play: Side | None = ...,
    network: str = ...,
    fast: bool = ...,
    verbatim: bool = ...,
    transport: Transport = ...,
    timeout: float = ...,
) -> DiffReport: ...


@overload
def replay(
    *paths: str | os.PathLike[str],
    listen: str,
    connections: int = ...,
    play: Side | None = ...,
    network: str = ...,
    fast: bool = ...,
    verbatim: bool = ...,
    transport: Transport = ...,
    timeout: float = ...,
    on_listening: Callable[[str, int], None] | None = ...,
) -> Report | DiffReport: ...


def replay(
    *paths: str | os.PathLike[str],
    to: str | list[str] | tuple[str, ...] | None = None,
    listen: str | None = None,
    connections: int = 1,
    play: Side | None = None,
    network: str = "regtest",
    fast: bool = False,
    verbatim: bool = False,
    transport: Transport = "v1",
    timeout: float = 10.0,
    on_listening: Callable[[str, int], None] | None = None,
) -> Report | DiffReport:
    """Blocking replay; with ``listen``, ``on_listening(host, port)`` is called once the
    listener is up (start the client under test there), and the first client that sends
    its ``version`` is played to. ``transport="v2"`` speaks BIP324 to the node given by
    ``to``; a listening replayer takes whichever the client speaks.

    Differential replay, as ``msgcap replay --to A --to B`` and ``--listen --connections
    N --diff``: ``to=[A, B, ...]`` (a list, even of one) plays the same recording into
    each node at once, and ``listen=`` with ``connections=N`` (from 2) into the first N
    clients; either returns a :class:`~msgcap.proxy.diff.DiffReport` (``.diverged``,
    ``.substantive``, ``.benign``, ``.names()``, ``.reports``)."""
    if (to is None) == (listen is None):
        raise ValueError("give exactly one of to= or listen=")
    if connections < 1 or (to is not None and connections != 1):
        raise ValueError("connections= takes a number from 1, and only with listen=")
    steps = load_conversation(paths)
    options: dict[str, Any] = {"magic": parse_magic(network), "fast": fast,
                               "verbatim": verbatim, "timeout": timeout}  # fmt: skip

    async def run() -> Report | DiffReport:
        if isinstance(to, str):
            target = HostPort.parse(to, "to")
            return await replay_to(steps, target.host, target.port, play=play or "peer",
                                   transport=transport, **options)  # fmt: skip
        if to is not None:
            targets = [HostPort.parse(t, "to") for t in to]
            reports = await replay_many(steps, [(t.host, t.port) for t in targets],
                                        play=play or "peer", transport=transport,
                                        **options)  # fmt: skip
            return compare([str(t) for t in targets], reports) if len(reports) > 1 else \
                DiffReport([str(t) for t in targets], reports, [], [])  # fmt: skip
        assert listen is not None
        target = HostPort.parse(listen, "listen")
        ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        if on_listening is not None:
            ready.add_done_callback(lambda f: on_listening(*f.result()))
        reports = await replay_listen(steps, target.host, target.port, play=play or "node",
                                      connections=connections, ready=ready,
                                      transcript=connections > 1, **options)  # fmt: skip
        if connections == 1:
            return reports[0]
        if len(reports) < 2:
            raise TimeoutError(f"{len(reports)} of {connections} clients connected")
        return compare([f"client {i}" for i in range(1, len(reports) + 1)], reports)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


# --- a live proxy -----------------------------------------------------------------------


class RunningProxy:
    """A capturing :class:`~msgcap.proxy.server.Proxy` on its own event loop in a
    background thread, usable from sync and async tests alike.

    Started (every listener bound) when the constructor returns; :meth:`stop` (or leaving
    a ``with`` block) closes every connection, flushes and closes the capture files and
    the event log, and ends the thread. Queries made after the stop read the files.
    """

    TIMEOUT = 30.0
    """Seconds to wait for the proxy thread (start, stop) or the capture thread (flush)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._proxy: Proxy | None = None
        self._listening: list[tuple[str, int]] = []
        self._error: BaseException | None = None
        self._stopped = False
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="msgcap-proxy", daemon=True
        )
        self._thread.start()
        try:
            started.result(self.TIMEOUT)
        except BaseException:
            self.stop()
            raise

    # --- the proxy's thread -----------------------------------------------------------

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        try:
            asyncio.run(self._main(started))
        except BaseException as e:  # reported by the constructor or by stop()
            if not started.done():
                started.set_exception(e)
            else:
                self._error = e

    async def _main(self, started: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        proxy = Proxy(self.config)
        await proxy.start()  # on failure it has stopped itself
        self._proxy = proxy
        self._listening = proxy.addresses
        started.set_result(None)
        try:
            await self._stopping.wait()
        finally:
            await proxy.stop()

    # --- addresses --------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """Every listener's bound ``host:port`` (ports 0 in the config resolved), routes
        first in config order, then SOCKS5."""
        return [str(HostPort(host, port)) for host, port in self._listening]

    def address(self, i: int = 0) -> str:
        """The ``i``-th listener's ``host:port`` (see :attr:`addresses`)."""
        return self.addresses[i]

    @property
    def routes(self) -> list[str]:
        """The route listeners' ``host:port``, in config order (``-connect=`` these)."""
        return self.addresses[: len(self.config.routes)]

    @property
    def socks5(self) -> str | None:
        """The (first) SOCKS5 listener's ``host:port`` (``-proxy=`` this), or None."""
        listeners = self.socks5_listeners
        return listeners[0] if listeners else None

    @property
    def socks5_listeners(self) -> list[str]:
        """Every SOCKS5 listener's ``host:port``, in config order (``[[socks5]]``)."""
        return self.addresses[len(self.config.routes) :]

    # --- captures ---------------------------------------------------------------------

    @property
    def capture_dir(self) -> Path:
        return self.config.capture_dir

    @property
    def event_log(self) -> Path:
        return self.config.event_log_path

    def node_dir(self, node: str | None = None) -> Path:
        """The capture root of a named node (``node_name`` of its listeners), or of the
        unnamed ones."""
        return self.capture_dir if node is None else self.capture_dir / node

    def peer_dir(self, peer: str, node: str | None = None) -> Path:
        """The capture folder of a peer, given as ``host:port`` (as in the config or
        ``-connect=``) or as its folder name (``127.0.0.1_18444``), for a named node or
        the unnamed ones. It may not exist yet."""
        if ":" in peer:
            hp = HostPort.parse(peer, "peer")
            peer = peer_folder_name(hp.host, hp.port)
        return self.node_dir(node) / peer

    def peers(self, node: str | None = None) -> list[str]:
        """The folder names of the peers captured so far (of a named node, or of the
        unnamed ones)."""
        self.flush()
        root = self.node_dir(node)
        if not root.is_dir():
            return []
        names = {n for n in self._node_names() if node is None}
        return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in names)

    def _node_names(self) -> set[str]:
        names = [r.node_name for r in self.config.routes] + [
            s.node_name for s in self.config.socks5
        ]
        return {n for n in names if n}

    def messages(self, peer: str | None = None, node: str | None = None) -> list[CapturedMessage]:
        """The typed messages captured so far, in time order: of one peer (see
        :meth:`peer_dir`), or of every peer (of ``node``, or of every node) merged.
        Directions are from that node's point of view (``recv``: said by the peer).
        Everything the proxy has forwarded is in it (the capture thread is waited for);
        an empty list before the first capture."""
        folder = self.node_dir(node) if peer is None else self.peer_dir(peer, node)

        def read() -> list[Step]:  # in the capture thread: no write is half done
            if not folder.is_dir() or not any(folder.rglob("*.dat")):
                return []
            return load_conversation([folder])

        return _typed(self._in_capture_thread(read))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The event log so far (``{"ts": ..., "event": name, ...}`` each), optionally only
        the events called ``name``."""
        self.flush()
        try:
            data = self.event_log.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")[:-1]  # a line without its newline is still being written
        out: list[dict[str, Any]] = [orjson.loads(line) for line in lines if line]
        return [e for e in out if name is None or e.get("event") == name]

    def flush(self) -> None:
        """Wait until the capture thread has written everything the proxy has forwarded
        (and logged the ``close`` of every connection that has ended)."""
        self._in_capture_thread(lambda: None)

    def _in_capture_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by the capture thread after every job queued so far, or directly
        once the proxy has stopped."""
        loop, proxy = self._loop, self._proxy
        if self._stopped or loop is None or proxy is None:
            return fn()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            try:
                done.set_result(fn())
            except BaseException as e:
                done.set_exception(e)

        try:
            # Jobs are queued on the event loop only: after the frames it has forwarded.
            loop.call_soon_threadsafe(proxy.worker.submit, job)
        except RuntimeError:  # the loop has closed: the proxy has stopped
            return fn()
        try:
            return done.result(self.TIMEOUT)
        except concurrent.futures.TimeoutError:
            if not self._thread.is_alive():  # stopped meanwhile: the job ran or never will
                return fn()
            raise

    # --- lifetime ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the proxy: close its listeners and connections, flush and close the
        capture files and the event log. Safe to call twice; re-raises an error the proxy
        ended with."""
        if not self._stopped:
            self._stopped = True
            loop, stopping = self._loop, self._stopping
            if loop is not None and stopping is not None:
                try:
                    loop.call_soon_threadsafe(stopping.set)
                except RuntimeError:  # the loop has closed already
                    pass
            self._thread.join(self.TIMEOUT)
            if self._thread.is_alive():
                raise TimeoutError(f"msgcap proxy did not stop in {self.TIMEOUT:g}s")
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> RunningProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RunningProxy({', '.join(self.addresses)}, {self.capture_dir}, {state})"


def start_proxy(config: Mapping[str, Any]) -> RunningProxy:
    """Start a capturing proxy from a dict of ``msgcap proxy`` TOML keys (see
    ``config.example.toml``); raises ``ConfigError`` for a bad config and ``OSError`` when
    a listener cannot bind. Use ``with start_proxy(...) as proxy:`` or call ``stop()``."""
    return RunningProxy(config_from_dict(dict(config)))


class ProxyFactory(Protocol):
    def __call__(self, config: Mapping[str, Any] | None = None, /, **keys: Any) -> RunningProxy: ...


def proxy_factory(tmp_path: Path) -> Iterator[ProxyFactory]:
    """The ``msgcap_proxy`` fixture's body: yields a :class:`ProxyFactory` whose proxies
    capture under ``tmp_path`` unless told otherwise, and stops every one at the end."""
    started: list[RunningProxy] = []

    def start(config: Mapping[str, Any] | None = None, /, **keys: Any) -> RunningProxy:
        data = {k: v for k, v in {**(config or {}), **keys}.items() if v is not None}
        for key in ("capture_dir", "event_log"):
            if isinstance(data.get(key), os.PathLike):
                data[key] = os.fspath(data[key])
        if "capture_dir" not in data:
            data["capture_dir"] = str(tmp_path / f"msgcap_proxy{len(started)}")
        proxy = start_proxy(data)
        started.append(proxy)
        return proxy

    yield start
    errors: list[BaseException] = []
    for proxy in reversed(started):
        try:
            proxy.stop()
        except Exception as e:  # keep stopping the others
            errors.append(e)
    if errors:
        raise errors[0]
