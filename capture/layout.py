"""Where captures go: Core's peer folder names and the ``core`` and ``session`` layouts.

Core names a peer's folder ``CService::ToStringAddrPort()`` with every ``:`` replaced by
``_``. Names that did not come from an IP address (hostnames from SOCKS5 requests) are
escaped so that no name can leave the capture directory, and a name too long for one
folder (255 bytes) is shortened with a hash of the whole, so that distinct destinations
never share a folder.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Final, NamedTuple

RECV_FILE: Final = "msgs_recv.dat"
SENT_FILE: Final = "msgs_sent.dat"

_SAFE_NAME_CHAR = re.compile(r"[A-Za-z0-9.\-]")
_MAX_NAME = 255
"""NAME_MAX: the longest folder name, in bytes."""
_HASH_CHARS = 32
"""Hex digits of SHA-256 (128 bits) in a shortened name."""
_SHORTENED = "~"
"""Between a shortened name's prefix and its hash: escaping turns a ``~`` of a host name
into ``%7E``, so only shortened names hold one."""
SESSION_DIR = re.compile(r"^\d{8}T\d{6}\.\d{6}Z_\d+$")
_PEER_NAME = re.compile(r"(?P<host>.+)_(?P<port>[0-9]+)")


class Layout(enum.Enum):
    CORE = "core"
    """``<dir>/<peer>/msgs_{recv,sent}.dat``, appended to across sessions, as Core does."""
    SESSION = "session"
    """``<dir>/<peer>/<UTC start>_<connection id>/msgs_{recv,sent}.dat``, one per session."""


def addr_port_string(host: str, port: int) -> str:
    """Core's ``CService::ToStringAddrPort()`` for an IP literal or a name."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return f"{host}:{port}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"{ip.ipv4_mapped}:{port}"
        return f"[{ip.compressed}]:{port}"
    return f"{ip}:{port}"


def peer_folder_name(host: str, port: int) -> str:
    """The capture folder name for a peer, as Core names it, safe as one path component.

    IP literals are canonicalised like Core does (``[2001_db8__1]_8333``). Anything else
    is a name (from a SOCKS5 request or a config): characters outside ``[A-Za-z0-9.-]``
    and a leading dot are written as ``%XX``. A name that does not fit in one folder name
    (255 bytes with ``_<port>``) keeps its beginning and ends with ``~`` and 32 hex digits
    of the SHA-256 of the whole escaped name: distinct destinations never share a folder,
    and every name that fits is exactly Core's.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return addr_port_string(host, port).replace(":", "_")
    except ValueError:
        pass
    escaped = []
    for i, ch in enumerate(host):
        if _SAFE_NAME_CHAR.fullmatch(ch) and not (i == 0 and ch == "."):
            escaped.append(ch)
        else:
            escaped.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    name = "".join(escaped) or "%00"
    suffix = f"_{port}"
    if len(name) + len(suffix) <= _MAX_NAME:  # ASCII: characters are bytes
        return name + suffix
    digest = hashlib.sha256(name.encode("ascii")).hexdigest()[:_HASH_CHARS]
    prefix = name[: _MAX_NAME - len(suffix) - len(_SHORTENED) - _HASH_CHARS]
    cut = prefix.rfind("%", len(prefix) - 2)
    if cut >= 0:  # do not end inside a %XX escape
        prefix = prefix[:cut]
    return f"{prefix}{_SHORTENED}{digest}{suffix}"


def session_folder_name(start: dt.datetime, connection_id: int) -> str:
    """``<UTC start time>_<connection id>``, sortable and free of ``:``."""
    utc = start.astimezone(dt.UTC)
    return f"{utc:%Y%m%dT%H%M%S.%f}Z_{connection_id}"


def capture_folder(
    capture_dir: Path,
    peer: str,
    layout: Layout,
    *,
    start: dt.datetime | None = None,
    connection_id: int = 0,
) -> Path:
    """The folder that holds one connection's ``msgs_recv.dat`` and ``msgs_sent.dat``.

    Raises ValueError if ``peer`` is not one safe folder name (the result would not be
    inside ``capture_dir``). Nothing is looked up on disk: the writer opens the folders
    without following links (:class:`msgcap.capture.writer.CaptureWriter`).
    """
    if not peer or "/" in peer or "\\" in peer or peer in (".", "..") or "\0" in peer:
        raise ValueError(f"unsafe peer folder name {peer!r}")
    if len(peer.encode("utf-8", "surrogatepass")) > _MAX_NAME:
        raise ValueError(f"peer folder name {peer[:40]!r}... is longer than {_MAX_NAME} bytes")
    folder = capture_dir / peer
    if layout is Layout.SESSION:
        folder = folder / session_folder_name(start or dt.datetime.now(dt.UTC), connection_id)
    return folder


class CapturePath(NamedTuple):
    """Where a capture file sits: ``<above>/<peer>/[<session>/]msgs_*.dat``, in either
    layout (the one parser of capture paths; nothing is looked up on disk)."""

    above: Path
    """The folder that holds the peer folder: a capture root, or a node's folder in it."""
    peer: str
    session: str | None
    """The session folder's name (``layout = "session"``), or None."""

    @classmethod
    def of(cls, path: Path) -> CapturePath:
        folder = path.parent
        session = None
        if SESSION_DIR.match(folder.name):
            session, folder = folder.name, folder.parent
        return cls(folder.parent, folder.name, session)

    @classmethod
    def of_folder(cls, folder: Path) -> CapturePath:
        """:meth:`of` for the folder that holds the capture files."""
        return cls.of(folder / RECV_FILE)

    @property
    def peer_host_port(self) -> tuple[str, int] | None:
        """The peer folder name ``HOST_PORT`` split: the host as the name writes it (IPv6
        with ``_`` for ``:``, a name ``%XX``-escaped) and the port, which may be out of
        range in a folder not named by us; None for a name without ``_PORT``."""
        m = _PEER_NAME.fullmatch(self.peer)
        return (m["host"], int(m["port"])) if m else None
