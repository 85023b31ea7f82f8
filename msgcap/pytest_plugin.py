"""pytest fixtures for turning captures into regression tests (entry point ``pytest11``).

- ``msgcap_capture(path, ...)``: a capture folder or files as a time-ordered list of
  :class:`CapturedMessage` with typed messages (``parser.messages``).
- ``msgcap_replay(path, to="HOST:PORT", ...)``: play one side of a capture against a live
  node and return the :class:`proxy.replay.Report` (``.diverged``, ``.stalls``,
  ``.diff``). Usable from sync and async tests alike (it runs its own event loop in a
  thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from msgcap.capture.framing import parse_magic
from msgcap.capture.records import Direction
from msgcap.parser.messages import Message, Unknown, decode_message
from msgcap.proxy.config import HostPort
from msgcap.proxy.replay import Report, Side, load_conversation, replay_listen, replay_to


@dataclass(frozen=True, slots=True)
class CapturedMessage:
    time: int
    direction: Direction
    """``recv`` or ``sent`` (a string enum), from the recorded node's point of view."""
    msgtype: str
    message: Message | Unknown
    """The typed message (``msgcap.parser.messages``), or ``Unknown``."""
    payload: bytes


def load_capture(*paths: str | os.PathLike[str]) -> list[CapturedMessage]:
    """Decode a capture; raises ``msgcap.parser.wire.DecodeError`` on an undecodable
    payload."""
    return [
        CapturedMessage(
            s.time,
            s.direction,
            s.msgtype,
            decode_message(s.msgtype, s.payload),
            s.payload,
        )
        for s in load_conversation(paths)
    ]


def replay(
    *paths: str | os.PathLike[str],
    to: str | None = None,
    listen: str | None = None,
    play: Side | None = None,
    network: str = "regtest",
    fast: bool = False,
    verbatim: bool = False,
    timeout: float = 10.0,
    on_listening: Callable[[str, int], None] | None = None,
) -> Report:
    """Blocking replay; with ``listen``, ``on_listening(host, port)`` is called once the
    listener is up (start the client under test there)."""
    if (to is None) == (listen is None):
        raise ValueError("give exactly one of to= or listen=")
    steps = load_conversation(paths)
    options: dict[str, Any] = {"magic": parse_magic(network), "fast": fast,
                               "verbatim": verbatim, "timeout": timeout}  # fmt: skip

    async def run() -> Report:
        if to is not None:
            target = HostPort.parse(to, "to")
            return await replay_to(steps, target.host, target.port, play=play or "peer",
                                   **options)  # fmt: skip
        assert listen is not None
        target = HostPort.parse(listen, "listen")
        ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        if on_listening is not None:
            ready.add_done_callback(lambda f: on_listening(*f.result()))
        return await replay_listen(steps, target.host, target.port, play=play or "node",
                                   ready=ready, **options)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


@pytest.fixture
def msgcap_capture() -> Callable[..., list[CapturedMessage]]:
    """``msgcap_capture(path, ...)`` -> list of CapturedMessage."""
    return load_capture


@pytest.fixture
def msgcap_replay() -> Callable[..., Report]:
    """``msgcap_replay(path, to="127.0.0.1:18444")`` -> Report."""
    return replay
