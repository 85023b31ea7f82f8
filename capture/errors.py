"""The errors msgcap's commands share: each one is a one-line reason and an exit status.

Every command ends in exactly one of three ways (DESIGN §10): exit status 0 when it did
what was asked, 2 with one line ``msgcap: error: REASON`` for bad usage or config, 1 with
such a line for everything else. The command-line dispatcher (:func:`msgcap.cli.main`)
prints the line for a :class:`MsgcapError` (its ``exit_status``), for an ``OSError``
(its file name and reason) and, as a last resort, for any other exception
(:func:`describe_exception`); it never prints a traceback.
"""

from __future__ import annotations

import os
import traceback


class MsgcapError(Exception):
    """Base of msgcap's own errors."""

    exit_status = 1


class UsageError(MsgcapError):
    """Bad paths or options: exit status 2."""

    exit_status = 2


class ConfigError(UsageError, ValueError):
    """A bad config file or flag: exit status 2 with this one-line reason."""


def describe_exception(e: BaseException) -> str:
    """An unexpected exception in one line: its type, its message and where it was raised
    (``RuntimeError: boom (at replay.py:812 in _settle)``)."""
    message = " ".join(str(e).split())
    text = f"{type(e).__name__}: {message}" if message else type(e).__name__
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        at = frames[-1]
        text += f" (at {os.path.basename(at.filename)}:{at.lineno} in {at.name})"
    return text


def describe_os_error(e: OSError, file: str | os.PathLike[str] | None = None) -> str:
    """An ``OSError`` as ``FILE: reason`` (``file`` when the error names none), without the
    ``[Errno N]`` noise: ``/dev/full: No space left on device``."""
    if isinstance(e.errno, int) and e.errno > 0:  # asyncio puts its own text in strerror
        reason = os.strerror(e.errno)
    else:  # getaddrinfo's negative codes come with their text
        reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
    name = e.filename if e.filename is not None else file
    if name is None:
        return reason
    text = os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else str(name)
    if e.filename2 is not None:
        text += f" -> {os.fsdecode(e.filename2)}"
    return f"{text}: {reason}"
