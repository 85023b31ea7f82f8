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
sending ciphers over to the native per-read step (:func:`native_pipe`, ``capture/_v2.c``:
OpenSSL's ChaCha20 and ChaCha20-Poly1305), which then does what this module's packet code
does for a whole read at once.

The behaviour follows Bitcoin Core's ``V2Transport`` (src/net.cpp) and ``BIP324Cipher``
(src/bip324.cpp). ElligatorSwift and the ECDH come from the libsecp256k1 bundled with
coincurve; ChaCha20 and ChaCha20Poly1305 from ``cryptography``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from coincurve._libsecp256k1 import ffi, lib  # type: ignore[import-not-found]
from coincurve.context import GLOBAL_CONTEXT
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from msgcap.capture.errors import MsgcapError

if TYPE_CHECKING:
    from msgcap.capture._v2 import Pipe

# --- constants ------------------------------------------------------------------------

ELLSWIFT_LEN: Final = 64
GARBAGE_TERMINATOR_LEN: Final = 16
MAX_GARBAGE_LEN: Final = 4095
LENGTH_LEN: Final = 3
HEADER_LEN: Final = 1
TAG_LEN: Final = 16
EXPANSION: Final = LENGTH_LEN + HEADER_LEN + TAG_LEN
"""Bytes a packet adds to its contents (Core's BIP324Cipher::EXPANSION)."""
IGNORE_BIT: Final = 0x80
REKEY_INTERVAL: Final = 224
MAX_PACKET_CONTENTS: Final = 2**24 - 1
"""Largest contents the 3-byte length field can describe."""
MSGTYPE_SIZE: Final = 12
MAX_PROTOCOL_MESSAGE_LENGTH: Final = 4_000_000
MAX_CONTENTS_LEN: Final = 1 + MSGTYPE_SIZE + MAX_PROTOCOL_MESSAGE_LENGTH
"""Core's limit on a received packet's contents length (checked as soon as the 3 length
bytes are in): 0x00 + 12-byte type + 4,000,000 bytes of payload, i.e. 4,000,013. Longer
makes Core disconnect. (A short-id message may thus carry up to 4,000,012 payload bytes.)"""
V1_PREFIX_LEN: Final = 16
TRANSPORT_VERSION: Final = b""
"""Contents of the version packet we send (BIP324's only version so far)."""

_V1_VERSION_TYPE: Final = b"version\0\0\0\0\0"

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

_ID_TO_TYPE: Final[tuple[str | None, ...]] = tuple(V2_MESSAGE_IDS.get(i) for i in range(256))
_SMALL_PAYLOAD: Final = 16 * 1024
"""Payloads up to this size are returned as bytes, longer ones as memoryviews."""


# --- v1 detection ---------------------------------------------------------------------


def v1_prefix(magic: bytes) -> bytes:
    """The 16 bytes a v1 initiator starts with: magic and the ``version`` message type."""
    if len(magic) != 4:
        raise ValueError("magic must be 4 bytes")
    return magic + _V1_VERSION_TYPE


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


# --- elliptic curve -------------------------------------------------------------------

_CTX: Final = GLOBAL_CONTEXT.ctx


def random_privkey() -> bytes:
    """A random valid secp256k1 private key."""
    while True:
        key = os.urandom(32)
        if lib.secp256k1_ec_seckey_verify(_CTX, key):
            return key


def ellswift_create(privkey: bytes, auxrand: bytes | None = None) -> bytes:
    """The 64-byte ElligatorSwift encoding of ``privkey``'s public key.

    ``auxrand`` (32 bytes) picks one of the many encodings; the same inputs give the same
    encoding. Raises ValueError for an invalid private key.
    """
    if len(privkey) != 32 or (auxrand is not None and len(auxrand) != 32):
        raise ValueError("privkey and auxrand must be 32 bytes")
    out = ffi.new("unsigned char[64]")
    rnd = ffi.NULL if auxrand is None else auxrand
    if not lib.secp256k1_ellswift_create(_CTX, out, privkey, rnd):
        raise ValueError("invalid private key")
    return bytes(ffi.buffer(out, 64))


def ellswift_decode(ellswift: bytes) -> bytes:
    """The X coordinate (32 bytes) of the point a 64-byte ElligatorSwift encoding maps to
    (every 64-byte string is a valid encoding)."""
    if len(ellswift) != ELLSWIFT_LEN:
        raise ValueError("ellswift encodings are 64 bytes")
    pubkey = ffi.new("secp256k1_pubkey *")
    if not lib.secp256k1_ellswift_decode(_CTX, pubkey, ellswift):
        raise ValueError("ellswift decoding failed")  # cannot happen (libsecp256k1 docs)
    out = ffi.new("unsigned char[33]")
    outlen = ffi.new("size_t *", 33)
    lib.secp256k1_ec_pubkey_serialize(_CTX, out, outlen, pubkey, lib.SECP256K1_EC_COMPRESSED)
    return bytes(ffi.buffer(out, 33))[1:]


def ecdh_secret(privkey: bytes, ours: bytes, theirs: bytes, initiator: bool) -> bytes:
    """BIP324's shared secret: tagged hash ``bip324_ellswift_xonly_ecdh`` of the initiator's
    encoding, the responder's encoding and the x-only ECDH point."""
    if len(ours) != ELLSWIFT_LEN or len(theirs) != ELLSWIFT_LEN or len(privkey) != 32:
        raise ValueError("ellswift encodings are 64 bytes, private keys 32")
    out = ffi.new("unsigned char[32]")
    ell_a, ell_b = (ours, theirs) if initiator else (theirs, ours)
    ok = lib.secp256k1_ellswift_xdh(
        _CTX,
        out,
        ell_a,
        ell_b,
        privkey,
        0 if initiator else 1,
        lib.secp256k1_ellswift_xdh_hash_function_bip324,
        ffi.NULL,
    )
    if not ok:
        raise ValueError("invalid private key")
    return bytes(ffi.buffer(out, 32))


# --- key derivation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Everything BIP324 derives from the shared secret (HKDF-SHA256, salt
    ``bitcoin_v2_shared_secret`` + network magic)."""

    session_id: bytes
    initiator_l: bytes
    initiator_p: bytes
    responder_l: bytes
    responder_p: bytes
    initiator_garbage_terminator: bytes
    responder_garbage_terminator: bytes


def derive_keys(shared_secret: bytes, magic: bytes) -> SessionKeys:
    prk = hmac.digest(b"bitcoin_v2_shared_secret" + magic, shared_secret, hashlib.sha256)

    def expand32(info: bytes) -> bytes:
        return hmac.digest(prk, info + b"\x01", hashlib.sha256)

    terminators = expand32(b"garbage_terminators")
    return SessionKeys(
        session_id=expand32(b"session_id"),
        initiator_l=expand32(b"initiator_L"),
        initiator_p=expand32(b"initiator_P"),
        responder_l=expand32(b"responder_L"),
        responder_p=expand32(b"responder_P"),
        initiator_garbage_terminator=terminators[:16],
        responder_garbage_terminator=terminators[16:],
    )


# --- packet cipher --------------------------------------------------------------------

_ZERO_KEYSTREAM: Final = bytes(LENGTH_LEN * REKEY_INTERVAL + 32)
_ZERO32: Final = bytes(32)
_NONCE_LOW: Final = tuple(j.to_bytes(4, "little") for j in range(REKEY_INTERVAL))
_LENGTH_WORDS: Final = struct.Struct("<" + "HB" * REKEY_INTERVAL)
"""An epoch's 224 3-byte length keystream words, each as its low 2 bytes and its high byte
(struct has no 3-byte integers): one call instead of 224."""


CipherState = tuple[bytes, bytes, int, int]
"""One direction's packet cipher: ``(l_key, p_key, epoch, index)``: the length and contents
keys of the current epoch (rekey count), and the next packet's index in it (0..223)."""


class PacketCipher:
    """One direction of the packet cipher: FSChaCha20 for the 3-byte lengths and
    FSChaCha20Poly1305 for the contents, both rekeyed every 224 packets.

    Per 224-packet epoch, the length keystream (224 * 3 bytes and the next 32-byte key) is
    made by one ChaCha20 call and unpacked by one struct call; the AEAD object and the 224
    nonces are made once. Use one instance either for encrypting or for decrypting, as
    BIP324 does.
    """

    __slots__ = (
        "_aead",
        "_epoch",
        "_index",
        "_l_key",
        "_length_ks",
        "_next_l_key",
        "_nonces",
        "_p_key",
    )

    def __init__(self, l_key: bytes, p_key: bytes) -> None:
        if len(l_key) != 32 or len(p_key) != 32:
            raise ValueError("keys are 32 bytes")
        self._epoch = 0
        self._index = 0  # packet index inside the epoch
        self._start_epoch(l_key, p_key)

    @property
    def packet_counter(self) -> int:
        """Packets this cipher has processed."""
        return self._epoch * REKEY_INTERVAL + self._index

    def _start_epoch(self, l_key: bytes, p_key: bytes) -> None:
        self._l_key, self._p_key = l_key, p_key
        epoch8 = self._epoch.to_bytes(8, "little")
        # cryptography's ChaCha20 "nonce" is the 32-bit block counter and the 96-bit nonce:
        # counter 0, nonce = 4 zero bytes + the 64-bit rekey count.
        ks = (
            Cipher(algorithms.ChaCha20(l_key, bytes(8) + epoch8), mode=None)
            .encryptor()
            .update(_ZERO_KEYSTREAM)
        )
        words = _LENGTH_WORDS.unpack_from(ks)  # low 2 bytes, high byte, low 2 bytes, ...
        pairs = zip(words[::2], words[1::2], strict=True)
        self._length_ks: list[int] = [lo | hi << 16 for lo, hi in pairs]
        self._next_l_key = ks[LENGTH_LEN * REKEY_INTERVAL :]
        self._nonces = tuple(low + epoch8 for low in _NONCE_LOW)
        self._aead = ChaCha20Poly1305(p_key)

    def _next_epoch(self) -> None:
        """Rekey both ciphers (after the 224th packet of the epoch): the length cipher with
        the next 32 keystream bytes, the AEAD with the first 32 bytes of encrypting 32
        zero bytes under nonce 0xffffffff + rekey count."""
        rekey_nonce = b"\xff\xff\xff\xff" + self._epoch.to_bytes(8, "little")
        p_key = self._aead.encrypt(rekey_nonce, _ZERO32, None)[:32]
        self._epoch += 1
        self._index = 0
        self._start_epoch(self._next_l_key, p_key)

    def state(self) -> CipherState:
        """This epoch's keys and the next packet's place in it (what a native pipe takes
        over)."""
        return (self._l_key, self._p_key, self._epoch, self._index)

    def skip(self, packets: int) -> None:
        """Advance as if ``packets`` packets had been processed (test vectors start at a
        given packet index)."""
        while packets:
            step = min(packets, REKEY_INTERVAL - self._index)
            self._index += step
            packets -= step
            if self._index == REKEY_INTERVAL:
                self._next_epoch()

    def encrypt(
        self,
        prefix: bytes,
        payload: bytes | bytearray | memoryview = b"",
        aad: bytes | None = None,
    ) -> bytes:
        """One packet whose plaintext is ``prefix`` (header byte, then the start of the
        contents) followed by ``payload``.

        Uses only ``ChaCha20Poly1305.encrypt`` (bytes-like in, new bytes out), as the
        ``cryptography`` documentation grants in every version we declare: no buffer is
        shared between input and output.
        """
        plen = len(prefix) + len(payload)
        n = plen - HEADER_LEN
        if not 0 <= n <= MAX_PACKET_CONTENTS:
            raise ValueError(f"packet contents must be 0..{MAX_PACKET_CONTENTS} bytes")
        j = self._index
        length = (n ^ self._length_ks[j]).to_bytes(LENGTH_LEN, "little")
        plain = prefix + payload if payload else prefix
        out = length + self._aead.encrypt(self._nonces[j], plain, aad or None)
        if j == REKEY_INTERVAL - 1:
            self._next_epoch()
        else:
            self._index = j + 1
        return out

    def encrypt_contents(
        self, contents: bytes | bytearray | memoryview, aad: bytes = b"", ignore: bool = False
    ) -> bytes:
        """A packet for ``contents`` (Core's BIP324Cipher::Encrypt)."""
        return self.encrypt(b"\x80" if ignore else b"\x00", contents, aad)

    def decrypt_length(self, encrypted: bytes | bytearray | memoryview) -> int:
        """The contents length from the packet's 3 first bytes (the packet's AEAD part must
        then be passed to :meth:`decrypt`)."""
        if len(encrypted) != LENGTH_LEN:
            raise ValueError("the length field is 3 bytes")
        return int.from_bytes(encrypted, "little") ^ self._length_ks[self._index]

    def decrypt(
        self, ciphertext: bytes | bytearray | memoryview, aad: bytes = b""
    ) -> tuple[bool, bytes]:
        """``(ignore, contents)`` from the packet's AEAD part (header, contents, tag).
        Raises V2Error(BAD_TAG) if it does not authenticate."""
        try:
            plain = self._aead.decrypt(self._nonces[self._index], ciphertext, aad or None)
        except InvalidTag:
            raise V2Error(V2ErrorReason.BAD_TAG, "packet authentication failed", -1) from None
        self._advance()
        return bool(plain[0] & IGNORE_BIT), plain[HEADER_LEN:]

    def _advance(self) -> None:
        if self._index == REKEY_INTERVAL - 1:
            self._next_epoch()
        else:
            self._index += 1


# --- events ---------------------------------------------------------------------------


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by :meth:`V2Session.next_event` when more bytes are needed."""


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


def _oversize(length: int) -> str:
    return f"packet contents length {length} above {MAX_CONTENTS_LEN}"


def _bad_tag(number: int, length: int) -> str:
    return f"packet {number} ({length} bytes contents) failed authentication"


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
            raw = msgtype.encode("ascii")
            if len(raw) > MSGTYPE_SIZE:
                raise ValueError(f"message type {msgtype!r} is longer than {MSGTYPE_SIZE} bytes")
            prefix = b"\0\0" + raw.ljust(MSGTYPE_SIZE, b"\0")
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
        """Give up the receiving direction (to a :class:`NativePipe`): its cipher state,
        the bytes buffered after the last complete packet (the start of the next one, its
        length field included) and their stream offset. Only once the handshake is over
        and every complete packet has been taken out; this session receives no more."""
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

    def take_sender(self) -> CipherState:
        """Give up the sending direction (to a :class:`NativePipe`): its cipher state.
        Only once every handshake byte has been drained; this session sends no more."""
        send = self._send
        if send is None or self._outgoing:
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
                prefix = v1_prefix(self.magic)
                head = buf[:V1_PREFIX_LEN]
                if head != prefix[: len(head)]:
                    self._state = _State.KEY
                    self._outgoing.append(self.ellswift + self.garbage)
                elif len(head) == V1_PREFIX_LEN:
                    self._fail(V2ErrorReason.V1_PEER, "peer sent a v1 version header", 0)
                    return
                else:
                    return
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
                        error = (V2ErrorReason.OVERSIZE, _oversize(rlen), head)
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
                    error = (V2ErrorReason.BAD_TAG, _bad_tag(number, rlen), head - LENGTH_LEN)
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


# --- the native per-read step ---------------------------------------------------------

NativePipe: type[Pipe] | None
try:  # built by pip where a compiler and OpenSSL's headers exist (capture/_v2.c)
    from msgcap.capture._v2 import Pipe as NativePipe
except ImportError:  # pragma: no cover - depends on the build
    NativePipe = None

NATIVE_PIPE: Final = NativePipe is not None and not os.environ.get("MSGCAP_PURE_PYTHON")
"""Whether :func:`native_pipe` hands connections to the native step (else the sessions'
Python path runs; ``MSGCAP_PURE_PYTHON=1`` forces that)."""

_PIPE_ERRORS: Final = {1: V2ErrorReason.OVERSIZE, 2: V2ErrorReason.BAD_TAG}


def native_pipe(
    receiver: V2Session, sender: V2Session, pipe_type: type[Pipe] | None = None
) -> Pipe | None:
    """One direction of a ``decrypt`` relay in native code: what ``receiver`` receives,
    captured and re-encrypted by ``sender``'s sending cipher. Both sessions give those
    directions up (see :meth:`V2Session.take_receiver`). None where the native part was
    not built or is switched off (unless ``pipe_type`` is given): then nothing is taken."""
    if pipe_type is None:
        if NativePipe is None or not NATIVE_PIPE:
            return None
        pipe_type = NativePipe
    if sender._send is None or sender._outgoing:  # take nothing: the Python path goes on
        return None
    try:
        recv, rest, offset = receiver.take_receiver()
    except RuntimeError:
        return None
    pipe = pipe_type(recv, sender.take_sender(), offset)
    if rest:
        count, _, _, dropped, error = pipe.feed(rest, 0)
        assert count == 0 and dropped is None and error is None  # an incomplete packet
    return pipe


def pipe_error(error: tuple[int, int, int, int]) -> V2Error:
    """The :class:`V2Error` for a native pipe's ``error`` (as the Python path words it)."""
    code, number, length, offset = error
    if _PIPE_ERRORS[code] is V2ErrorReason.OVERSIZE:
        return V2Error(V2ErrorReason.OVERSIZE, _oversize(length), offset)
    return V2Error(V2ErrorReason.BAD_TAG, _bad_tag(number, length), offset)


def pipe_dropped(dropped: list[tuple[int, bytes]]) -> list[tuple[int, str]]:
    """A native pipe's dropped packets as the Python path describes them, with the
    short id (0 for an invalid long type)."""
    return [
        (sid, UnknownShortId(sid).describe() if sid else InvalidMessageType(raw).describe())
        for sid, raw in dropped
    ]
