"""Check a batch of frames as Core does and append the valid ones to a capture file.

This is the capture thread's one write path. :func:`write_checked` takes the frames of one
read (record header, payload pieces, the checksum the frame's header claims), checks each
payload's checksum, and appends the records of the valid ones with one ``writev()``. It
runs the native helper (``capture/_capture.c``: OpenSSL's SHA-256 and the write with the
GIL released once) when it was built, and the same work with ``hashlib`` and ``os.writev``
otherwise (``MSGCAP_PURE_PYTHON=1`` forces that, as for the parser's renderer).

Whatever goes wrong raises (``OSError`` from the disk, ``RuntimeError`` from OpenSSL, or
anything else): callers treat every exception here as a capture failure. A write that
fails part way through a batch (a full disk) is undone first: the file is cut back to
where the batch began, so it still ends on a whole record and later appends stay
readable. Both implementations do this.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from typing import Final

from msgcap.capture import native
from msgcap.capture.framing import checksum

BatchItem = tuple[bytes, tuple[bytes | memoryview, ...], bytes]
"""``(24-byte record header, payload pieces, expected 4 checksum bytes)``."""

WriteChecked = Callable[[int, list[BatchItem]], list[bool]]

_IOV_MAX: Final = 1024


def write_all(fd: int, parts: Sequence[bytes | memoryview]) -> int:
    """Append the concatenation of ``parts`` with ``writev()``, without joining them.

    A short write, which regular files only do when the disk is full, is completed with
    further writes. When a write fails part way, the file is cut back to where it ended
    before this call (:func:`undo_append`) and the error is raised: a file of whole records
    stays one, without the failed batch, and later appends are readable. Returns the bytes
    written.
    """
    if not parts:
        return 0
    try:
        start = os.lseek(fd, 0, os.SEEK_END)  # where this batch begins (O_APPEND)
    except OSError:
        start = -1  # not a file (a pipe): nothing to cut back
    total = 0
    try:
        for i in range(0, len(parts), _IOV_MAX):
            chunk = parts[i : i + _IOV_MAX]
            size = sum(map(len, chunk))
            n = os.writev(fd, chunk)
            if n < size:
                rest = memoryview(b"".join(chunk))[n:]
                while rest:
                    k = os.write(fd, rest)
                    if k <= 0:  # no progress: do not spin
                        raise OSError(errno.EIO, os.strerror(errno.EIO))
                    rest = rest[k:]
            total += size
    except BaseException as e:
        if start >= 0:
            undo_append(fd, start, e)
        raise
    return total


def undo_append(fd: int, start: int, error: BaseException) -> None:
    """Cut the file back to ``start`` bytes, where it ended before an append that
    ``error`` stopped part way. If that fails too, raise an OSError that says so (the
    file then ends in a torn record)."""
    try:
        if os.fstat(fd).st_size > start:
            os.ftruncate(fd, start)
    except OSError as e:
        code = getattr(error, "errno", None) or e.errno
        raise OSError(
            code,
            f"{getattr(error, 'strerror', None) or error}; and the file could not be cut "
            f"back to its last whole record at offset {start} ({e.strerror}): it ends in a "
            "torn record",
        ) from error


def python_write_checked(fd: int, batch: list[BatchItem]) -> list[bool]:
    """The pure-Python twin of the native helper (same arguments, result and errors)."""
    ok: list[bool] = []
    records: list[bytes | memoryview] = []
    for header, pieces, expected in batch:
        # One hashlib call per payload: it releases the GIL once, not once per piece.
        payload = pieces[0] if len(pieces) == 1 and type(pieces[0]) is bytes else b"".join(pieces)
        valid = checksum(payload) == expected
        ok.append(valid)
        if valid:
            records += (header, payload)
    if fd >= 0 and records:
        write_all(fd, records)
    return ok


_native = native.load("msgcap.capture._capture")  # built where OpenSSL's headers exist
native_write_checked: WriteChecked | None = None if _native is None else _native.write_checked
"""The native helper, or None (not built, or ``MSGCAP_PURE_PYTHON`` set)."""

NATIVE: Final = native_write_checked is not None
"""Whether :func:`write_checked` runs the native helper."""

write_checked: WriteChecked = native_write_checked or python_write_checked
"""``write_checked(fd, batch) -> list[bool]``: which frames are valid; the valid ones'
records are appended to ``fd`` in one write (``fd < 0``: check only, write nothing)."""
