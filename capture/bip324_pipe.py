"""Handing one direction of a ``decrypt`` relay to the native per-read step.

Under the proxy's ``decrypt`` policy, once both legs' handshakes are over, what one
session receives is decrypted, captured and re-encrypted by the other's sending cipher
for a whole read at once by the type ``Pipe`` of the capture layer's native module
(``msgcap.capture._capture``; its source is ``capture/_v2.c``: OpenSSL's ChaCha20 and
ChaCha20-Poly1305), loaded with :func:`msgcap.capture.native.load`. This module gives it
the two sessions' ciphers (:func:`native_pipe`) and words what it reports as the Python
path does (:func:`pipe_error`, :func:`pipe_dropped`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from msgcap.capture import native
from msgcap.capture.bip324_events import (
    InvalidMessageType,
    UnknownShortId,
    V2Error,
    V2ErrorReason,
    bad_tag_message,
    oversize_message,
)

if TYPE_CHECKING:
    from msgcap.capture._capture import Pipe
    from msgcap.capture.bip324 import V2Session

_native = native.load("msgcap.capture._capture")  # built where OpenSSL's headers exist
NativePipe: type[Pipe] | None = None if _native is None else _native.Pipe
"""The native step, or None (not built, or ``MSGCAP_PURE_PYTHON`` set)."""

NATIVE_PIPE: Final = NativePipe is not None
"""Whether :func:`native_pipe` hands connections to the native step (else the sessions'
Python path runs; ``MSGCAP_PURE_PYTHON=1`` forces that)."""

_PIPE_ERRORS: Final = {1: V2ErrorReason.OVERSIZE, 2: V2ErrorReason.BAD_TAG}


def native_pipe(
    receiver: V2Session, sender: V2Session, pipe_type: type[Pipe] | None = None
) -> Pipe | None:
    """One direction of a ``decrypt`` relay in native code: what ``receiver`` receives,
    captured and re-encrypted by ``sender``'s sending cipher. Both sessions give those
    directions up (see :meth:`V2Session.take_receiver`). None where the native part was
    not built or is switched off (unless ``pipe_type`` is given): then nothing is taken."""
    pipe_type = pipe_type or NativePipe
    if pipe_type is None or not sender.sender_ready:  # take nothing: the Python path goes on
        return None
    try:
        recv, rest, offset = receiver.take_receiver()
    except RuntimeError:
        return None
    pipe = pipe_type(recv, sender.take_sender(), offset)
    if rest:
        count, _, _, dropped, error = pipe.feed(rest, 0)
        assert count == 0 and dropped is None and error is None  # an incomplete packet
    return pipe


def pipe_error(error: tuple[int, int, int, int]) -> V2Error:
    """The :class:`V2Error` for a native pipe's ``error`` (as the Python path words it)."""
    code, number, length, offset = error
    if _PIPE_ERRORS[code] is V2ErrorReason.OVERSIZE:
        return V2Error(V2ErrorReason.OVERSIZE, oversize_message(length), offset)
    return V2Error(V2ErrorReason.BAD_TAG, bad_tag_message(number, length), offset)


def pipe_dropped(dropped: list[tuple[int, bytes]]) -> list[tuple[int, str]]:
    """A native pipe's dropped packets as the Python path describes them, with the
    short id (0 for an invalid long type)."""
    return [
        (sid, UnknownShortId(sid).describe() if sid else InvalidMessageType(raw).describe())
        for sid, raw in dropped
    ]
