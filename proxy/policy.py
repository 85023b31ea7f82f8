"""Connection set-up decisions, made by plain objects with no sockets.

The asyncio server only moves bytes and acts on what these answer (as mitmproxy's
layers and h11 do), so every decision is tested without a socket or a wait:

- :class:`FirstBytes`: the initiator's first bytes decide how a connection is relayed:
  Bitcoin's v1 (they begin with the network's magic and ``version``), BIP324 decrypted
  or passed through as it is, or closed (under ``v2 = "downgrade"``, when the initiator
  closes before its first message, or when ``handshake_timeout`` passes), with the event
  to log.
- :class:`Admission`: connection ids and ``limits.max_connections``.

The SOCKS5 negotiation and allow list are :mod:`msgcap.proxy.socks5`'s, the transparent
route's loop check :func:`msgcap.proxy.transparent.classify`.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from msgcap.capture.bip324 import V1_PREFIX_LEN, classify_prefix
from msgcap.proxy.config import V2Policy
from msgcap.proxy.events import Close, ConnectionLimit, Event, Timeout, V2Downgrade, V2Passthrough


class Opening(enum.Enum):
    """How a connection goes on after its first bytes."""

    V1 = "v1"
    """Relay and capture Bitcoin's v1 messages."""
    V2_DECRYPT = "v2 decrypt"
    """BIP324: be each side's peer, decrypt, capture (``v2 = "decrypt"``)."""
    V2_PASSTHROUGH = "v2 passthrough"
    """BIP324: relay the bytes as they are, capture nothing (``v2 = "passthrough"``)."""
    CLOSE = "close"
    """Close the connection before anything reaches the other side."""


@dataclass(frozen=True, slots=True)
class Verdict:
    opening: Opening
    first: bytes = b""
    """Everything received so far, to pass on first (empty when closing)."""
    event: Event | None = None
    """What to log (None: nothing, the normal v1 and ``decrypt`` cases)."""


class FirstBytes:
    """Decides on a connection from the initiator's first bytes.

    Fed bytes (:meth:`receive_data`) it answers None while they still match the v1
    prefix of the network ``magic`` (the magic and ``version``: 16 bytes) and a
    :class:`Verdict` once they differ from it or make it whole, as Core's responder
    decides (:func:`~msgcap.capture.bip324.classify_prefix`); the initiator closing
    (:meth:`receive_eof`) or ``handshake_timeout`` passing (:meth:`timed_out`) close the
    connection. A reader
    asking for :attr:`wanted` bytes at a time never reads past the prefix.
    """

    def __init__(self, magic: bytes, policy: V2Policy, conn: int, peer: str) -> None:
        self.magic = magic
        self.policy = policy
        self.conn = conn
        self.peer = peer
        self.result: Verdict | None = None
        self._buffer = b""

    @property
    def wanted(self) -> int:
        """Bytes still missing for the prefix (0 once decided)."""
        return 0 if self.result is not None else V1_PREFIX_LEN - len(self._buffer)

    def receive_data(self, data: bytes) -> Verdict | None:
        if self.result is not None:
            raise ValueError("first bytes fed after the verdict")
        self._buffer += data
        first = self._buffer
        transport = classify_prefix(first, self.magic)
        if transport is None:
            return None  # so far, v1
        if transport == "v1":
            return self._decide(Verdict(Opening.V1, first))
        if self.policy is V2Policy.DOWNGRADE:
            return self._decide(Verdict(Opening.CLOSE, event=V2Downgrade(
                conn=self.conn, peer=self.peer, first_bytes=first[:16].hex(),
                note="closed before sending a byte")))  # fmt: skip
        if self.policy is V2Policy.PASSTHROUGH:
            return self._decide(Verdict(Opening.V2_PASSTHROUGH, first, V2Passthrough(
                conn=self.conn, peer=self.peer, first_bytes=first[:16].hex())))  # fmt: skip
        return self._decide(Verdict(Opening.V2_DECRYPT, first))

    def receive_eof(self) -> Verdict:
        """The initiator closed before the prefix was whole (or before a byte)."""
        event = Close(conn=self.conn, peer=self.peer, reason="closed before handshake")
        return self.result or self._decide(Verdict(Opening.CLOSE, event=event))

    def timed_out(self) -> Verdict:
        """``handshake_timeout`` passed first."""
        event = Timeout(conn=self.conn, peer=self.peer, during="first bytes")
        return self.result or self._decide(Verdict(Opening.CLOSE, event=event))

    def _decide(self, verdict: Verdict) -> Verdict:
        self.result = verdict
        return verdict


class Admission:
    """Numbers connections and admits them while fewer than ``limit`` are open."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        """Connections admitted and not yet released."""
        self._ids = itertools.count(1)

    def admit(self, route: str, client: str) -> int | ConnectionLimit:
        """The new connection's id, or the event to log before dropping it."""
        conn = next(self._ids)
        if self.active >= self.limit:
            return ConnectionLimit(conn=conn, route=route, client=client, limit=self.limit)
        self.active += 1
        return conn

    def release(self) -> None:
        """An admitted connection ended."""
        self.active -= 1
