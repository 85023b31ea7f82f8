"""Capture records to JSON-ready dicts, exactly as Core's message-capture-parser.py
shapes them (see the project's DESIGN.md §6 for where we deliberately differ)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from msgcap.capture.records import Direction, Record
from msgcap.parser.fastjson import FAST_BODIES, fast_body
from msgcap.parser.messages import MESSAGES
from msgcap.parser.wire import DecodeError, Reader, display_hash, wire_hash

UNRECOGNIZED: Final = "Unrecognized message type."
UNDECODABLE: Final = "Unable to deserialize message."

_BY_BYTES: Final[dict[bytes, tuple[str, type[Any]]]] = {
    name.encode("ascii"): (name, cls) for name, cls in MESSAGES.items()
}


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a record's body is printed as hex instead of decoded."""

    kind: str
    """``UNRECOGNIZED`` or ``UNDECODABLE``"""
    detail: str
    valid_input: bool
    """False when the input itself is invalid (bad payload, unreadable type)."""


def render(
    rec: Record, direction: Direction, display_hashes: bool = False
) -> tuple[dict[str, Any], Problem | None]:
    """One record as Core's parser renders it, and what went wrong with it, if anything.

    ``display_hashes`` renders hashes in RPC byte order instead of Core's wire order.
    """
    payload = rec.payload
    out: dict[str, Any] = {
        "direction": direction.value,
        "time": rec.time,
        "size": len(payload),
    }
    kind = rec.msgtype
    known = _BY_BYTES.get(kind.name)
    if known is None:
        text = kind.text
        out["msgtype"] = kind.label
        out["body"] = payload.hex()
        out["error"] = UNRECOGNIZED
        if text is None:
            return out, Problem(UNRECOGNIZED, f"unreadable message type {kind.name!r}", False)
        return out, Problem(UNRECOGNIZED, f"unrecognized message type {text!r}", True)
    msgtype, cls = known
    out["msgtype"] = msgtype
    try:
        if msgtype in FAST_BODIES:
            body = fast_body(msgtype, payload, display_hashes)
        else:
            r = Reader(payload, msgtype)
            msg = cls.read(r)
            r.finish()
            body = msg.json(display_hash if display_hashes else wire_hash)
    except DecodeError as e:
        out["body"] = payload.hex()
        out["error"] = UNDECODABLE
        return out, Problem(UNDECODABLE, str(e), False)
    if payload:
        out["body"] = body
    return out, None
