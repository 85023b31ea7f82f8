"""Generate a large capture folder with a realistic message mix, deterministically.

Two kinds:

- ``blocks`` (the default): what a node syncing and relaying on a busy network records:
  by count mostly inv, tx, getdata, ping/pong; by bytes mostly blocks (hundreds to
  thousands of segwit and legacy transactions each), plus compact blocks, headers,
  addr/addrv2 and the handshake. Every payload is a valid serialization.
- ``messages``: small messages only, the real records Bitcoin Core wrote in
  ``tests/data/core-v30-pair`` (handshake, ping/pong, inv, getdata, headers, getheaders,
  compact blocks, small regtest blocks and transactions; about 200 bytes each), the
  conversation repeated in order, times shifted, until the size is reached.

    python bench/gen_capture.py OUT_DIR --mb 200
    python bench/gen_capture.py OUT_DIR --mb 40 --kind messages
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from msgcap.capture.conversation import folder_conversation
from msgcap.capture.records import Direction, encode_record
from msgcap.parser.messages import (
    AddrV2,
    BlockMsg,
    CmpctBlock,
    FeeFilter,
    GetData,
    Headers,
    Inv,
    Ping,
    Pong,
    SendCmpct,
    Tx,
    Verack,
    Version,
)
from msgcap.parser.structures import (
    AddressV1,
    AddressV2,
    Block,
    BlockHeader,
    HeaderAndShortIDs,
    Inventory,
    OutPoint,
    PrefilledTransaction,
    Transaction,
    TxIn,
    TxOut,
)


def make_tx(rng: random.Random) -> Transaction:
    n_in = rng.choice((1, 1, 1, 2, 2, 3))
    n_out = rng.choice((1, 2, 2, 2, 3))
    segwit = rng.random() < 0.8
    inputs = tuple(
        TxIn(
            OutPoint(rng.randbytes(32), rng.randrange(4)),
            b"" if segwit else rng.randbytes(rng.choice((106, 107, 139))),
            0xFFFFFFFD,
        )
        for _ in range(n_in)
    )
    outputs = tuple(
        TxOut(rng.randrange(10**10), b"\x00\x14" + rng.randbytes(20)) for _ in range(n_out)
    )
    witnesses = (
        tuple((rng.randbytes(rng.choice((71, 72))), rng.randbytes(33)) for _ in range(n_in))
        if segwit
        else ()
    )
    return Transaction(2, inputs, outputs, witnesses, 0, 1 if segwit else 0)


def make_header(rng: random.Random) -> BlockHeader:
    return BlockHeader(
        0x20000000,
        rng.randbytes(32),
        rng.randbytes(32),
        1_700_000_000,
        0x1703A30C,
        rng.randrange(2**32),
    )


def make_message(rng: random.Random) -> tuple[str, bytes]:
    x = rng.random()
    if x < 0.30:
        inv = tuple(
            Inventory(rng.choice((1, 5)), rng.randbytes(32)) for _ in range(rng.randint(1, 35))
        )
        return "inv", Inv(inv).encode()
    if x < 0.62:
        return "tx", Tx(make_tx(rng)).encode()
    if x < 0.70:
        inv = tuple(Inventory(0x40000001, rng.randbytes(32)) for _ in range(rng.randint(1, 20)))
        return "getdata", GetData(inv).encode()
    if x < 0.76:
        return "ping", Ping(rng.randrange(2**64)).encode()
    if x < 0.82:
        return "pong", Pong(rng.randrange(2**64)).encode()
    if x < 0.85:
        hs = HeaderAndShortIDs(
            make_header(rng),
            rng.randrange(2**64),
            tuple(rng.randrange(2**48) for _ in range(rng.randint(100, 3000))),
            (PrefilledTransaction(0, make_tx(rng)),),
        )
        return "cmpctblock", CmpctBlock(hs).encode()
    if x < 0.875:
        txs = tuple(make_tx(rng) for _ in range(rng.randint(200, 2500)))
        return "block", BlockMsg(Block(make_header(rng), txs)).encode()
    if x < 0.90:
        return "headers", Headers(
            tuple(make_header(rng) for _ in range(rng.randint(1, 2000)))
        ).encode()
    if x < 0.93:
        addrs = tuple(
            AddressV2(1_700_000_000, 0x409, 1, rng.randbytes(4), 8333)
            for _ in range(rng.randint(1, 10))
        )
        return "addrv2", AddrV2(addrs).encode()
    if x < 0.96:
        return "feefilter", FeeFilter(rng.randrange(1000, 100000)).encode()
    if x < 0.98:
        return "sendcmpct", SendCmpct(0, 2).encode()
    if x < 0.99:
        return "verack", Verack().encode()
    zero = AddressV1(None, 0, b"\0" * 16, 0)
    return "version", Version(
        70016,
        0x409,
        1_700_000_000,
        zero,
        zero,
        rng.randrange(2**64),
        "/Satoshi:30.0.0/",
        900_000,
        1,
    ).encode()


def generate(out: Path, megabytes: float, seed: int = 1) -> Path:
    """Write ``<out>/203.0.113.7_8333/msgs_{recv,sent}.dat`` of about ``megabytes`` MB."""
    rng = random.Random(seed)
    folder = out / "203.0.113.7_8333"
    folder.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1_000_000)
    written = 0
    t = 1_795_000_000_000_000
    with open(folder / "msgs_recv.dat", "wb") as recv, open(folder / "msgs_sent.dat", "wb") as sent:
        while written < target:
            msgtype, payload = make_message(rng)
            t += rng.randint(1, 5000)
            record = encode_record(t, msgtype, payload)
            (recv if rng.random() < 0.6 else sent).write(record)
            written += len(record)
    return folder


CORE_PAIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "core-v30-pair"
SMALL = 1000
"""Largest payload taken from Core's capture for the ``messages`` kind (all of them are)."""


def generate_messages(out: Path, megabytes: float) -> Path:
    """Like :func:`generate`, from Core's real small records (the ``messages`` kind)."""
    conv = [
        item
        for item in folder_conversation(CORE_PAIR / "a" / "127.0.0.1_39912")
        if len(item.record.payload) <= SMALL
    ]
    first, last = conv[0].record.time, conv[-1].record.time
    span = last - first + 1000
    folder = out / "203.0.113.7_8333"
    folder.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1_000_000)
    written = 0
    shift = 1_795_000_000_000_000 - first
    with open(folder / "msgs_recv.dat", "wb") as recv, open(folder / "msgs_sent.dat", "wb") as sent:
        while written < target:
            for item in conv:
                rec = item.record
                record = encode_record(rec.time + shift, rec.msgtype, rec.payload)
                (recv if item.direction is Direction.RECV else sent).write(record)
                written += len(record)
            shift += span
    return folder


KINDS = {"blocks": generate, "messages": generate_messages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--seed", type=int, default=1, help="for --kind blocks")
    ap.add_argument("--kind", choices=sorted(KINDS), default="blocks")
    args = ap.parse_args()
    if args.kind == "messages":
        print(generate_messages(args.out, args.mb))
    else:
        print(generate(args.out, args.mb, args.seed))


if __name__ == "__main__":
    main()
