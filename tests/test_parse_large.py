"""Real-size traffic: a capture in Core's layout that holds mainnet block 413,567 (999,887
bytes, 1,557 real transactions) and 4,000,000-byte messages (the largest payload Core
accepts: a segwit block, a transaction, an unknown type) among a normal conversation,
through ``msgcap parse``, ``stats``, ``compare`` and ``export --parquet`` + ``sql``.

The expected values come from elsewhere than msgcap: Core's parser loop on verystable's
classes (``tests/core_reference.py``), the files' bytes walked here with ``struct``, and
verystable's own hashes and sizes. Each command runs both with the native code and with
its Python twins (``MSGCAP_PURE_PYTHON=1``, in a subprocess: the switch is read at import).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verystable.core import messages as vm  # type: ignore[import-untyped]
from verystable.core.blocktools import (  # type: ignore[import-untyped]
    add_witness_commitment,
    create_coinbase,
)

from msgcap.capture.compare import compare_folders
from msgcap.parser import dataset
from msgcap.parser.dataset import decode as dataset_decode
from msgcap.parser.dataset import export as dataset_export
from msgcap.parser.dataset import writing as dataset_writing
from msgcap.parser.messages import MESSAGES, decode_message
from msgcap.parser.wire import DecodeError
from tests.conftest import MUTATIONS, mutated
from tests.core_reference import parse_files
from tests.vectors import VECTORS

_fastjson: Any
try:
    from msgcap.parser import _fastjson
except ImportError:
    _fastjson = None
needs_native = pytest.mark.skipif(_fastjson is None, reason="parser/_fastjson.c not compiled")

MAINNET = Path(__file__).parent / "data" / "mainnet" / "block413567.raw"
MAINNET_HASH = "0000000000000000025aff8be8a55df8f89c77296db6198f272d6577325d4069"
MAX_PAYLOAD = 4_000_000  # Core's MAX_PROTOCOL_MESSAGE_LENGTH: a payload of this size is accepted
T0 = 1_795_000_000_000_000  # 2026-11-18, µs
STEP = 1000
PEER = "203.0.113.7_8333"
DAMAGED_PEER = "198.51.100.2_8333"
HEADER = struct.Struct("<Q12sI")
IMPLS = ["native", "python"]


# --- building the capture (verystable's classes, struct; nothing of msgcap) -----------------


@dataclass(frozen=True)
class Rec:
    """One record as written: its file, offset, time, type and payload."""

    direction: str
    offset: int
    time: int
    msgtype: str
    payload: bytes

    def __repr__(self) -> str:  # not the payload's 4 MB
        size = len(self.payload)
        return f"Rec({self.direction} @{self.offset} t={self.time} {self.msgtype} {size} bytes)"


def write_capture(folder: Path, records: list[tuple[str, int, str, bytes]]) -> list[Rec]:
    """Write ``(direction, time, msgtype, payload)`` records, each appended to its file in
    Core's record format, as Core's CaptureMessageToFile does."""
    folder.mkdir(parents=True)
    out = []
    for direction, t, msgtype, payload in records:
        path = folder / f"msgs_{direction}.dat"
        with open(path, "ab") as f:
            offset = f.tell()
            f.write(HEADER.pack(t, msgtype.encode(), len(payload)) + payload)
        out.append(Rec(direction, offset, t, msgtype, payload))
    return out


def exactly(build: Callable[[int], bytes], size: int) -> bytes:
    """``build(n)`` for the ``n`` (a padding length) that makes it ``size`` bytes."""
    n = max(size - len(build(0)), 0)
    for _ in range(4):
        data = build(n)
        if len(data) == size:
            return data
        n += size - len(data)
    raise AssertionError(f"no padding gives {size} bytes")


def segwit_tx(rng: random.Random, witness: bytes, op_return: bytes = b"") -> vm.CTransaction:
    """A P2WPKH-style spend whose witness holds ``witness`` as its last item, with an
    OP_RETURN output of ``op_return`` (pushed with OP_PUSHDATA4) if given."""
    tx = vm.CTransaction()
    tx.version = 2
    tx.vin = [vm.CTxIn(vm.COutPoint(rng.getrandbits(256), rng.randrange(4)), b"", 0xFFFFFFFD)]
    tx.vout = [vm.CTxOut(rng.randrange(10**8), b"\x00\x14" + rng.randbytes(20))]
    if op_return:
        push = b"\x6a\x4e" + len(op_return).to_bytes(4, "little") + op_return
        tx.vout.append(vm.CTxOut(0, push))
    wit = vm.CTxInWitness()
    wit.scriptWitness.stack = [rng.randbytes(71), rng.randbytes(33), witness]
    tx.wit.vtxinwit = [wit]
    tx.nLockTime = 413_567
    tx.rehash()
    return tx


def big_block(parent: vm.CBlock, padding: int) -> vm.CBlock:
    """Block 413,568 of a segwit chain: a coinbase with a BIP34 height and a witness
    commitment, the parent's 1,556 legacy transactions, and segwit ones with witness
    items of 100-200 kB (the last one padded by ``padding`` bytes)."""
    rng = random.Random(413_568)
    block = vm.CBlock()
    block.nVersion = 0x20000000
    block.hashPrevBlock = parent.sha256
    block.nTime = parent.nTime + 600
    block.nBits = parent.nBits
    block.nNonce = 0x5EED
    coinbase = create_coinbase(413_568, nValue=12)
    coinbase.vin[0].scriptSig = bytes(coinbase.vin[0].scriptSig) + b"\x08/msgcap/"
    block.vtx = [coinbase, *parent.vtx[1:]]
    block.vtx += [segwit_tx(rng, rng.randbytes(rng.randrange(100_000, 200_000))) for _ in range(14)]
    block.vtx.append(segwit_tx(rng, rng.randbytes(padding)))
    add_witness_commitment(block)
    return block


@dataclass(frozen=True, repr=False)
class Capture:
    root: Path
    """The capture folder (holding the peer folder)."""
    folder: Path
    """``root / PEER``"""
    records: list[Rec]
    """In writing order (which is time order)."""
    mainnet: vm.CBlock
    big_block: vm.CBlock
    big_tx: vm.CTransaction
    real_tx: vm.CTransaction

    def files(self) -> list[str]:
        return [str(self.folder / "msgs_recv.dat"), str(self.folder / "msgs_sent.dat")]

    def of_type(self, msgtype: str, size: int | None = None) -> list[Rec]:
        return [
            r
            for r in self.records
            if r.msgtype == msgtype and (size is None or len(r.payload) == size)
        ]


def build_capture(root: Path) -> Capture:
    raw = MAINNET.read_bytes()
    mainnet = vm.CBlock()
    mainnet.deserialize(BytesIO(raw))
    mainnet.rehash()
    for tx in mainnet.vtx:
        tx.rehash()
    assert mainnet.hash == MAINNET_HASH and len(raw) == 999_887 and len(mainnet.vtx) == 1557

    block_bytes = exactly(lambda n: big_block(mainnet, n).serialize(), MAX_PAYLOAD)
    block = vm.CBlock()
    block.deserialize(BytesIO(block_bytes))
    block.rehash()
    big_tx_bytes = exactly(
        lambda n: segwit_tx(random.Random(7), random.Random(8).randbytes(n), b"\x01" * 300_000)
        .serialize_with_witness(),
        MAX_PAYLOAD,
    )  # fmt: skip
    big_tx = vm.CTransaction()
    big_tx.deserialize(BytesIO(big_tx_bytes))
    big_tx.rehash()
    unknown = random.Random(9).randbytes(MAX_PAYLOAD)
    real_tx = mainnet.vtx[1]

    ours = vm.msg_version()
    ours.nVersion, ours.nServices, ours.nTime, ours.nNonce = 70016, 9 | 1024, T0 // 10**6, 1
    ours.strSubVer, ours.nStartingHeight, ours.relay = "/Satoshi:27.0.0/", 413_566, 1
    theirs = vm.msg_version()
    theirs.nVersion, theirs.nServices, theirs.nTime, theirs.nNonce = 70015, 9, T0 // 10**6, 2
    theirs.strSubVer, theirs.nStartingHeight, theirs.relay = "/Satoshi:0.12.1/", 413_567, 1
    headers = vm.msg_headers([vm.CBlockHeader(mainnet)])
    witness_block = vm.MSG_BLOCK | vm.MSG_WITNESS_FLAG
    announced = [vm.CInv(vm.MSG_TX, tx.sha256) for tx in mainnet.vtx]
    spec: list[tuple[str, str, bytes]] = [
        ("sent", "version", ours.serialize()),
        ("recv", "version", theirs.serialize()),
        ("recv", "verack", b""),
        ("sent", "verack", b""),
        ("recv", "sendcmpct", vm.msg_sendcmpct(False, 2).serialize()),
        ("recv", "headers", headers.serialize()),
        ("recv", "inv", vm.msg_inv(announced).serialize()),
        ("sent", "getdata", vm.msg_getdata([vm.CInv(vm.MSG_WITNESS_TX, real_tx.sha256),
                                            vm.CInv(witness_block, mainnet.sha256)]).serialize()),
        ("recv", "tx", real_tx.serialize_with_witness()),
        ("recv", "block", raw),  # the bytes as they are, not serialized again
        ("recv", "inv", vm.msg_inv([vm.CInv(vm.MSG_BLOCK, block.sha256)]).serialize()),
        ("sent", "getdata", vm.msg_getdata([vm.CInv(witness_block, block.sha256)]).serialize()),
        ("recv", "block", block_bytes),
        ("recv", "tx", big_tx_bytes),
        ("sent", "ping", vm.msg_ping(0x0123456789ABCDEF).serialize()),
        ("recv", "pong", vm.msg_pong(0x0123456789ABCDEF).serialize()),
        ("recv", "hugething", unknown),
        ("recv", "getdata", vm.msg_getdata([vm.CInv(witness_block, block.sha256)]).serialize()),
        ("sent", "block", block_bytes),  # the node serves it back
        ("recv", "ping", vm.msg_ping(7).serialize()),
        ("sent", "pong", vm.msg_pong(7).serialize()),
    ]  # fmt: skip
    timed = [(d, T0 + i * STEP, t, p) for i, (d, t, p) in enumerate(spec)]
    # Both verack records at one time (Core's clock can tie): recv is given first.
    timed[3] = ("sent", timed[2][1], "verack", b"")
    records = write_capture(root / PEER, timed)
    return Capture(root, root / PEER, records, mainnet, block, big_tx, real_tx)


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Capture:
    return build_capture(tmp_path_factory.mktemp("large") / "capture")


@pytest.fixture(scope="module")
def core_json(capture: Capture) -> list[dict[str, Any]]:
    """What Core's message-capture-parser.py prints for the peer folder's two files."""
    out: list[dict[str, Any]] = json.loads(parse_files(capture.files()))
    return out


def test_the_capture_holds_real_size_messages(capture: Capture) -> None:
    sizes = Counter((r.msgtype, len(r.payload)) for r in capture.records)
    assert sizes[("block", 999_887)] == 1
    assert sizes[("block", MAX_PAYLOAD)] == 2
    assert sizes[("tx", MAX_PAYLOAD)] == 1 and sizes[("hugething", MAX_PAYLOAD)] == 1
    # The big block: a segwit block of 1,572 transactions, witness items past 64 KiB.
    assert len(capture.big_block.vtx) == 1 + 1556 + 15
    assert capture.big_block.hashPrevBlock == capture.mainnet.sha256
    assert capture.big_block.hashMerkleRoot == capture.big_block.calc_merkle_root()
    assert len(capture.big_tx.wit.vtxinwit[0].scriptWitness.stack[-1]) > 3_000_000
    assert len(capture.big_tx.vout[1].scriptPubKey) > 0xFFFF
    total = sum(os.path.getsize(f) for f in capture.files())
    assert total == sum(24 + len(r.payload) for r in capture.records)


# --- running msgcap ------------------------------------------------------------------------


def msgcap_process(impl: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``msgcap ARGS`` in a new process, with the native code or only its Python twins."""
    env = {**os.environ, "MSGCAP_PURE_PYTHON": "1" if impl == "python" else ""}
    return subprocess.run(
        [sys.executable, "-m", "msgcap", *args], capture_output=True, env=env, check=False
    )


def file_records(folder: Path) -> Iterator[Rec]:
    """The records of a peer folder's files, walked with struct (not msgcap's reader)."""
    for direction in ("recv", "sent"):
        data = (folder / f"msgs_{direction}.dat").read_bytes()
        pos = 0
        while pos < len(data):
            t, raw, n = HEADER.unpack_from(data, pos)
            payload = data[pos + 24 : pos + 24 + n]
            assert len(payload) == n
            yield Rec(direction, pos, t, raw.rstrip(b"\0").decode(), payload)
            pos += 24 + n


# --- parse -----------------------------------------------------------------------------------


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_parse_is_cores_json(
    tmp_path: Path, capture: Capture, core_json: list[dict[str, Any]], jsonl: bool
) -> None:
    unknown = capture.of_type("hugething")[0]
    unknown_warning = (
        f"msgcap: warning: {capture.folder / 'msgs_recv.dat'}: offset {unknown.offset}: "
        "unrecognized message type 'hugething'\n"
    )
    texts = []
    for impl in IMPLS:
        out = tmp_path / f"{impl}.json"
        mode = ["--jsonl"] if jsonl else []
        res = msgcap_process(impl, "parse", *mode, "-o", str(out), str(capture.root))
        assert res.returncode == 0, (impl, res.stderr)
        assert res.stderr.decode() == unknown_warning, impl
        texts.append(out.read_bytes())
    assert texts[0] == texts[1]  # native and Python write the same bytes
    text = texts[0]
    ours = [json.loads(line) for line in text.splitlines()] if jsonl else json.loads(text)
    assert ours == core_json
    # Nothing lost, checked against the files themselves too (not only against Core).
    by_time = sorted(capture.records, key=lambda r: (r.time, r.direction != "recv"))
    assert [(m["direction"], m["time"], m["msgtype"], m["size"]) for m in ours] == [
        (r.direction, r.time, r.msgtype, len(r.payload)) for r in by_time
    ]
    unknown_json = next(m for m in ours if m["msgtype"] == "hugething")
    assert unknown_json["error"] == "Unrecognized message type."
    assert bytes.fromhex(unknown_json["body"]) == unknown.payload
    big_tx = next(m["body"]["tx"] for m in ours if m["msgtype"] == "tx" and m["size"] > 10**6)
    assert big_tx["wit"]["vtxinwit"][0]["scriptWitness"]["stack"][-1] == (
        capture.big_tx.wit.vtxinwit[0].scriptWitness.stack[-1].hex()
    )
    blocks = [m["body"]["block"]["vtx"] for m in ours if m["msgtype"] == "block"]
    assert [len(vtx) for vtx in blocks] == [1557, 1572, 1572]
    assert blocks[0][1] == next(m["body"]["tx"] for m in ours if m["msgtype"] == "tx")


# --- stats -----------------------------------------------------------------------------------


def expected_stats(folder: Path) -> dict[tuple[str, str, str], tuple[int, int]]:
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    for r in file_records(folder):
        n, size = out.get((folder.name, r.direction, r.msgtype), (0, 0))
        out[(folder.name, r.direction, r.msgtype)] = (n + 1, size + len(r.payload))
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_counts_messages_and_bytes(capture: Capture, impl: str) -> None:
    res = msgcap_process(impl, "stats", str(capture.root))
    assert res.returncode == 0 and res.stderr == b"", res.stderr
    lines = res.stdout.decode().splitlines()
    assert lines[0].split() == ["peer", "direction", "msgtype", "messages", "bytes"]
    assert lines[-1].startswith("(bytes are payload bytes")
    rows = [line.split() for line in lines[1:-1]]
    per_type = {(r[0], r[1], r[2]): (int(r[3]), int(r[4])) for r in rows if len(r) == 5}
    totals = {(r[0], r[1]): (int(r[3]), int(r[4])) for r in rows if r[2:3] == ["(all)"]}
    expected = expected_stats(capture.folder)
    assert {k: v for k, v in per_type.items() if k[2] != "(all)"} == expected
    for direction in ("recv", "sent"):
        mine = [v for k, v in expected.items() if k[1] == direction]
        assert totals[(PEER, direction)] == (sum(n for n, _ in mine), sum(b for _, b in mine))
    everything = next(r for r in rows if r[0] == "(all)")
    assert [int(x) for x in everything[1:]] == [
        len(capture.records),
        sum(len(r.payload) for r in capture.records),
    ]
    assert per_type[(PEER, "recv", "block")] == (2, 999_887 + MAX_PAYLOAD)
    assert per_type[(PEER, "recv", "hugething")] == (1, MAX_PAYLOAD)


# --- compare ---------------------------------------------------------------------------------


def flipped_copy(capture: Capture, dst: Path, target: Rec, at: int) -> None:
    """A copy of the peer folder with one byte of ``target``'s payload changed."""
    shutil.copytree(capture.folder, dst)
    path = dst / f"msgs_{target.direction}.dat"
    with open(path, "r+b") as f:
        f.seek(target.offset + 24 + at)
        byte = f.read(1)[0]
        f.seek(target.offset + 24 + at)
        f.write(bytes([byte ^ 0x01]))


def test_compare_with_itself_and_a_copy(tmp_path: Path, capture: Capture) -> None:
    copy = tmp_path / PEER
    shutil.copytree(capture.folder, copy)
    n_recv = sum(r.direction == "recv" for r in capture.records)
    for other in (capture.folder, copy):
        recv, sent = compare_folders(capture.folder, other)
        assert recv.identical and sent.identical
        assert (recv.a_count, recv.b_count, recv.matched) == (n_recv, n_recv, n_recv)
        n_sent = len(capture.records) - n_recv
        assert (sent.a_count, sent.b_count, sent.matched) == (n_sent, n_sent, n_sent)


@pytest.mark.parametrize("impl", IMPLS)
def test_compare_finds_one_byte_in_a_big_message(
    tmp_path: Path, capture: Capture, impl: str
) -> None:
    res = msgcap_process(impl, "compare", str(capture.folder), str(capture.folder))
    assert res.returncode == 0 and res.stdout.decode().count("identical") == 2, res.stdout
    big_tx = capture.of_type("tx", MAX_PAYLOAD)[0]
    changed = tmp_path / "changed"
    flipped_copy(capture, changed, big_tx, MAX_PAYLOAD - 5)  # the last byte before nLockTime
    res = msgcap_process(impl, "compare", "--json", str(capture.folder), str(changed))
    assert res.returncode == 1, res.stderr
    recv, sent = json.loads(res.stdout)
    assert sent["identical"] and not recv["identical"]
    index = [r for r in capture.records if r.direction == "recv"].index(big_tx)
    assert recv["matched"] == index and recv["type_counts"] == {} and recv["damage"] == []
    assert recv["a_count"] == recv["b_count"] == index + 5
    changed_payload = bytearray(big_tx.payload)
    changed_payload[MAX_PAYLOAD - 5] ^= 1
    assert recv["first_difference"] == {
        "a": {"index": index, "msgtype": "tx", "size": MAX_PAYLOAD,
              "sha256": hashlib.sha256(big_tx.payload).hexdigest()},
        "b": {"index": index, "msgtype": "tx", "size": MAX_PAYLOAD,
              "sha256": hashlib.sha256(changed_payload).hexdigest()},
    }  # fmt: skip


def test_compare_finds_one_byte_in_the_sent_block(tmp_path: Path, capture: Capture) -> None:
    sent_block = capture.of_type("block", MAX_PAYLOAD)[-1]
    assert sent_block.direction == "sent"
    changed = tmp_path / "changed"
    flipped_copy(capture, changed, sent_block, 80)  # the block's transaction count
    recv, sent = compare_folders(capture.folder, changed)
    assert recv.identical and not sent.identical
    index = [r for r in capture.records if r.direction == "sent"].index(sent_block)
    assert sent.matched == index and sent.first_a is not None and sent.first_b is not None
    assert sent.first_a.payload == sent_block.payload and sent.first_b.index == index
    assert sent.first_b.payload[81:] == sent_block.payload[81:]
    assert "block (4000000 bytes" in sent.summary()


# --- export --parquet and sql ----------------------------------------------------------------


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_dataset = pytest.mark.skipif(
    not (_installed("pyarrow") and _installed("duckdb")), reason="needs msgcap[dataset]"
)


def display(h: int) -> str:
    """A 256-bit hash as verystable holds it, in display (RPC) order."""
    return f"{h:064x}"


def expected_tables(capture: Capture) -> dict[str, list[tuple[Any, ...]]]:
    """The rows the four tables must hold, from the files and verystable's classes."""
    messages = [
        (r.direction, r.offset, r.msgtype, len(r.payload), r.time, r.payload)
        for r in file_records(capture.folder)
    ]
    blocks = []
    for r in capture.of_type("block"):
        b = capture.mainnet if len(r.payload) < MAX_PAYLOAD else capture.big_block
        height = 413_567 if b is capture.mainnet else 413_568
        blocks.append((r.direction, r.offset, "block", b.hash, display(b.hashPrevBlock), height,
                       len(b.vtx), b.nTime * 10**6, len(r.payload)))  # fmt: skip
    transactions = []
    for r in capture.of_type("tx"):
        tx = capture.real_tx if len(r.payload) < MAX_PAYLOAD else capture.big_tx
        wtxid = display(tx.calc_sha256(with_witness=True))
        transactions.append((r.direction, r.offset, tx.hash, wtxid, len(r.payload),
                             tx.get_vsize(), len(tx.vin), len(tx.vout)))  # fmt: skip
    names = {1: "MSG_TX", 2: "MSG_BLOCK", 0x40000001: "MSG_WITNESS_TX",
             0x40000002: "MSG_WITNESS_BLOCK"}  # fmt: skip
    inv_items = []
    for r in capture.records:
        if r.msgtype in ("inv", "getdata"):
            msg = vm.msg_inv() if r.msgtype == "inv" else vm.msg_getdata()
            msg.deserialize(BytesIO(r.payload))
            for i, entry in enumerate(msg.inv):
                inv_items.append((r.direction, r.offset, r.msgtype, i, names[entry.type],
                                  entry.type, display(entry.hash)))  # fmt: skip
    return {"messages": messages, "blocks": blocks, "transactions": transactions,
            "inv_items": inv_items}  # fmt: skip


QUERIES = {
    "messages": "select direction, file_offset, msgtype, size, epoch_us(time), payload "
    "from messages",
    "blocks": "select direction, file_offset, msgtype, hash, prev_hash, height, tx_count, "
    "epoch_us(block_time), size from blocks",
    "transactions": "select direction, file_offset, txid, wtxid, size, vsize, inputs, outputs "
    "from transactions",
    "inv_items": 'select direction, file_offset, msgtype, "index", inv_type, inv_type_id, hash '
    "from inv_items",
}


def dataset_rows(out: Path) -> dict[str, list[tuple[Any, ...]]]:
    con = dataset.connect(out)
    try:
        tables = {name: sorted(con.execute(q).fetchall()) for name, q in QUERIES.items()}
        common = con.execute(
            "select distinct node, peer, connection, typeof(payload) from messages"
        ).fetchall()
    finally:
        con.close()
    assert common == [("capture", PEER, None, "BLOB")]
    return tables


@needs_dataset
@pytest.mark.parametrize("impl", IMPLS)
def test_export_parquet_and_sql(tmp_path: Path, capture: Capture, impl: str) -> None:
    out = tmp_path / "ds"
    res = msgcap_process(impl, "export", "--parquet", str(out), str(capture.root))
    assert res.returncode == 0 and res.stderr == b"", res.stderr
    assert res.stdout.decode().startswith(f"{len(capture.records)} new messages")
    expected = expected_tables(capture)
    got = dataset_rows(out)
    for table in QUERIES:
        assert got[table] == sorted(expected[table]), table
    assert len(got["inv_items"]) == 1557 + 2 + 1 + 1 + 1
    # msgcap sql, as a user runs it
    res = msgcap_process(
        impl, "sql", str(out), "select msgtype, count(*) as n, sum(size) as bytes, "
        "max(octet_length(payload)) as largest from messages group by all order by bytes desc",
        "--format", "csv",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = list(csv.reader(io.StringIO(res.stdout.decode())))
    assert rows[0] == ["msgtype", "n", "bytes", "largest"]
    assert rows[1] == ["block", "3", str(999_887 + 2 * MAX_PAYLOAD), str(MAX_PAYLOAD)]
    assert {r[0] for r in rows[1:4]} == {"block", "tx", "hugething"}


@needs_dataset
def test_export_walks_records_longer_than_its_window(
    tmp_path: Path, capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mapped walk takes 16 MB windows: with a window smaller than one record (and a
    row group smaller than one payload) every record is still exported once, whole."""
    monkeypatch.setattr(dataset_export, "WINDOW", 1 << 20)
    monkeypatch.setattr(dataset_writing, "ROW_GROUP_BYTES", 1 << 20)
    monkeypatch.setattr(dataset_writing, "MEMORY_BUDGET", 2 << 20)
    out = tmp_path / "ds"
    result = dataset.export_parquet([capture.root], out, report=dataset.Report(io.StringIO()))
    assert result.records == len(capture.records)
    expected = expected_tables(capture)
    got = dataset_rows(out)
    for table in QUERIES:
        assert got[table] == sorted(expected[table]), table


# --- a block that does not decode, and a big record cut short ---------------------------------


@dataclass(frozen=True, repr=False)
class Damaged:
    folder: Path
    records: list[Rec]
    short_block: Rec
    """A 4,000,000-byte block whose transaction count says one more than it holds."""
    cut_at: int
    """Where the last record of msgs_sent.dat starts: a big block cut short by a crash."""


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, capture: Capture) -> Damaged:
    payload = bytearray(capture.of_type("block", MAX_PAYLOAD)[0].payload)
    assert payload[80] == 0xFD and int.from_bytes(payload[81:83], "little") == 1572
    payload[81:83] = (1573).to_bytes(2, "little")
    folder = tmp_path_factory.mktemp("damaged") / DAMAGED_PEER
    records = write_capture(folder, [
        ("recv", T0, "ping", vm.msg_ping(1).serialize()),
        ("recv", T0 + 1, "block", bytes(payload)),
        ("recv", T0 + 2, "ping", vm.msg_ping(2).serialize()),
        ("sent", T0 + 3, "pong", vm.msg_pong(1).serialize()),
    ])  # fmt: skip
    sent = folder / "msgs_sent.dat"
    cut_at = sent.stat().st_size
    with open(sent, "ab") as f:  # 3 MB of a 4 MB record, then the crash
        f.write(HEADER.pack(T0 + 4, b"block", MAX_PAYLOAD) + bytes(payload[:3_000_000]))
    return Damaged(folder, records, records[1], cut_at)


def run_on_damaged(impl: str, damaged: Damaged, *args: str) -> tuple[str, Path, Path]:
    """``msgcap ARGS FOLDER`` on the damaged capture, which must exit 1: its stderr, and
    the folder's recv and sent files (the ones the warnings name)."""
    res = msgcap_process(impl, *args, str(damaged.folder))
    assert res.returncode == 1
    return res.stderr.decode(), damaged.folder / "msgs_recv.dat", damaged.folder / "msgs_sent.dat"


@pytest.mark.parametrize("impl", IMPLS)
def test_parse_prints_an_undecodable_big_block_whole(
    tmp_path: Path, damaged: Damaged, impl: str
) -> None:
    out = tmp_path / "out.json"
    err, recv, sent = run_on_damaged(impl, damaged, "parse", "-o", str(out))
    warnings = err.splitlines()
    assert warnings == [
        f"msgcap: warning: {recv}: offset {damaged.short_block.offset}: block: need 4 bytes, "
        f"0 left at payload offset {MAX_PAYLOAD}",
        f"msgcap: warning: {sent}: offset {damaged.cut_at}: truncated record: type 'block' "
        f"declares {MAX_PAYLOAD} payload bytes, 3000000 before end of file (3000024 bytes "
        "skipped)",
    ]
    ours = json.loads(out.read_text())
    assert [m["msgtype"] for m in ours] == ["ping", "block", "ping", "pong"]
    assert ours[1] == {
        "direction": "recv", "time": T0 + 1, "size": MAX_PAYLOAD, "msgtype": "block",
        "body": damaged.short_block.payload.hex(), "error": "Unable to deserialize message.",
    }  # fmt: skip
    # Core's parser reads the missing transaction as zeros (DESIGN.md §6: the deviation
    # we make on purpose); everything else it prints as we do.
    core = json.loads(parse_files([str(recv), str(sent)]))
    assert core[:1] + core[2:4] == ours[:1] + ours[2:]
    vtx = core[1]["body"]["block"]["vtx"]
    assert len(vtx) == 1573 and vtx[-1] == {
        "nLockTime": 0, "version": 0, "vin": [], "vout": [], "wit": {"vtxinwit": []}
    }  # fmt: skip


@needs_dataset
@pytest.mark.parametrize("impl", IMPLS)
def test_export_leaves_an_undecodable_big_block_out_of_blocks(
    tmp_path: Path, damaged: Damaged, impl: str
) -> None:
    out = tmp_path / "ds"
    err, recv, sent = run_on_damaged(impl, damaged, "export", "--parquet", str(out))
    assert f"{recv}: offset {damaged.short_block.offset}: " in err and "not in blocks" in err
    assert f"{sent}: offset {damaged.cut_at}: truncated record" in err
    con = dataset.connect(out)
    try:
        messages = con.execute(
            "select msgtype, size, file_offset, payload from messages order by time"
        ).fetchall()
        blocks = con.execute("select count(*) from blocks").fetchall()
    finally:
        con.close()
    assert [(m[0], m[1], m[2]) for m in messages] == [
        (r.msgtype, len(r.payload), r.offset) for r in damaged.records
    ]
    assert messages[1][3] == damaged.short_block.payload
    assert blocks == [(0,)]


# --- the payload check behind the derived tables -----------------------------------------------


def _pool() -> list[bytes]:
    """Transactions to build blocks of: real ones with 253-byte scriptSigs, 274 inputs and
    149 outputs (CompactSizes of 3 bytes), segwit ones with a witness item past 64 KiB,
    and a legacy one without inputs (which the plain walk leaves to the typed codec)."""
    mainnet = vm.CBlock()
    mainnet.deserialize(BytesIO(MAINNET.read_bytes()))
    real = [mainnet.vtx[i].serialize_with_witness() for i in (0, 1, 135, 556, 561)]
    rng = random.Random(3)
    segwit = [segwit_tx(rng, rng.randbytes(n)).serialize_with_witness() for n in (0, 300, 70_000)]
    return [*real, *segwit, bytes.fromhex(VECTORS["tx"]), bytes.fromhex("01000000000000000000")]


POOL = _pool()


def typed_verdict(msgtype: str, payload: bytes) -> tuple[int, str] | None:
    try:
        decode_message(msgtype, payload)
    except DecodeError as e:
        return e.offset, e.reason
    return None


def check_verdict(msgtype: str, payload: bytes | memoryview) -> tuple[int, str] | None:
    try:
        dataset.check_payload(msgtype, payload)
    except DecodeError as e:
        return e.offset, e.reason
    return None


@settings(max_examples=300, deadline=None)
@given(
    txs=st.lists(st.sampled_from(range(len(POOL))), max_size=4),
    count=st.sampled_from(["right", "one more", "one fewer", "non-canonical"]),
    cut=st.none() | st.integers(0, 200_000),
    flip=st.none() | st.tuples(st.integers(0, 200_000), st.integers(0, 255)),
    extra=st.binary(max_size=2),
)
def test_block_check_agrees_with_the_typed_codec(
    txs: list[int], count: str, cut: int | None, flip: tuple[int, int] | None, extra: bytes
) -> None:
    """A block payload is accepted, or rejected with the same reason at the same offset,
    by the typed codec, the native check and its Python twin (mapped payloads too)."""
    n = len(txs) + {"right": 0, "one more": 1, "one fewer": -1, "non-canonical": 0}[count]
    prefix = (
        b"\xfd" + max(n, 0).to_bytes(2, "little")
        if count == "non-canonical"
        else bytes([max(n, 0)])
    )
    payload = bytearray(bytes(range(80)) + prefix + b"".join(POOL[i] for i in txs))
    if cut is not None:
        del payload[cut % (len(payload) + 1) :]
    if flip is not None and payload:
        payload[flip[0] % len(payload)] = flip[1]
    data = bytes(payload) + extra
    want = typed_verdict("block", data)
    assert check_verdict("block", data) == want
    assert check_verdict("block", memoryview(data)) == want
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset_decode, "_check", None)  # the Python twin
        assert check_verdict("block", data) == want
        assert check_verdict("block", memoryview(data)) == want


@pytest.mark.parametrize("impl", IMPLS)
def test_block_check_on_real_size_blocks(
    capture: Capture, damaged: Damaged, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if impl == "python":
        monkeypatch.setattr(dataset_decode, "_check", None)
    elif dataset_decode._check is None:
        pytest.skip("the native check is not in use")
    blocks = [MAINNET.read_bytes(), capture.of_type("block", MAX_PAYLOAD)[0].payload]
    for payload in blocks:
        assert check_verdict("block", payload) is None
        assert check_verdict("block", payload + b"\0") == (len(payload), "1 trailing bytes")
    short = damaged.short_block.payload
    assert check_verdict("block", short) == (MAX_PAYLOAD, "need 4 bytes, 0 left")
    # The Python twin walks real blocks itself (not through the typed codec's objects).
    assert dataset.txs_end(blocks[0], 83, 1557) == len(blocks[0])
    assert dataset.txs_end(blocks[1], 83, 1572) == len(blocks[1])
    assert dataset.txs_end(short, 83, 1573) is None


@needs_native
@settings(max_examples=2000, deadline=None)
@given(msgtype=st.sampled_from(sorted(MESSAGES)), **MUTATIONS)
def test_native_check_accepts_what_render_renders(
    msgtype: str, flips: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    """check() is render() writing nothing: the same verdict on every type."""
    data = mutated(bytes.fromhex(VECTORS[msgtype]) or b"\0", flips, cut, extra)
    try:
        rendered: Any = _fastjson.render(msgtype, data, False) is not None
    except ValueError as e:
        rendered = e.args
    try:
        checked: Any = _fastjson.check(msgtype, data)
    except ValueError as e:
        checked = e.args
    assert checked == rendered
