"""Bitcoin Core's message-capture-parser.py loop, re-implemented on verystable's classes.

verystable is a PyPI copy of Core's test framework (v28). It is used here only as an
independent oracle in tests and as the baseline in benchmarks, never by msgcap itself.
Differences from Core v30 that matter for JSON: v28's CTransaction and CBlockHeader also
carry cached ``hash`` and ``sha256`` slots, which v30 removed; ``V30_DROPPED`` leaves them
out so the output has v30's shape.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Any

from verystable.core import messages as vm
from verystable.core.p2p import MESSAGEMAP

HASH_INTS = [
    "blockhash",
    "block_hash",
    "hash",
    "hashMerkleRoot",
    "hashPrevBlock",
    "hashstop",
    "prev_header",
    "sha256",
    "stop_hash",
]
HASH_INT_VECTORS = ["hashes", "headers", "vHave", "vHash"]

V30_DROPPED = {
    vm.CTransaction: ("hash", "sha256"),
    vm.CBlockHeader: ("hash", "sha256"),
    vm.CBlock: ("hash", "sha256"),
}


def _slots(obj: Any) -> Any:
    slots = obj.__slots__
    dropped = V30_DROPPED.get(type(obj))
    if dropped and not isinstance(slots, str):
        return [s for s in slots if s not in dropped]
    return slots


def to_jsonable(obj: Any) -> Any:
    """Core's to_jsonable (contrib/message-capture/message-capture-parser.py)."""
    if hasattr(obj, "__dict__"):
        return obj.__dict__
    elif hasattr(obj, "__slots__"):
        ret = {}
        for slot in _slots(obj):
            val = getattr(obj, slot, None)
            if slot in HASH_INTS and isinstance(val, int):
                ret[slot] = vm.ser_uint256(val).hex()
            elif slot in HASH_INT_VECTORS and all(isinstance(a, int) for a in val):
                ret[slot] = [vm.ser_uint256(a).hex() for a in val]
            else:
                ret[slot] = to_jsonable(val)
        return ret
    elif isinstance(obj, list):
        return [to_jsonable(a) for a in obj]
    elif isinstance(obj, bytes):
        return obj.hex()
    else:
        return obj


def process_file(path: str, messages: list[Any], recv: bool) -> None:
    """Core's process_file, without the progress bar and warnings."""
    with open(path, "rb") as f_in:
        while True:
            tmp_header_raw = f_in.read(8 + 4 + 12)
            if not tmp_header_raw:
                break
            tmp_header = BytesIO(tmp_header_raw)
            time = int.from_bytes(tmp_header.read(8), "little")
            msgtype = tmp_header.read(12).split(b"\x00", 1)[0]
            length = int.from_bytes(tmp_header.read(4), "little")
            msg_dict: dict[str, Any] = {}
            msg_dict["direction"] = "recv" if recv else "sent"
            msg_dict["time"] = time
            msg_dict["size"] = length
            msg_ser = BytesIO(f_in.read(length))
            if msgtype not in MESSAGEMAP:
                try:
                    msgtype_tmp = msgtype.decode()
                    if not msgtype_tmp.isprintable():
                        raise UnicodeDecodeError("utf-8", msgtype, 0, 1, "unprintable")
                    msg_dict["msgtype"] = msgtype_tmp
                except UnicodeDecodeError:
                    msg_dict["msgtype"] = "UNREADABLE"
                msg_dict["body"] = msg_ser.read().hex()
                msg_dict["error"] = "Unrecognized message type."
                messages.append(msg_dict)
                continue
            msg = MESSAGEMAP[msgtype]()
            msg_dict["msgtype"] = msgtype.decode()
            try:
                msg.deserialize(msg_ser)
            except KeyboardInterrupt:
                raise
            except Exception:
                msg_ser.seek(0, os.SEEK_SET)
                msg_dict["body"] = msg_ser.read().hex()
                msg_dict["error"] = "Unable to deserialize message."
                messages.append(msg_dict)
                continue
            if length:
                msg_dict["body"] = to_jsonable(msg)
            messages.append(msg_dict)


def parse_files(paths: list[str]) -> str:
    """Core's main(): all files, stable sort by time, one json.dumps."""
    messages: list[Any] = []
    for p in paths:
        process_file(p, messages, "recv" in os.path.splitext(os.path.basename(p))[0])
    messages.sort(key=lambda msg: msg["time"])
    return json.dumps(messages)
