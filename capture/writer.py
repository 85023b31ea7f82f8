"""Writing one connection's capture: the per-connection clock, the two files, and the
folders that lead to them, opened without following links.

Each record goes out in a single ``write()`` on a file opened with ``O_APPEND``, so a file
is valid up to its last complete record after a crash, and two connections to the same
peer can share files without tearing each other's records. A write that fails part way
(a full disk) is undone: see :func:`msgcap.capture.batch.write_all`.

Nothing under the capture directory is reached through a link. The capture directory
itself is opened as given (the user chose it, links included); from there down, every
folder is created and opened relative to its parent's descriptor with ``O_NOFOLLOW``, and
the files with ``O_NOFOLLOW`` too. A symbolic link found on the way is refused
(:class:`LinkRefused`), however late it was planted: there is no check-then-use gap.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from msgcap.capture.batch import write_all
from msgcap.capture.errors import MsgcapError
from msgcap.capture.layout import RECV_FILE, SENT_FILE
from msgcap.capture.records import Direction, encode_record

_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
_APPEND_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _CLOEXEC
# O_NONBLOCK: a FIFO planted where a file should be must not block the open.
_FILE_FLAGS: Final = _APPEND_FLAGS | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0)


class LinkRefused(MsgcapError, OSError):
    """A symbolic link (or something other than a folder or a regular file) where the
    capture tree needs a folder or a file: refused, nothing is written through it."""

    def __init__(self, path: Path, what: str = "a symbolic link") -> None:
        super().__init__(errno.ELOOP, f"{path} is {what}", str(path))
        self.path = path
        self.what = what

    def __str__(self) -> str:
        return (
            f"{self.path} is {self.what}: refused (nothing under the capture directory is "
            "written through a link)"
        )


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _one_component(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"unsafe folder or file name {name!r}")


def open_folder(root: Path, parts: Sequence[str] = ()) -> int:
    """A descriptor of the folder ``root/parts[0]/.../parts[-1]``, each part created if
    missing. ``root`` is created and opened as given (links and all: the user chose it);
    every part below it is opened relative to its parent without following a link, and a
    link there raises :class:`LinkRefused`."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file where the folder should be: the open says "Not a directory"
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(root)) from None
    where = root
    try:
        for name in parts:
            _one_component(name)
            where = where / name
            try:
                os.mkdir(name, 0o777, dir_fd=fd)  # never follows a link: EEXIST for one
            except FileExistsError:
                pass
            try:
                child = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, name):
                    raise LinkRefused(where) from None
                raise OSError(e.errno, e.strerror, str(where)) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_append(dir_fd: int, name: str, shown: Path) -> int:
    """Open (or create) the file ``name`` in the folder ``dir_fd`` for appending, without
    following a link; ``shown`` is its path for errors. Anything but a regular file there
    is refused (:class:`LinkRefused`)."""
    _one_component(name)
    try:
        fd = os.open(name, _FILE_FLAGS, 0o644, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) and _is_link(dir_fd, name):
            raise LinkRefused(shown) from None
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise LinkRefused(shown, "not a regular file") from None
        raise OSError(e.errno, e.strerror, str(shown)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LinkRefused(shown, "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(root: Path, path: Path) -> int:
    """Open the file ``path``, which is in ``root`` (lexically), for appending: the folders
    from ``root`` down and the file itself without following links (see
    :func:`open_folder`)."""
    *folders, name = path.relative_to(root).parts
    dir_fd = open_folder(root, folders)
    try:
        return open_append(dir_fd, name, path)
    finally:
        os.close(dir_fd)


def open_log(path: Path, *, beneath: Path | None = None) -> int:
    """Open the file ``path`` for appending: through :func:`open_beneath` when it is
    inside the folder ``beneath`` (by its names), else as given (folders created, links
    followed: the user chose the path)."""
    if beneath is not None:
        root, full = (Path(os.path.normpath(p.absolute())) for p in (beneath, path))
        if full != root and full.is_relative_to(root):
            return open_beneath(root, full)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a file where a folder should be: the open says "Not a directory"
    return os.open(path, _APPEND_FLAGS, 0o644)


def probe_writable(root: Path) -> None:
    """Create and remove a file in ``root`` (created if missing); raise OSError when that
    cannot be done. The probe's name is random and it is created exclusively, so a link
    planted in advance is never opened."""
    fd = open_folder(root)
    try:
        name = f".msgcap-probe-{os.getpid()}-{secrets.token_hex(8)}"
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
                         0o600, dir_fd=fd))  # fmt: skip
        os.unlink(name, dir_fd=fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(root)) from None
    finally:
        os.close(fd)


class Clock:
    """Microsecond timestamps, strictly increasing across both directions of a connection.

    ``t = max(now_us, last_t + 1)``: merging recv and sent by time gives the exact order
    in which the messages were completed.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0

    def stamps(self, n: int) -> int:
        """The first of ``n`` consecutive timestamps for messages completed together (by
        one read); the next call starts after the last of them."""
        t = time.time_ns() // 1000
        if t <= self._last:
            t = self._last + 1
        self._last = t + n - 1
        return t

    def used(self, t0: int, n: int) -> None:
        """``n`` stamps from ``t0`` (the first free one, as ``stamps(0)`` returns it) were
        given to messages counted only afterwards (a native pipe's read)."""
        if n:
            self._last = max(self._last, t0 + n - 1)


class CaptureWriter:
    """The two capture files of one connection, open for its whole life.

    ``root`` is the capture directory that holds ``folder``: every folder from it down to
    ``folder``, and the two files, are opened without following links (a link raises
    :class:`LinkRefused`). Without it, ``folder`` itself is taken as given and only the
    files are opened that way.
    """

    def __init__(self, folder: Path, *, root: Path | None = None) -> None:
        self.folder = folder
        parts = () if root is None else folder.relative_to(root).parts
        dir_fd = open_folder(folder if root is None else root, parts)
        try:
            self._recv_fd = open_append(dir_fd, RECV_FILE, folder / RECV_FILE)
            try:
                self._sent_fd = open_append(dir_fd, SENT_FILE, folder / SENT_FILE)
            except BaseException:
                os.close(self._recv_fd)
                raise
        finally:
            os.close(dir_fd)
        self.closed = False

    def fd(self, direction: Direction) -> int:
        """The descriptor of one file (the direction is from the node's point of view)."""
        return self._recv_fd if direction is Direction.RECV else self._sent_fd

    def write(self, direction: Direction, time_us: int, msgtype: str, payload: bytes) -> int:
        """Append one record. Returns its size."""
        return self.write_parts(direction, [encode_record(time_us, msgtype, payload)])

    def write_parts(self, direction: Direction, parts: Sequence[bytes | memoryview]) -> int:
        """Append the concatenation of ``parts`` (whole records), with as few ``writev()``
        calls as the system allows (:func:`~msgcap.capture.batch.write_all`); on failure the
        file is left as it was."""
        return write_all(self.fd(direction), parts)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self._recv_fd, self._sent_fd):
            try:
                os.close(fd)
            except OSError:
                pass
