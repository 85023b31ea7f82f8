"""BIP324's keys and packet cipher: ElligatorSwift and the x-only ECDH (libsecp256k1, as
bundled with coincurve), the HKDF key derivation, and the packet cipher of one direction
(FSChaCha20 for the 3-byte lengths, FSChaCha20Poly1305 for the contents, with
``cryptography``'s ChaCha20 and ChaCha20Poly1305), as Core's ``BIP324Cipher``
(src/bip324.cpp) does it.

The session (:mod:`msgcap.capture.bip324`) drives these; its receive loop reads a
:class:`PacketCipher`'s per-epoch tables (length keystream, nonces, AEAD) directly, which
is what makes decrypting a packet one call. A native pipe (``capture/_v2.c``) takes a
cipher over as its :data:`CipherState`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Final

from coincurve._libsecp256k1 import ffi, lib  # type: ignore[import-not-found]
from coincurve.context import GLOBAL_CONTEXT
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from msgcap.capture.bip324_events import V2Error, V2ErrorReason

ELLSWIFT_LEN: Final = 64
LENGTH_LEN: Final = 3
HEADER_LEN: Final = 1
TAG_LEN: Final = 16
EXPANSION: Final = LENGTH_LEN + HEADER_LEN + TAG_LEN
"""Bytes a packet adds to its contents (Core's BIP324Cipher::EXPANSION)."""
IGNORE_BIT: Final = 0x80
REKEY_INTERVAL: Final = 224
MAX_PACKET_CONTENTS: Final = 2**24 - 1
"""Largest contents the 3-byte length field can describe."""


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
