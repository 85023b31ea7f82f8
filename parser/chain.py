"""The blocks a recorded conversation talks about: the best chain its headers form, the
header a block message starts with, and what a getdata item asks for (and the messages of
the handshake, which a player of the recording sends afresh).

``msgcap replay`` (:mod:`msgcap.proxy.replay_plan`) and ``msgcap export
--functional-test`` (:mod:`msgcap.parser.functional_plan`) both answer a live node from a
recording: they cut ``headers`` answers from the recorded chain and look blocks and
transactions up by the hash a getdata names. They read the recording the same way, here.
Hashes are wire-order bytes throughout. No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Literal

from msgcap.parser import messages as m
from msgcap.parser.structures import MSG_WITNESS_FLAG, BlockHeader, InvType
from msgcap.parser.wire import DecodeError, Reader

HANDSHAKE: Final = frozenset({"version", "verack", "wtxidrelay", "sendaddrv2", "sendtxrcncl"})
"""Types exchanged before ``verack``: a player of a recording sends its own handshake."""
BLOCK_TYPES: Final = frozenset({"block", "cmpctblock", "merkleblock"})
"""Message types whose payload starts with an 80-byte block header."""

Family = Literal["block", "merkleblock", "tx"]
"""What a getdata item asks for, whatever form it asks in: a block (whole or compact), a
filtered block (``merkleblock`` and its transactions), or a transaction (by txid or
wtxid)."""

_FAMILIES: Final[dict[int, Family]] = {
    InvType.MSG_BLOCK: "block",
    InvType.MSG_CMPCT_BLOCK: "block",
    InvType.MSG_FILTERED_BLOCK: "merkleblock",
    InvType.MSG_TX: "tx",
    InvType.MSG_WTX: "tx",
}


def family(inv_type: int) -> Family | None:
    """The :data:`Family` of an inventory type, witness flag or not (None: not one that
    fetches a block or a transaction)."""
    return _FAMILIES.get(inv_type & ~MSG_WITNESS_FLAG)


def block_family(inv_type: int) -> Literal["block", "tx"] | None:
    """As :func:`family`, with a filtered block counted as a block (the block it names)."""
    found = family(inv_type)
    return "block" if found == "merkleblock" else found


def try_decode(msgtype: str, payload: bytes) -> m.Message | m.Unknown | None:
    """The decoded message, or None when the payload does not decode (a recording may
    hold anything its peer sent)."""
    try:
        return m.decode_message(msgtype, payload)
    except DecodeError:
        return None


def leading_header(payload: bytes) -> BlockHeader | None:
    """The 80-byte header a block, cmpctblock or merkleblock payload starts with (None:
    too short)."""
    try:
        return BlockHeader.read(Reader(payload[:80], "header"))
    except DecodeError:
        return None


class HeaderChain:
    """The best chain the recorded headers form: the longest path through them, its
    first header's parent as its base (the genesis block when the recording starts from
    a fresh node). Of two paths of equal length, the one whose tip came first wins."""

    def __init__(self, headers: Iterable[BlockHeader]) -> None:
        self.by_hash: dict[bytes, BlockHeader] = {}
        for header in headers:
            self.by_hash.setdefault(header.hash, header)
        height: dict[bytes, int] = {}
        for start in self.by_hash:
            path = []
            at = start
            while at in self.by_hash and at not in height:
                path.append(at)
                at = self.by_hash[at].prev_block
            n = height.get(at, 0)
            for h in reversed(path):
                n += 1
                height[h] = n
        tip = max(self.by_hash, key=lambda h: height[h], default=None)
        hashes: list[bytes] = []
        while tip in self.by_hash:
            assert tip is not None
            hashes.append(tip)
            tip = self.by_hash[tip].prev_block
        hashes.reverse()
        self.headers = [self.by_hash[h] for h in hashes]
        """The chain's headers, its first block first."""
        self.hashes = [self.headers[0].prev_block, *hashes] if hashes else []
        """The base, then the hash of each header: ``hashes[i + 1]`` is ``headers[i]``'s."""
        self.position = {h: i for i, h in enumerate(self.hashes)}

    @property
    def blocks(self) -> list[bytes]:
        """The chain's block hashes without its base, its first block first."""
        return self.hashes[1:]

    def after(self, locator: Sequence[bytes]) -> list[bytes] | None:
        """The hashes that follow the first locator hash on the chain; None when no
        locator hash is on it. An empty chain has nothing after anything."""
        if not self.hashes:
            return []
        for h in locator:
            i = self.position.get(h)
            if i is not None:
                return self.hashes[i + 1 :]
        return None
