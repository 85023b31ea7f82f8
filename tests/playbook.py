"""A playbook for the proxy's set-up decisions: a script in, the commands out, no sockets.

After mitmproxy's ``tutils.Playbook``: a decision object (``socks5.Negotiation``,
``policy.FirstBytes``) is fed a script of what the other end does (bytes, :data:`EOF`,
:data:`TIMEOUT`) and answers what the proxy does; :func:`play` collects the answers.
After h11's tests, :func:`ways` gives the same bytes whole, a byte at a time and cut in
uneven pieces: a decision must not depend on how TCP split the stream.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol


class Input(enum.Enum):
    EOF = "eof"
    """The other end closed."""
    TIMEOUT = "timeout"
    """``handshake_timeout`` passed."""


EOF = Input.EOF
TIMEOUT = Input.TIMEOUT

Step = bytes | Input


class Decision(Protocol):
    """What :func:`play` drives: answers are a command, a list of them, or None."""

    @property
    def result(self) -> object: ...

    def receive_data(self, data: bytes) -> Any: ...

    def receive_eof(self) -> Any: ...

    def timed_out(self) -> Any: ...


def play(decision: Decision, script: Iterable[Step]) -> list[Any]:
    """Feed ``script`` until the decision has its result; every command it answered."""
    out: list[Any] = []
    for step in script:
        if decision.result is not None:
            break
        if step is EOF:
            got = decision.receive_eof()
        elif step is TIMEOUT:
            got = decision.timed_out()
        else:
            assert isinstance(step, bytes)
            got = decision.receive_data(step)
        if got is not None:
            out.extend(got if isinstance(got, list) else [got])
    return out


def ways(script: Iterable[Step]) -> Iterator[tuple[str, list[Step]]]:
    """The script's bytes as sent (``chunks``), all at once (``whole``), one byte at a
    time (``bytewise``) and in pieces of 3 (``uneven``); EOF and TIMEOUT stay last."""
    steps = list(script)
    data = b"".join(s for s in steps if isinstance(s, bytes))
    tail = [s for s in steps if isinstance(s, Input)]
    yield "chunks", steps
    yield "whole", [data, *tail]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))] + tail
    yield "uneven", [data[i : i + 3] for i in range(0, len(data), 3)] + tail


def play_every_way(make: Callable[[], Decision], script: Iterable[Step]) -> list[Any]:
    """:func:`play` each of :func:`ways`: the commands must be the same every way
    (consecutive sends joined), and are returned."""
    results = {name: merged(play(make(), steps)) for name, steps in ways(script)}
    first = results["chunks"]
    for name, got in results.items():
        assert got == first, f"fed {name}: {got} != {first}"
    return first


def merged(commands: list[Any]) -> list[Any]:
    """Consecutive commands with a ``data`` field (sends) joined into one."""
    out: list[Any] = []
    for c in commands:
        if out and hasattr(c, "data") and type(out[-1]) is type(c):
            out[-1] = type(c)(out[-1].data + c.data)
        else:
            out.append(c)
    return out
