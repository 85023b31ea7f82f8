"""Capture files as one conversation: a time-ordered stream of records, bounded memory.

This is the one reader of conversations: parse, stats, export, compare, replay and the
pytest fixtures all take their records from :func:`conversation` (or :func:`merged`).

The order is Core's parser's: a stable sort by time over the files in the order given.
Ties (equal times) go to the file given first; a folder's files are taken sorted by
path, so within one capture folder ``msgs_recv.dat`` comes before ``msgs_sent.dat``.
(msgcap's own captures never tie within a connection: its clock is strictly increasing
across both files.) Files Core wrote are in time order already, so they are merged as
streams; a file whose clock went backwards is indexed (offset and time per record) and
read in sorted order.

Damage (a truncated record, garbage, an unreadable file) is reported once per file
through a callback, with the file and byte offset, and everything readable before it is
still given. The default callback logs a warning.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from msgcap.capture.layout import SESSION_DIR, peer_of_capture_file
from msgcap.capture.records import (
    Damage,
    Direction,
    Record,
    read_record_at,
    read_record_headers,
    read_records,
)
from msgcap.errors import UsageError

log = logging.getLogger("msgcap")


@dataclass(frozen=True, slots=True)
class CaptureFile:
    path: Path
    direction: Direction
    peer: str
    """The peer folder's name."""
    node: str | None = None
    """The node folder's name, when the file was found under a capture root that holds
    one folder per node (``<root>/<node>/<peer>/msgs_*.dat``, see :func:`expand_paths`)."""

    @classmethod
    def at(cls, path: Path, root: Path | None = None) -> CaptureFile:
        """The capture file at ``path``; ``root`` is the folder it was found under."""
        node = None
        if root is not None:
            folders = list(path.relative_to(root).parts[:-1])
            if folders and SESSION_DIR.match(folders[-1]):
                folders.pop()
            if len(folders) >= 2:
                node = folders[-2]
        return cls(path, Direction.of_file(path), peer_of_capture_file(path), node)


@dataclass(frozen=True, slots=True)
class Item:
    """A record with the file it came from."""

    record: Record
    source: CaptureFile

    @property
    def direction(self) -> Direction:
        return self.source.direction


DamageReport = Callable[[CaptureFile, Damage], None]


def warn_damage(source: CaptureFile, damage: Damage) -> None:
    """The default damage report: one warning per damaged file."""
    log.warning("%s: at byte %d: %s", source.path, damage.offset, damage.reason)


def expand_paths(paths: Iterable[str]) -> list[CaptureFile]:
    """Files as given; folders become their ``*.dat`` files, recursively, sorted by path.

    Under a folder, a file two folders down (``<node>/<peer>/msgs_recv.dat``, a ``session``
    layout folder aside) belongs to the node named by the upper one: a capture root that
    holds several nodes' captures, as ``msgcap proxy`` writes for named nodes."""
    files: list[CaptureFile] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(q for q in path.rglob("*.dat") if q.is_file())
            if not found:
                raise UsageError(f"{p}: no .dat capture files in this folder")
            files.extend(CaptureFile.at(q, path) for q in found)
        elif path.exists():
            files.append(CaptureFile.at(path))
        else:
            raise UsageError(f"{p}: no such file or folder")
    return files


def _is_time_ordered(f: os.PathLike[str] | str) -> bool:
    last = -1
    with open(f, "rb") as fh:
        for item in read_record_headers(fh):
            if isinstance(item, Damage):
                break
            if item[1] < last:
                return False
            last = item[1]
    return True


def file_records(source: CaptureFile, on_damage: DamageReport) -> Iterator[Item]:
    """The records of one file in time order; damage goes to ``on_damage``."""
    try:
        ordered = _is_time_ordered(source.path)
        with open(source.path, "rb") as f:
            if ordered:
                for rec in read_records(f):
                    if isinstance(rec, Damage):
                        on_damage(source, rec)
                    else:
                        yield Item(rec, source)
                return
            index: list[tuple[int, int]] = []
            damage = None
            for entry in read_record_headers(f):
                if isinstance(entry, Damage):
                    damage = entry
                else:
                    index.append((entry[1], entry[0]))
            index.sort(key=lambda e: e[0])  # stable: equal times keep file order
            for _, offset in index:
                yield Item(read_record_at(f, offset), source)
            if damage is not None:
                on_damage(source, damage)
    except OSError as e:
        on_damage(source, Damage(0, f"cannot read file: {e.strerror or e}", 0))


def _ensure_open_files(n: int) -> None:
    """Merging keeps every file open: raise the soft limit on open files if needed."""
    try:
        import resource
    except ImportError:  # not on Unix: let open() say it
        return
    want = n + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft < want:
            raise UsageError(
                f"{n} capture files must be open at once, but the limit on open files is "
                f"{soft}: raise it (ulimit -n) or pass fewer files"
            )


def merged(files: list[CaptureFile], on_damage: DamageReport) -> Iterator[Item]:
    """All records of all files, stably sorted by time (ties: earlier file first)."""
    _ensure_open_files(len(files))
    streams = [file_records(f, on_damage) for f in files]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda item: item.record.time)


def folder_conversation(folder: Path, on_damage: DamageReport = warn_damage) -> Iterator[Item]:
    """The conversation of one capture folder: its ``msgs_recv.dat`` and ``msgs_sent.dat``
    (those that exist), merged by time, ``recv`` first on ties."""
    files = [folder / d.file_name for d in (Direction.RECV, Direction.SENT)]
    found = [CaptureFile.at(f) for f in files if f.is_file()]
    if not found:
        raise UsageError(f"{folder}: no {files[0].name} or {files[1].name} in this folder")
    return merged(found, on_damage)


def conversation(
    paths: Iterable[str | os.PathLike[str]], on_damage: DamageReport = warn_damage
) -> Iterator[Item]:
    """The records of capture files and folders (searched recursively for ``*.dat``) as
    one time-ordered stream, with the tie rule and damage reports of the module doc.

    Raises :class:`~msgcap.errors.UsageError` for a path that does not exist or a folder
    without capture files.
    """
    return merged(expand_paths(os.fspath(p) for p in paths), on_damage)
