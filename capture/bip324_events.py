"""What a BIP324 session reports: the short message type ids, the events, the errors.

The vocabulary of :mod:`msgcap.capture.bip324` (whose :class:`~msgcap.capture.bip324.V2Session`
makes these), kept apart so that the packet cipher (:mod:`msgcap.capture.bip324_cipher`)
and the native pipe's glue (:mod:`msgcap.capture.bip324_pipe`) can raise and describe the
same things without the session.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from msgcap.capture.errors import MsgcapError
from msgcap.capture.framing import MAX_PROTOCOL_MESSAGE_LENGTH, MSGTYPE_SIZE

# --- message types --------------------------------------------------------------------

MAX_CONTENTS_LEN: Final = 1 + MSGTYPE_SIZE + MAX_PROTOCOL_MESSAGE_LENGTH
"""Core's limit on a received packet's contents length (checked as soon as the 3 length
bytes are in): 0x00 + 12-byte type + 4,000,000 bytes of payload, i.e. 4,000,013. Longer
makes Core disconnect. (A short-id message may thus carry up to 4,000,012 payload bytes.)"""

V2_MESSAGE_IDS: Final[Mapping[int, str]] = {
    i: name
    for i, name in enumerate(
        (
            "addr", "block", "blocktxn", "cmpctblock", "feefilter", "filteradd",
            "filterclear", "filterload", "getblocks", "getblocktxn", "getdata",
            "getheaders", "headers", "inv", "mempool", "merkleblock", "notfound", "ping",
            "pong", "sendcmpct", "tx", "getcfilters", "cfilter", "getcfheaders",
            "cfheaders", "getcfcheckpt", "cfcheckpt", "addrv2",
        ),
        start=1,
    )
}  # fmt: skip
"""BIP324 short message type ids (1..28), as in Bitcoin Core's V2_MESSAGE_IDS."""

V2_SHORT_IDS: Final[Mapping[str, int]] = {name: i for i, name in V2_MESSAGE_IDS.items()}
"""Message type to its short id (the encoding Core uses whenever a type has one)."""

CORE_EMPTY_TYPE_IDS: Final = range(29, 33)
"""Short ids Core's table lists as "" (assigned, unimplemented): Core does not reject
these at the transport, it hands them on as a message of type "" (which
``-capturemessages`` records and net_processing then ignores). Ids from 33 on are dropped
by the transport ("invalid message type"). Neither disconnects."""


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Keys are derived from the peer's public key: we can send application packets.

    (The peer's version packet may not be in yet: see :class:`VersionPacket`.)"""

    session_id: bytes


@dataclass(frozen=True, slots=True)
class VersionPacket:
    """The peer's version packet authenticated (with the garbage it sent as AAD).

    Core ignores its contents (reserved for future versions; BIP324's version is empty)
    and from here on reports the connection as v2 with its session id."""

    contents: bytes


@dataclass(slots=True)  # not frozen: that would triple the cost of making one
class V2Message:
    """An application message. ``payload`` is bytes up to 16 KiB and a memoryview (over
    the decrypted packet, no copy) beyond. ``msgtype`` may be any type Core accepts on a
    v2 connection, including "" (12 NUL bytes) and 0x7f characters."""

    msgtype: str
    payload: bytes | memoryview


@dataclass(frozen=True, slots=True)
class UnknownShortId:
    """A packet whose 1-byte message type has no meaning (29..255). Core does not
    disconnect: ids 33..255 are dropped by its transport, ids 29..32 are passed on as a
    message of type "" (see :data:`CORE_EMPTY_TYPE_IDS`)."""

    id: int
    payload: bytes | memoryview = b""

    @property
    def core_delivers(self) -> bool:
        """Whether Core hands it to net_processing (and -capturemessages) as type ""."""
        return self.id in CORE_EMPTY_TYPE_IDS

    def describe(self) -> str:
        return f"unknown short id {self.id}"


@dataclass(frozen=True, slots=True)
class InvalidMessageType:
    """A packet Core drops (without disconnecting) as "invalid message type".

    ``raw`` is the 12-byte long message type when it has bytes outside 0x20..0x7f before
    its first NUL or non-NUL bytes after it; it is shorter than 12 bytes when the contents
    end before the type does (``b""`` for empty contents)."""

    raw: bytes

    def describe(self) -> str:
        return f"invalid message type {self.raw!r}"


Event = HandshakeComplete | VersionPacket | V2Message | UnknownShortId | InvalidMessageType


# --- errors ---------------------------------------------------------------------------


class V2ErrorReason(enum.Enum):
    """Why a BIP324 connection ends (each is a disconnect in Core, except V1_PEER)."""

    V1_PEER = "v1 peer"
    """Responder: the first 16 bytes are the v1 version header of our network (Core falls
    back to v1 on this; a V2Session cannot)."""
    WRONG_NETWORK = "v1 peer of another network"
    """Responder: bytes 4..16 are a v1 ``version`` type after another network's magic."""
    NO_GARBAGE_TERMINATOR = "no garbage terminator"
    """No garbage terminator within 4095 bytes of garbage."""
    BAD_TAG = "bad tag"
    """A packet failed authentication (wrong keys, tampering, or garbage AAD mismatch)."""
    OVERSIZE = "oversize packet"
    """A packet's contents length is above :data:`MAX_CONTENTS_LEN`."""


class V2Error(MsgcapError):
    """A condition on which Core gives up the connection; the stream cannot continue."""

    def __init__(self, reason: V2ErrorReason, message: str, offset: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.offset = offset
        """Received-stream offset at which the problem was found (-1 if unknown)."""


def oversize_message(length: int) -> str:
    """Why :attr:`V2ErrorReason.OVERSIZE`: a packet announced ``length`` bytes."""
    return f"packet contents length {length} above {MAX_CONTENTS_LEN}"


def bad_tag_message(number: int, length: int) -> str:
    """Why :attr:`V2ErrorReason.BAD_TAG`: packet ``number`` (of its direction, from 0)."""
    return f"packet {number} ({length} bytes contents) failed authentication"
