"""The dataset's bookkeeping: the manifest (what was exported so far, per capture file),
the runs that wrote part files, and the lock that lets one export at a time write.

The manifest is replaced atomically; it names the run being written (``pending_run``)
before any of its files exist, so that the files of a run that died are found and removed
by the next one, while the runs listed as committed are never touched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson

from msgcap.capture.errors import UsageError
from msgcap.capture.records import Damage, read_record_headers
from msgcap.parser.dataset.schema import SCHEMA_VERSION, TABLES, DatasetError

MANIFEST_NAME: Final = "_msgcap_manifest.json"
LOCK_NAME: Final = "_msgcap.lock"
FORMAT_NAME: Final = "msgcap parquet dataset"
FINGERPRINT_BYTES: Final = 4096


@dataclass(slots=True)
class FileState:
    """What the manifest knows of one capture file."""

    node: str
    peer: str
    connection: str | None
    direction: str
    offset: int = 0
    """Bytes exported so far: the end of the last record exported."""
    records: int = 0
    head_sha256: str = ""
    """SHA-256 of the first ``min(offset, 4096)`` bytes."""
    tail_sha256: str = ""
    """SHA-256 of the ``min(offset, 4096)`` bytes before ``offset``."""
    last_time: int = -1
    """The time of the last record exported."""
    first_header: str = ""
    """The first record's 24-byte header (time, type, length), hex: tells a file that
    was replaced by a shorter one from one that was truncated."""
    device: int = 0
    inode: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "peer": self.peer,
            "connection": self.connection,
            "direction": self.direction,
            "offset": self.offset,
            "records": self.records,
            "head_sha256": self.head_sha256,
            "tail_sha256": self.tail_sha256,
            "last_time": self.last_time,
            "first_header": self.first_header,
            "device": self.device,
            "inode": self.inode,
        }

    @classmethod
    def from_json(cls, d: Any) -> FileState:
        """From the manifest; ValueError naming the field when it is not what it should be."""
        if not isinstance(d, dict):
            raise ValueError("a file entry is not an object")
        connection = d.get("connection")
        if connection is not None and not isinstance(connection, str):
            raise ValueError("connection: not a string")
        direction = _field(d, "direction", str)
        if direction not in ("recv", "sent"):
            raise ValueError(f"direction: {direction!r}")
        state = cls(
            _field(d, "node", str),
            _field(d, "peer", str),
            connection,
            direction,
            _field(d, "offset", int),
            _field(d, "records", int, 0),
            _field(d, "head_sha256", str, ""),
            _field(d, "tail_sha256", str, ""),
            _field(d, "last_time", int, -1),
            _field(d, "first_header", str, ""),
            _field(d, "device", int, 0),
            _field(d, "inode", int, 0),
        )
        for name in ("offset", "records", "device", "inode"):
            if getattr(state, name) < 0:
                raise ValueError(f"{name}: negative")
        if state.last_time < -1:
            raise ValueError("last_time: below -1")
        return state


def _field(d: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``d[name]`` when it is of ``kind`` (bool is no int here); ``default`` when absent
    and there is one; else ValueError."""
    if name not in d and default is not None:
        return default
    value = d.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name}: {value!r} is not a {kind.__name__}")
    return value


RUN_ID: Final = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")
"""A run's id (:func:`new_run_id`): the only names a part file may carry."""


@dataclass(slots=True)
class Manifest:
    payload: bool
    files: dict[str, FileState] = field(default_factory=dict)
    runs: int = 0
    last_run: dict[str, Any] | None = None
    pending_run: str | None = None
    committed_runs: list[str] = field(default_factory=list)
    """Every run whose part files are in the dataset: never removed by a rollback."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "tables": [t.name for t in TABLES],
            "payload": self.payload,
            "runs": self.runs,
            "last_run": self.last_run,
            "pending_run": self.pending_run,
            "committed_runs": self.committed_runs,
            "files": {k: v.to_json() for k, v in sorted(self.files.items())},
        }


def read_manifest(out: Path) -> Manifest | None:
    """The manifest of a dataset, None when there is none; UsageError when unusable."""
    path = out / MANIFEST_NAME
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as e:
        raise UsageError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UsageError(f"{path}: not a msgcap dataset manifest")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UsageError(
            f"{out}: written with dataset schema version {version}, this msgcap writes and "
            f"reads version {SCHEMA_VERSION}: export into a new folder"
        )
    try:
        return _manifest_of(data)
    except ValueError as e:
        raise UsageError(
            f"{path}: damaged manifest ({e}): nothing was changed; restore it or export "
            "into a new folder"
        ) from None


def _manifest_of(data: dict[str, Any]) -> Manifest:
    """The manifest in ``data``; ValueError naming what is wrong."""
    payload = _field(data, "payload", bool, True)
    runs = _field(data, "runs", int, 0)
    if runs < 0:
        raise ValueError("runs: negative")
    last_run = data.get("last_run")
    if last_run is not None and not isinstance(last_run, dict):
        raise ValueError("last_run: not an object")
    pending = data.get("pending_run")
    if pending is not None and not (isinstance(pending, str) and RUN_ID.fullmatch(pending)):
        raise ValueError(f"pending_run: {pending!r} is not a run id")
    committed = data.get("committed_runs")
    if committed is None:  # written before the list was kept: its last run, at least
        last_id = None if last_run is None else last_run.get("id")
        committed = [last_id] if last_id is not None else []
    if not isinstance(committed, list):
        raise ValueError("committed_runs: not a list")
    for run_id in committed:
        if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
            raise ValueError(f"committed_runs: {run_id!r} is not a run id")
    if pending is not None and pending in committed:
        raise ValueError(f"pending_run {pending} is recorded as committed")
    files = _field(data, "files", dict, {})
    states = {}
    for key, value in files.items():
        if not os.path.isabs(key):
            raise ValueError(f"files: {key!r} is not an absolute path")
        try:
            states[key] = FileState.from_json(value)
        except ValueError as e:
            raise ValueError(f"files[{key!r}]: {e}") from None
    return Manifest(payload, states, runs, last_run, pending, list(committed))


def write_manifest(out: Path, manifest: Manifest) -> None:
    """Atomically: a reader sees the old manifest or the new one."""
    path = out / MANIFEST_NAME
    tmp = out / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(manifest.to_json(), option=orjson.OPT_INDENT_2) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fingerprint(f: BinaryIO, end: int) -> tuple[str, str]:
    n = min(end, FINGERPRINT_BYTES)
    f.seek(0)
    head = hashlib.sha256(f.read(n)).hexdigest()
    f.seek(end - n)
    tail = hashlib.sha256(f.read(n)).hexdigest()
    return head, tail


def _first_after(f: BinaryIO, last_time: int) -> int:
    """The offset of the first record later than ``last_time``, else of the end of the
    last complete record."""
    for entry in read_record_headers(f):
        if isinstance(entry, Damage):
            return entry.offset
        offset, t = entry
        if t > last_time:
            return offset
    return os.fstat(f.fileno()).st_size


def new_run_id() -> str:
    now = dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


def remove_run(out: Path, run_id: str | None, committed: Iterable[str] = ()) -> int:
    """Remove the part files of an interrupted run (``run_id``, never one of ``committed``)
    and stray temporary files: only real files in real folders of the dataset (a symlink
    is never followed, nor removed unless it is itself one of those names)."""
    if run_id is not None and (not RUN_ID.fullmatch(run_id) or run_id in set(committed)):
        raise UsageError(f"{out}: will not remove the files of run {run_id!r}")
    removed = 0
    for table in TABLES:
        root = out / table.name
        if root.is_symlink() or not root.is_dir():
            continue
        for dirpath, dirnames, names in os.walk(root):  # does not follow symlinks
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for name in names:
                stray = name.startswith(".part-") and name.endswith(".tmp")
                if stray or (run_id is not None and name.startswith(f"part-{run_id}-")):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
    return removed


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    with open(out / LOCK_NAME, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"{out}: another export is writing this dataset") from None
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def resume_offset(path: str, state: FileState, warn: Callable[[str], None]) -> int:
    """Where to resume in a known file (checking that it is still the same file); what was
    found is said through ``warn``."""
    st = os.stat(path)
    with open(path, "rb") as f:
        if st.st_size >= state.offset:
            if fingerprint(f, state.offset) == (state.head_sha256, state.tail_sha256):
                return state.offset
            warn(
                f"{path}: replaced since the last export (its bytes before offset "
                f"{state.offset} changed): exported again from the start; the rows exported "
                "from the earlier file stay in the dataset"
            )
            return 0
        n = min(state.offset, FINGERPRINT_BYTES)
        head_ok = st.st_size >= n and fingerprint(f, n)[0] == state.head_sha256
        first = bytes.fromhex(state.first_header)
        f.seek(0)
        if (st.st_size >= n and not head_ok) or f.read(len(first)) != first:
            warn(
                f"{path}: replaced since the last export (now {st.st_size} bytes, its first "
                "bytes changed): exported again from the start; the rows exported from the "
                "earlier file stay in the dataset"
            )
            return 0
        resume = _first_after(f, state.last_time)
        warn(
            f"{path}: truncated since the last export (now {st.st_size} bytes, "
            f"{state.offset} were exported): the rows exported before stay in the dataset; "
            f"the records after the last one exported (from byte {resume}) are exported"
        )
        return resume
