"""Helpers that compare msgcap's decoding with Core's test framework (verystable)."""

from __future__ import annotations

from io import BytesIO
from typing import Any

from verystable.core.p2p import MESSAGEMAP

from tests.core_reference import to_jsonable


def reference_body(msgtype: str, payload: bytes) -> Any:
    """The body Core's parser prints for a payload its classes can decode."""
    cls = MESSAGEMAP[msgtype.encode()]
    msg = cls(None) if msgtype == "filteradd" else cls()
    msg.deserialize(BytesIO(payload))
    return to_jsonable(msg)


def with_documented_deviations(msgtype: str, payload: bytes, ref: Any) -> Any:
    """Core's output with the corrections DESIGN.md §6 documents, derived from the payload.

    - getheaders/getblocks: Core leaves ``locator.nVersion`` null; we print the wire value.
    - filteradd: Core prints ``{"d": null, "a": null, "t": null}``; we print the data.
    """
    if msgtype in ("getheaders", "getblocks") and isinstance(ref, dict):
        ref = dict(ref)
        ref["locator"] = dict(ref["locator"])
        ref["locator"]["nVersion"] = int.from_bytes(payload[:4], "little", signed=True)
    if msgtype == "filteradd" and isinstance(ref, dict):
        n = payload[0]
        assert n < 0xFD, "test vectors keep filteradd data short"
        ref = {"data": payload[1 : 1 + n].hex()}
    return ref


def correct_message(msg: dict[str, Any], payload: bytes | None = None) -> dict[str, Any]:
    """A message dict from Core's parser output, with the documented deviations applied."""
    if "body" not in msg or "error" in msg:
        return msg
    body = msg["body"]
    if msg["msgtype"] in ("getheaders", "getblocks"):
        if payload is None:
            raise ValueError("need the payload to restore locator.nVersion")
        body = with_documented_deviations(msg["msgtype"], payload, body)
    elif msg["msgtype"] == "filteradd":
        if payload is None:
            raise ValueError("need the payload to restore filteradd data")
        body = with_documented_deviations("filteradd", payload, body)
    return {**msg, "body": body}
