"""Sans-IO BIP324 (v2 P2P transport): handshake, packet cipher, message decoding.

A :class:`V2Session` is one end of one BIP324 connection and owns no socket.

* Bytes received from the peer go in with :meth:`V2Session.receive_data`; events come out of
  :meth:`V2Session.next_events` (every event the bytes fed so far make complete, in one call)
  or :meth:`V2Session.next_event` (one at a time, ``NEED_DATA`` when none is complete).
* Bytes for the peer come out of :meth:`V2Session.data_to_send` (our ElligatorSwift key and
  garbage, then the garbage terminator and the version packet) and of
  :meth:`V2Session.encrypt_message` / :meth:`V2Session.encrypt_decoy` (application packets).

Events: :class:`HandshakeComplete` (keys are derived, we may send application packets),
:class:`VersionPacket` (the peer's version packet is authenticated: Core reports the
connection as v2 from here on), :class:`V2Message`, and the packets Core drops without
disconnecting: :class:`UnknownShortId`, :class:`InvalidMessageType`. Decoy packets
(ignore bit set) are authenticated and counted in :attr:`V2Session.decoys_received`, not
reported. A packet cut short is not an error: the session just waits for more bytes.

Conditions on which Bitcoin Core disconnects raise a :class:`V2Error` whose ``reason``
is a :class:`V2ErrorReason`; the session is unusable after it (every later call raises it
again). Events complete before the error are still returned first (see
:meth:`V2Session.take_events`).

Under the proxy's ``decrypt`` policy, an established session can hand its receiving and
sending ciphers over to the native per-read step
(:func:`~msgcap.capture.bip324_pipe.native_pipe`; ``capture/_v2.c``, built into
``msgcap.capture._capture``: OpenSSL's ChaCha20 and ChaCha20-Poly1305), which then does
what this module's packet code does for a whole read at once.

The behaviour follows Bitcoin Core's ``V2Transport`` (src/net.cpp). BIP324 is four
modules; this one is the session's state machine. Import each name from the module that
defines it (this one does not re-export the others'):

* :mod:`msgcap.capture.bip324_events`: short message type ids, events and errors;
* :mod:`msgcap.capture.bip324_cipher`: ElligatorSwift, ECDH, key derivation and the
  packet cipher (Core's ``BIP324Cipher``, src/bip324.cpp);
* :mod:`msgcap.capture.bip324_pipe`: the hand-over to the native per-read step.
"""

from __future__ import annotations

import enum
import os
import secrets
from collections import deque
from collections.abc import Sequence
from typing import Final, Literal

from cryptography.exceptions import InvalidTag

from msgcap.capture.bip324_cipher import (
    ELLSWIFT_LEN,
    HEADER_LEN,
    IGNORE_BIT,
    LENGTH_LEN,
    REKEY_INTERVAL,
    TAG_LEN,
    CipherState,
    PacketCipher,
    SessionKeys,
    derive_keys,
    ecdh_secret,
    ellswift_create,
    random_privkey,
)
from msgcap.capture.bip324_events import (
    MAX_CONTENTS_LEN,
    V2_MESSAGE_IDS,
    V2_SHORT_IDS,
    Event,
    HandshakeComplete,
    InvalidMessageType,
    UnknownShortId,
    V2Error,
    V2ErrorReason,
    V2Message,
    VersionPacket,
    bad_tag_message,
    oversize_message,
)
from msgcap.capture.framing import NEED_DATA, _NeedData, encode_msgtype, v1_version_prefix

GARBAGE_TERMINATOR_LEN: Final = 16
MAX_GARBAGE_LEN: Final = 4095
V1_PREFIX_LEN: Final = 16
TRANSPORT_VERSION: Final = b""
"""Contents of the version packet we send (BIP324's only version so far)."""

_V1_VERSION_TYPE: Final = encode_msgtype("version")
_ID_TO_TYPE: Final[tuple[str | None, ...]] = tuple(V2_MESSAGE_IDS.get(i) for i in range(256))
_SMALL_PAYLOAD: Final = 16 * 1024
"""Payloads up to this size are returned as bytes, longer ones as memoryviews."""


# --- v1 detection ---------------------------------------------------------------------


def v1_prefix(magic: bytes) -> bytes:
    """The 16 bytes a v1 initiator starts with: magic and the ``version`` message type."""
    if len(magic) != 4:
        raise ValueError("magic must be 4 bytes")
    return v1_version_prefix(magic)


def looks_like_v1(first16: bytes | bytearray | memoryview, magic: bytes) -> bool:
    """Whether a connection starting with these 16 bytes is v1, as Core's responder decides.

    Only an exact match of all 16 bytes is v1; anything else (even 15 of 16) is v2.
    """
    if len(first16) < V1_PREFIX_LEN:
        raise ValueError(f"need {V1_PREFIX_LEN} bytes, got {len(first16)}")
    return bytes(first16[:V1_PREFIX_LEN]) == v1_prefix(magic)


def classify_prefix(
    data: bytes | bytearray | memoryview, magic: bytes
) -> Literal["v1", "v2"] | None:
    """``"v1"``, ``"v2"`` or ``None`` (undecided: need more bytes) for the first bytes of a
    connection, the way Core's responder decides: v2 as soon as a byte differs from the v1
    prefix, v1 when all 16 bytes match."""
    prefix = v1_prefix(magic)
    head = bytes(data[:V1_PREFIX_LEN])
    if head != prefix[: len(head)]:
        return "v2"
    return "v1" if len(head) == V1_PREFIX_LEN else None


def session_id_hex(session_id: bytes) -> str:
    """The session id as Core's ``getpeerinfo`` prints it: the 32 bytes in order, in hex
    (``HexStr`` of the bytes, not the byte-reversed uint256 ``GetHex``)."""
    return session_id.hex()


# --- session --------------------------------------------------------------------------


class _State(enum.Enum):
    MAYBE_V1 = "maybe v1"  # responder: deciding v1/v2 from the first 16 bytes
    KEY = "key"  # receiving the peer's 64-byte key
    GARBAGE = "garbage"  # scanning for the garbage terminator
    PACKETS = "packets"  # version packet, then application packets
    FAILED = "failed"


_msgtype_cache: dict[bytes, str | None] = {}


def _long_msgtype(raw: bytes) -> str | None:
    """Core's V2Transport::GetMessageType on a 12-byte long type: printable ASCII
    0x20..0x7f (0x7f included, unlike v1) up to the first NUL, only NULs after it."""
    try:
        return _msgtype_cache[raw]
    except KeyError:
        pass
    text, _, rest = raw.partition(b"\0")
    ok = not rest.strip(b"\0") and all(0x20 <= c <= 0x7F for c in text)
    result = text.decode("ascii") if ok else None
    if len(_msgtype_cache) < 4096:
        _msgtype_cache[raw] = result
    return result


_plain_prefix_cache: dict[str, bytes] = {}


def _plain_prefix(msgtype: str) -> bytes:
    """Header byte plus message type encoding (short id if the type has one)."""
    prefix = _plain_prefix_cache.get(msgtype)
    if prefix is None:
        sid = V2_SHORT_IDS.get(msgtype)
        if sid is not None:
            prefix = bytes((0, sid))
        else:
            prefix = b"\0\0" + encode_msgtype(msgtype)
        if len(_plain_prefix_cache) < 4096:
            _plain_prefix_cache[msgtype] = prefix
    return prefix


class V2Session:
    """One end of one BIP324 connection (initiator or responder), sans-IO.

    ``garbage`` (0..4095 bytes) defaults to a random length and content like Core's;
    ``privkey`` (32 bytes) and ``auxrand`` (32 bytes, picks the ElligatorSwift encoding)
    default to random. ``ellswift`` gives our encoding directly (it must belong to
    ``privkey``; for test vectors). ``handshake_decoys`` are contents lengths of decoy
    packets sent between the garbage terminator and the version packet (the first of them
    then carries the garbage as AAD).

    A responder sends nothing until the received bytes differ from the v1 prefix (Core's
    behaviour); feed it the connection's bytes from the first one.
    """

    def __init__(
        self,
        initiator: bool,
        magic: bytes,
        *,
        garbage: bytes | None = None,
        privkey: bytes | None = None,
        auxrand: bytes | None = None,
        ellswift: bytes | None = None,
        handshake_decoys: Sequence[int] = (),
    ) -> None:
        if len(magic) != 4:
            raise ValueError("magic must be 4 bytes")
        if garbage is None:
            garbage = os.urandom(secrets.randbelow(MAX_GARBAGE_LEN + 1))
        if len(garbage) > MAX_GARBAGE_LEN:
            raise ValueError(f"garbage is at most {MAX_GARBAGE_LEN} bytes")
        if privkey is None:
            if ellswift is not None:
                raise ValueError("an ellswift encoding needs its privkey")
            privkey = random_privkey()
        if ellswift is None:
            ellswift = ellswift_create(privkey, auxrand or os.urandom(32))
        elif len(ellswift) != ELLSWIFT_LEN or len(privkey) != 32:
            raise ValueError("ellswift encodings are 64 bytes, private keys 32")
        ours = ellswift
        self.initiator: Final = initiator
        self.magic: Final = magic
        self._privkey: bytes | None = privkey
        self.ellswift: Final = ours
        """Our 64-byte ElligatorSwift public key encoding."""
        self.garbage: Final = bytes(garbage)
        """The garbage we send after our key."""
        self._handshake_decoys = tuple(handshake_decoys)
        self._keys: SessionKeys | None = None
        self._send: PacketCipher | None = None
        self._recv: PacketCipher | None = None
        self._recv_terminator = b""
        self._outgoing: list[bytes] = []
        self._state = _State.KEY if initiator else _State.MAYBE_V1
        if initiator:
            self._outgoing.append(ours + self.garbage)
        # receive buffer: chunks, read position inside the first one
        self._chunks: deque[bytes | bytearray | memoryview] = deque()
        self._head = 0
        self._size = 0  # bytes buffered from _head on
        self._consumed = 0  # stream offset of _chunks[0][0]
        self._recv_len = -1  # decrypted length of the packet being received, -1 if not yet
        self._recv_aad: bytes | None = None  # expected AAD of the first packet
        self._version_pending = True  # peer's version packet not yet received
        self._events: deque[Event] = deque()
        self._error: V2Error | None = None
        self.decoys_received = 0
        """Decoy packets (ignore bit set) authenticated so far, in any phase."""
        self.received_garbage: bytes | None = None
        """The garbage the peer sent (once its terminator is found)."""

    # -- properties --------------------------------------------------------------------

    @property
    def session_id(self) -> bytes | None:
        """The 32-byte session id, once the keys are derived."""
        return None if self._keys is None else self._keys.session_id

    @property
    def established(self) -> bool:
        """Keys are derived: application packets can be encrypted (HandshakeComplete)."""
        return self._send is not None

    @property
    def peer_version_received(self) -> bool:
        """The peer's version packet has been authenticated (VersionPacket)."""
        return not self._version_pending

    @property
    def send_garbage_terminator(self) -> bytes | None:
        if self._keys is None:
            return None
        k = self._keys
        return k.initiator_garbage_terminator if self.initiator else k.responder_garbage_terminator

    # -- sending -----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Drain the handshake bytes waiting to be sent."""
        out = b"".join(self._outgoing)
        self._outgoing.clear()
        return out

    def _sender(self) -> PacketCipher:
        if self._send is None:
            raise RuntimeError("cannot send packets before the peer's key has arrived")
        return self._send

    def encrypt_message(self, msgtype: str, payload: bytes | bytearray | memoryview) -> bytes:
        """The packet for one application message (short id when the type has one, else
        0x00 and the 12-byte NUL-padded type).

        Handshake bytes not yet drained by :meth:`data_to_send` are prepended, so the
        result is always the next thing to write."""
        send = self._send
        if send is None or self._outgoing:
            return self._with_pending(_plain_prefix(msgtype), payload)
        prefix = _plain_prefix_cache.get(msgtype) or _plain_prefix(msgtype)
        return send.encrypt(prefix, payload)

    def encrypt_messages(
        self, messages: Sequence[tuple[str, bytes | bytearray | memoryview]]
    ) -> bytes:
        """The packets for several messages, joined (a lone packet as it is: a large one
        is not copied again)."""
        parts = [self.encrypt_message(t, p) for t, p in messages]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def encrypt_decoy(self, size: int) -> bytes:
        """A decoy packet (ignore bit set) with ``size`` bytes of zero contents."""
        return self.encrypt_contents(bytes(size), ignore=True)

    def encrypt_contents(
        self, contents: bytes | bytearray | memoryview, *, ignore: bool = False
    ) -> bytes:
        """A packet with raw ``contents`` (message type encoding included), e.g. to relay a
        packet with an unknown short id or an invalid type unchanged."""
        return self._with_pending(b"\x80" if ignore else b"\x00", contents)

    def _with_pending(self, prefix: bytes, payload: bytes | bytearray | memoryview) -> bytes:
        packet = self._sender().encrypt(prefix, payload)
        if self._outgoing:
            return self.data_to_send() + packet
        return packet

    # -- handing over to a native pipe ------------------------------------------------

    def take_receiver(self) -> tuple[CipherState, bytes, int]:
        """Give up the receiving direction (to a
        :class:`~msgcap.capture.bip324_pipe.NativePipe`): its cipher state, the bytes
        buffered after the last complete packet (the start of the next one, its length
        field included) and their stream offset. Only once the handshake is over and every
        complete packet has been taken out; this session receives no more."""
        recv = self._recv
        if (
            recv is None
            or self._state is not _State.PACKETS
            or self._version_pending
            or self._events
            or self._error is not None
        ):
            raise RuntimeError("the receiving direction cannot be handed over now")
        self._process()
        if self._events or self._error is not None:
            raise RuntimeError("complete packets are still buffered")
        rest = b"".join(bytes(c) for c in self._chunks)[self._head :]
        offset = self._consumed + self._head
        if self._recv_len >= 0:  # its length field was consumed: put it back
            length = self._recv_len ^ recv._length_ks[recv._index]
            rest = length.to_bytes(LENGTH_LEN, "little") + rest
            offset -= LENGTH_LEN
        state = recv.state()
        self._recv = None
        self._state = _State.FAILED
        self._error = V2Error(V2ErrorReason.BAD_TAG, "receiving was handed over", offset)
        self._chunks.clear()
        self._size = self._head = 0
        return state, rest, offset

    @property
    def sender_ready(self) -> bool:
        """Whether :meth:`take_sender` can hand the sending direction over now."""
        return self._send is not None and not self._outgoing

    def take_sender(self) -> CipherState:
        """Give up the sending direction (to a
        :class:`~msgcap.capture.bip324_pipe.NativePipe`): its cipher state. Only once every
        handshake byte has been drained; this session sends no more."""
        send = self._send
        if not self.sender_ready or send is None:
            raise RuntimeError("the sending direction cannot be handed over now")
        self._send = None
        return send.state()

    # -- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes received from the peer (processed by the next_event* calls).

        ``bytes`` are kept without copying; other buffers are copied (their owner may
        reuse them)."""
        if data and self._error is None:
            self._chunks.append(data if type(data) is bytes else bytes(data))
            self._size += len(data)

    @property
    def incomplete(self) -> int:
        """Bytes the packet being received will hold once complete, as soon as its length
        is decrypted; until then (and during the handshake) the bytes buffered."""
        if self._recv_len >= 0:
            return LENGTH_LEN + HEADER_LEN + self._recv_len + TAG_LEN
        return self._size

    def discard(self) -> None:
        """Drop every buffered byte (the stream is over)."""
        self._chunks.clear()
        self._head = self._size = 0

    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Raises V2Error."""
        if not self._events:
            self._process()
            if not self._events:
                if self._error is not None:
                    raise self._error
                return NEED_DATA
        return self._events.popleft()

    def next_events(self) -> list[Event]:
        """Every event the bytes received so far complete (empty: need more data).

        Raises V2Error when the stream has failed; if events were complete before the
        failure they are returned first and the next call raises."""
        self._process()
        if not self._events and self._error is not None:
            raise self._error
        events = list(self._events)
        self._events.clear()
        return events

    def take_events(self) -> tuple[list[Event], V2Error | None]:
        """Every event complete so far, and the error that ended the stream after them
        (if any), without raising."""
        self._process()
        events = list(self._events)
        self._events.clear()
        return events, self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """:meth:`receive_data` then :meth:`next_events`."""
        self.receive_data(data)
        return self.next_events()

    # -- processing --------------------------------------------------------------------

    def _fail(self, reason: V2ErrorReason, message: str, offset: int) -> None:
        self._error = V2Error(reason, message, offset)
        self._state = _State.FAILED
        self._chunks.clear()
        self._size = 0

    def _flatten(self) -> bytes:
        """All buffered bytes, made one chunk (handshake phases only)."""
        chunks = self._chunks
        if not chunks:
            return b""
        if len(chunks) > 1 or self._head or type(chunks[0]) is not bytes:
            first = chunks[0][self._head :]
            joined = b"".join([first, *list(chunks)[1:]])
            self._consumed += self._head
            chunks.clear()
            chunks.append(joined)
            self._head = 0
        first = chunks[0]
        assert type(first) is bytes
        return first

    def _consume(self, n: int) -> None:
        """Drop n bytes from the front of a flattened buffer."""
        first = self._chunks[0]
        self._head += n
        self._size -= n
        if self._head == len(first):
            self._chunks.popleft()
            self._consumed += self._head
            self._head = 0

    def _process(self) -> None:
        while self._size:
            state = self._state
            if state is _State.PACKETS:
                self._process_packets()
                return
            if state is _State.FAILED:
                return
            buf = self._flatten()
            if state is _State.MAYBE_V1:
                transport = classify_prefix(buf, self.magic)
                if transport is None:
                    return
                if transport == "v1":
                    self._fail(V2ErrorReason.V1_PEER, "peer sent a v1 version header", 0)
                    return
                self._state = _State.KEY
                self._outgoing.append(self.ellswift + self.garbage)
            elif state is _State.KEY:
                if not self._process_key(buf):
                    return
            elif state is _State.GARBAGE:
                if not self._process_garbage(buf):
                    return

    def _process_key(self, buf: bytes) -> bool:
        if not self.initiator and len(buf) >= V1_PREFIX_LEN and buf[4:16] == _V1_VERSION_TYPE:
            self._fail(
                V2ErrorReason.WRONG_NETWORK,
                f"v1 peer with wrong network magic {buf[:4].hex()}",
                self._consumed,
            )
            return False
        if len(buf) < ELLSWIFT_LEN:
            return False
        theirs = buf[:ELLSWIFT_LEN]
        self._consume(ELLSWIFT_LEN)
        assert self._privkey is not None
        secret = ecdh_secret(self._privkey, self.ellswift, theirs, self.initiator)
        self._privkey = None
        keys = derive_keys(secret, self.magic)
        self._keys = keys
        if self.initiator:
            self._send = PacketCipher(keys.initiator_l, keys.initiator_p)
            self._recv = PacketCipher(keys.responder_l, keys.responder_p)
            send_term = keys.initiator_garbage_terminator
            self._recv_terminator = keys.responder_garbage_terminator
        else:
            self._send = PacketCipher(keys.responder_l, keys.responder_p)
            self._recv = PacketCipher(keys.initiator_l, keys.initiator_p)
            send_term = keys.responder_garbage_terminator
            self._recv_terminator = keys.initiator_garbage_terminator
        out = [send_term]
        aad: bytes | None = self.garbage
        for size in self._handshake_decoys:
            out.append(bytes(self._send.encrypt(b"\x80", bytes(size), aad)))
            aad = None
        out.append(bytes(self._send.encrypt(b"\x00", TRANSPORT_VERSION, aad)))
        self._outgoing.extend(out)
        self._state = _State.GARBAGE
        self._events.append(HandshakeComplete(keys.session_id))
        return True

    def _process_garbage(self, buf: bytes) -> bool:
        limit = MAX_GARBAGE_LEN + GARBAGE_TERMINATOR_LEN
        pos = buf.find(self._recv_terminator, 0, limit)
        if pos < 0:
            if len(buf) >= limit:
                self._fail(
                    V2ErrorReason.NO_GARBAGE_TERMINATOR,
                    f"no garbage terminator within {MAX_GARBAGE_LEN} bytes of garbage",
                    self._consumed + limit,
                )
            return False
        self.received_garbage = self._recv_aad = buf[:pos]
        self._consume(pos + GARBAGE_TERMINATOR_LEN)
        self._state = _State.PACKETS
        return True

    def _merge_front(self, need: int) -> None:
        """Make the first ``need`` buffered bytes (need <= _size) one contiguous chunk."""
        chunks = self._chunks
        first = chunks.popleft()
        parts: list[bytes | bytearray | memoryview] = [memoryview(first)[self._head :]]
        have = len(parts[0])
        self._consumed += self._head  # the merged chunk starts at the read position
        self._head = 0
        while have < need:
            nxt = chunks.popleft()
            take = need - have
            if len(nxt) > take:
                parts.append(memoryview(nxt)[:take])
                chunks.appendleft(memoryview(nxt)[take:])
                have = need
            else:
                parts.append(nxt)
                have += len(nxt)
        chunks.appendleft(b"".join(parts))

    def _process_packets(self) -> None:
        """Decrypt every complete packet buffered (the hot loop)."""
        recv = self._recv
        assert recv is not None
        append = self._events.append
        chunks = self._chunks
        id_to_type = _ID_TO_TYPE
        small = _SMALL_PAYLOAD
        aad = self._recv_aad or None  # AAD of the first packet only
        version_pending = self._version_pending
        while chunks:
            first = chunks[0]
            head = self._head
            n = len(first)
            mv = memoryview(first)
            rlen = self._recv_len
            ks = recv._length_ks
            nonces = recv._nonces
            aead = recv._aead
            j = recv._index
            start = head
            error: tuple[V2ErrorReason, str, int] | None = None
            while True:
                if rlen < 0:
                    if n - head < LENGTH_LEN:
                        break
                    rlen = int.from_bytes(mv[head : head + LENGTH_LEN], "little") ^ ks[j]
                    if rlen > MAX_CONTENTS_LEN:
                        error = (V2ErrorReason.OVERSIZE, oversize_message(rlen), head)
                        break
                    head += LENGTH_LEN
                end = head + rlen + HEADER_LEN + TAG_LEN
                if end > n:
                    break
                plain: bytes
                try:
                    plain = aead.decrypt(nonces[j], mv[head:end], aad)
                except InvalidTag:
                    number = recv._epoch * REKEY_INTERVAL + j
                    why = bad_tag_message(number, rlen)
                    error = (V2ErrorReason.BAD_TAG, why, head - LENGTH_LEN)
                    break
                aad = None
                head = end
                rlen = -1
                if j == REKEY_INTERVAL - 1:
                    recv._index = j
                    recv._next_epoch()
                    ks, nonces, aead, j = recv._length_ks, recv._nonces, recv._aead, 0
                else:
                    j += 1
                if plain[0] & IGNORE_BIT:
                    self.decoys_received += 1
                    continue
                if version_pending:
                    version_pending = False
                    append(VersionPacket(bytes(plain[HEADER_LEN:])))
                    continue
                size = len(plain)
                if size < 2:
                    append(InvalidMessageType(b""))
                    continue
                type_id = plain[1]
                if type_id:
                    msgtype = id_to_type[type_id]
                    payload = plain[2:] if size <= small else memoryview(plain)[2:]
                    if msgtype is not None:
                        append(V2Message(msgtype, payload))
                    else:
                        append(UnknownShortId(type_id, payload))
                    continue
                raw = bytes(plain[2:14])
                msgtype = _long_msgtype(raw) if size >= 14 else None
                if msgtype is None:
                    append(InvalidMessageType(raw))
                    continue
                payload = plain[14:] if size <= small else memoryview(plain)[14:]
                append(V2Message(msgtype, payload))
            recv._index = j
            self._recv_len = rlen
            self._recv_aad = aad
            self._version_pending = version_pending
            self._size -= head - start
            if error is not None:
                reason, message, at = error
                self._fail(reason, message, self._consumed + at)
                return
            if head == n:
                chunks.popleft()
                self._consumed += n
                self._head = 0
                continue
            self._head = head
            # The next length field or packet body crosses a chunk boundary.
            need = LENGTH_LEN if rlen < 0 else rlen + HEADER_LEN + TAG_LEN
            if self._size < need or len(chunks) == 1:
                return
            self._merge_front(need)
