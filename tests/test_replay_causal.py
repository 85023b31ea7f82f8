"""Causal replay without a real node: what the recording answers and sends unasked
(``Recording``), how live requests are answered and divergence classified
(``Conversation``, no sockets), and, over loopback with scripted live sides, that every
wait is bounded and that a listener counts only connections that sent their version."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from msgcap.capture.framing import encode_frame, hash256
from msgcap.capture.records import Direction, encode_record
from msgcap.parser.messages import (
    BlockMsg,
    BlockTxn,
    CmpctBlock,
    GetBlocks,
    GetBlockTxn,
    Headers,
    Inv,
    NotFound,
    Ping,
    Tx,
    decode_message,
)
from msgcap.parser.structures import (
    BlockLocator,
    BlockTransactionsRequest,
    HeaderAndShortIDs,
    Inventory,
    InvType,
    PrefilledTransaction,
)
from msgcap.proxy.replay import replay_listen, replay_to
from msgcap.proxy.replay_conversation import Conversation, Kind, Report, benign
from msgcap.proxy.replay_plan import Recording, Step, load_conversation
from tests.conftest import (
    GENESIS,
    MAGIC,
    TXS,
    VERSION_PAYLOAD,
    getdata,
    getheaders,
    live_node,
    make_chain,
)
from tests.vectors import VECTORS

RECV, SENT = Direction.RECV, Direction.SENT
ZERO = bytes(32)
BLOCKS = make_chain(5)
H = [b.hash for b in BLOCKS]
"""H[i] is the hash of block i + 1."""


def display(h: bytes) -> str:
    return h[::-1].hex()


def item(kind: int, h: bytes) -> Inventory:
    return Inventory(kind, h)


def sync_steps() -> list[Step]:
    """A node syncing five blocks from the peer, as the node recorded it."""
    t = iter(range(1, 1000))
    steps = [
        Step(next(t), SENT, "version", VERSION_PAYLOAD),
        Step(next(t), RECV, "version", VERSION_PAYLOAD),
        Step(next(t), SENT, "verack", b""),
        Step(next(t), RECV, "verack", b""),
        Step(next(t), SENT, "getaddr", b""),
        Step(next(t), SENT, "ping", Ping(7).encode()),
        Step(next(t), RECV, "sendcmpct", bytes.fromhex(VECTORS["sendcmpct"])),
        Step(next(t), SENT, "getheaders", getheaders(GENESIS)),
        Step(next(t), RECV, "pong", Ping(7).encode()),
        Step(next(t), RECV, "headers", Headers(tuple(b.header for b in BLOCKS)).encode()),
        Step(next(t), SENT, "feefilter", bytes.fromhex(VECTORS["feefilter"])),
        Step(next(t), SENT, "getdata", getdata(*H[:3])),
    ]
    steps += [Step(next(t), RECV, "block", b.encode()) for b in BLOCKS[:3]]
    steps += [
        Step(next(t), SENT, "getdata", getdata(*H[3:])),
        Step(next(t), RECV, "inv", Inv((item(InvType.MSG_TX, b"\x11" * 32),)).encode()),
    ]
    steps += [Step(next(t), RECV, "block", b.encode()) for b in BLOCKS[3:]]
    return steps


def answers_of(conv: Conversation, msgtype: str, payload: bytes) -> list[tuple[str, bytes]]:
    return [(t, bytes(p)) for t, p in conv.receive(msgtype, payload)]


# --- the recording, read as requests and answers ----------------------------------------


def test_answers_are_held_back_and_the_rest_is_the_script() -> None:
    rec = Recording(sync_steps(), "peer")
    assert [s.msgtype for s in rec.script] == ["sendcmpct", "inv"]  # pong dropped
    assert [(a.request.msgtype, a.step.msgtype) for a in rec.answers] == [
        ("getheaders", "headers"), *[("getdata", "block")] * 5
    ]  # fmt: skip
    assert rec.last is not None and rec.last.describe() == f"getdata: block {display(H[4])}"
    assert rec.chain.hashes == [GENESIS, *H]
    node = Recording(sync_steps(), "node")
    assert [s.msgtype for s in node.script] == [
        "getaddr", "ping", "getheaders", "feefilter", "getdata", "getdata",
    ]  # fmt: skip
    assert node.answers == []  # the peer asked nothing


def test_blocks_are_found_by_hash_in_any_order() -> None:
    conv = Conversation(Recording(sync_steps(), "peer"))
    got = answers_of(conv, "getdata", getdata(H[4], H[0], H[2]))
    assert [t for t, _ in got] == ["block"] * 3
    assert [hash256(p[:80]) for _, p in got] == [
        H[4], H[0], H[2]
    ]  # fmt: skip
    assert conv.answered == {"getdata": 1} and conv.requests == 1


def test_headers_and_getblocks_are_cut_from_the_recorded_chain() -> None:
    conv = Conversation(Recording(sync_steps(), "peer"))

    def headers(payload: bytes) -> list[bytes]:
        ((msgtype, answer),) = answers_of(conv, "getheaders", payload)
        msg = decode_message(msgtype, answer)
        assert isinstance(msg, Headers)
        return [h.hash for h in msg.headers]

    assert headers(getheaders(GENESIS)) == H
    assert headers(getheaders(H[2], H[1], GENESIS)) == H[3:]  # the first hash on the chain
    assert headers(getheaders(b"\x99" * 32, H[1], GENESIS)) == H[2:]  # a fork below
    assert headers(getheaders(H[4], GENESIS)) == []  # at the tip: an empty answer
    assert headers(getheaders(GENESIS, stop=H[1])) == H[:2]  # the stop block included

    def inv(*locator: bytes, stop: bytes = ZERO) -> list[bytes]:
        got = answers_of(conv, "getblocks", GetBlocks(BlockLocator(70016, locator), stop).encode())
        if not got:
            return []
        msg = decode_message(*got[0])
        assert isinstance(msg, Inv) and {i.type for i in msg.inv} == {InvType.MSG_BLOCK}
        return [i.hash for i in msg.inv]

    assert inv(GENESIS) == H
    assert inv(GENESIS, stop=H[2]) == H[:2]  # the stop block left out
    assert inv(H[4]) == []  # nothing to announce: no message
    assert conv.unanswerable == {}
    stranger = b"\x99" * 32
    assert answers_of(conv, "getheaders", getheaders(stranger)) == []
    assert list(conv.unanswerable) == [("getheaders", f"locator {display(stranger)}")]


def test_an_empty_recorded_chain_answers_empty_headers() -> None:
    conv = Conversation(Recording(sync_steps(), "node"))
    assert answers_of(conv, "getheaders", getheaders(b"\x42" * 32)) == [
        ("headers", Headers(()).encode())
    ]


def test_what_the_recording_does_not_hold_is_named() -> None:
    steps = sync_steps()
    missing_tx = b"\x22" * 32
    steps += [
        Step(100, SENT, "getdata", getdata(missing_tx, kind=InvType.MSG_WTX)),
        Step(101, RECV, "notfound", NotFound((item(InvType.MSG_WTX, missing_tx),)).encode()),
    ]
    conv = Conversation(Recording(steps, "peer"))
    unknown = b"\x33" * 32
    got = answers_of(conv, "getdata", getdata(H[0], unknown))
    assert [t for t, _ in got] == ["block"]  # what it holds, and nothing for the rest
    assert answers_of(conv, "getdata", getdata(missing_tx, kind=InvType.MSG_WTX)) == [
        ("notfound", NotFound((item(InvType.MSG_WTX, missing_tx),)).encode())
    ]  # as recorded
    assert answers_of(conv, "getaddr", b"") == []  # silence answers getaddr
    substantive, _ = conv.divergence()
    assert substantive[0].kind is Kind.UNANSWERABLE
    assert substantive[0].items == (f"block {display(unknown)}",)


def test_transactions_compact_blocks_and_blocktxn() -> None:
    segwit = TXS[0]
    assert segwit.txid != segwit.wtxid
    cmpct = HeaderAndShortIDs(
        BLOCKS[4].header, 1, (), tuple(PrefilledTransaction(0, tx) for tx in TXS)
    )
    steps = sync_steps()[:-1]  # block 5 only as a compact block
    steps += [
        Step(100, SENT, "getdata", getdata(H[4], kind=InvType.MSG_CMPCT_BLOCK)),
        Step(101, RECV, "cmpctblock", CmpctBlock(cmpct).encode()),
        Step(102, SENT, "getdata", getdata(segwit.wtxid, kind=InvType.MSG_WTX)),
        Step(103, RECV, "tx", Tx(segwit).encode()),
    ]
    conv = Conversation(Recording(steps, "peer"))
    assert answers_of(conv, "getdata", getdata(segwit.wtxid, kind=InvType.MSG_WTX)) == [
        ("tx", Tx(segwit).encode())
    ]
    assert answers_of(conv, "getdata", getdata(segwit.txid, kind=InvType.MSG_TX)) == [
        ("tx", Tx(segwit).encode())
    ]
    assert answers_of(conv, "getdata", getdata(H[4], kind=InvType.MSG_CMPCT_BLOCK)) == [
        ("cmpctblock", CmpctBlock(cmpct).encode())
    ]
    # A full block: the compact block prefills every transaction.
    assert answers_of(conv, "getdata", getdata(H[4])) == [("block", BLOCKS[4].encode())]
    assert answers_of(conv, "getdata", getdata(H[0], kind=InvType.MSG_CMPCT_BLOCK)) == [
        ("block", BLOCKS[0].encode())
    ]
    request = GetBlockTxn(BlockTransactionsRequest(H[1], (0, 0))).encode()  # 0 and 1
    ((msgtype, payload),) = answers_of(conv, "getblocktxn", request)
    answer = decode_message(msgtype, payload)
    assert isinstance(answer, BlockTxn)
    assert answer.block_transactions.transactions == TXS


def test_divergence_is_classified() -> None:
    rec = Recording(sync_steps(), "peer")
    conv = Conversation(rec)
    for msgtype, payload in [
        ("version", VERSION_PAYLOAD), ("verack", b""), ("sendcmpct", b"\x00" + bytes(8)),
        ("getheaders", getheaders(GENESIS)), ("ping", Ping(1).encode()),
        ("getdata", getdata(*H[:4])),
    ]:  # fmt: skip
        conv.receive(msgtype, payload)
    assert not conv.reached
    substantive, found = conv.divergence()
    assert [(d.kind, d.msgtype, d.items) for d in substantive] == [
        (Kind.NOT_REQUESTED, "getdata", (f"block {display(H[4])}",))
    ]
    assert [(d.kind, d.msgtype, d.count) for d in found] == [
        (Kind.MISSING, "feefilter", 1),
        (Kind.MISSING, "getaddr", 1),  # an optional request: its absence is benign
        (Kind.EXTRA, "sendcmpct", 1),
    ]
    conv.receive("getdata", getdata(H[4]))
    assert conv.reached and conv.divergence()[0] == []
    assert answers_of(conv, "ping", Ping(9).encode()) == [("pong", Ping(9).encode())]


def test_benign_reordering() -> None:
    recorded = ["feefilter", "sendcmpct", "addr", "inv"]
    found = benign(recorded, ["sendcmpct", "addr", "inv", "feefilter", "inv"])
    assert [(d.kind.value, d.msgtype, d.count) for d in found] == [
        ("extra", "inv", 1), ("reordered", "feefilter", 1)  # it moved to the end
    ]  # fmt: skip
    assert benign(["getdata", "ping", "pong", "headers"], ["headers"]) == []


def test_fast_sends_the_answers_unasked() -> None:
    rec = Recording(sync_steps(), "peer")
    conv = Conversation(rec, fast=True)
    assert [s.msgtype for s in rec.played].count("block") == 5
    for s in rec.played:
        conv.played(s.msgtype, s.payload)
    assert conv.receive("getdata", getdata(H[0])) == []  # sent already
    assert conv.reached and conv.divergence()[0] == []


# --- over loopback: scripted live sides --------------------------------------------------


def write_capture(folder: Path, steps: list[Step]) -> Path:
    folder.mkdir(parents=True)
    for direction in (RECV, SENT):
        records = [encode_record(s.time, s.msgtype, s.payload) for s in steps
                   if s.direction is direction]  # fmt: skip
        (folder / direction.file_name).write_bytes(b"".join(records))
    return folder


def serve_once(**behaviour: object) -> Callable[[], Awaitable[tuple[asyncio.Server, int]]]:
    async def start() -> tuple[asyncio.Server, int]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await live_node(r, w, **behaviour)  # type: ignore[arg-type]

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()[1]

    return start


def run_to(tmp_path: Path, timeout: float, **behaviour: object) -> tuple[Report, float]:
    steps = load_conversation([write_capture(tmp_path / "cap", sync_steps())])

    async def main() -> tuple[Report, float]:
        server, port = await serve_once(**behaviour)()
        started = time.monotonic()
        report = await replay_to(steps, "127.0.0.1", port, magic=MAGIC, timeout=timeout)
        server.close()
        return report, time.monotonic() - started

    return asyncio.run(main())


def test_a_faithful_live_side_is_served_and_the_replay_ends_at_once(tmp_path: Path) -> None:
    requests = [("getheaders", getheaders(GENESIS)), ("getdata", getdata(*H))]
    report, seconds = run_to(tmp_path, 5, requests=requests)
    assert not report.diverged and report.reached, report.summary()
    assert report.sent_types["block"] == 5 and report.sent_types["headers"] == 1
    assert seconds < 2  # settled by a ping round trip, not by a timeout
    assert "reproduced" in report.summary()


def test_an_unanswerable_request_ends_the_replay_within_the_timeout(tmp_path: Path) -> None:
    unknown = b"\x33" * 32
    # It asks for a block the recording lacks, then keeps asking for headers.
    requests = [("getdata", getdata(unknown))] + [("getheaders", getheaders(GENESIS))] * 3

    async def main() -> tuple[Report, float]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            async def nag() -> None:
                while not w.is_closing():
                    w.write(encode_frame(MAGIC, "getheaders", getheaders(GENESIS)))
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(nag())
            try:
                await live_node(r, w, requests=requests)
            finally:
                task.cancel()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        steps = load_conversation([write_capture(tmp_path / "cap", sync_steps())])
        started = time.monotonic()
        report = await replay_to(steps, "127.0.0.1", server.sockets[0].getsockname()[1],
                                 magic=MAGIC, timeout=1)  # fmt: skip
        server.close()
        return report, time.monotonic() - started

    report, seconds = asyncio.run(main())
    assert seconds < 2.5, seconds
    assert report.diverged
    assert report.substantive[0].kind is Kind.UNANSWERABLE
    assert report.substantive[0].items == (f"block {display(unknown)}",)
    assert f"unanswerable getdata: block {display(unknown)}" in report.summary()


def test_no_pong_and_disconnects_are_substantive(tmp_path: Path) -> None:
    report, seconds = run_to(tmp_path / "a", 0.5, pong=False)
    assert seconds < 2
    assert ("ping", ("no pong within 0.5s",)) in [(d.msgtype, d.items) for d in report.substantive]
    report, _ = run_to(tmp_path / "b", 5, close_after_verack=True)
    assert [d.kind for d in report.substantive][-1] is Kind.DISCONNECTED


def test_the_listener_serves_n_connections_and_probes_do_not_count(tmp_path: Path) -> None:
    steps = load_conversation([write_capture(tmp_path / "cap", sync_steps())])
    requests = [("getheaders", getheaders(GENESIS)), ("getdata", getdata(*H))]

    async def main() -> list[Report]:
        ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        replaying = asyncio.create_task(replay_listen(
            steps, "127.0.0.1", 0, play="peer", connections=2, ready=ready, magic=MAGIC,
            timeout=5, accept_timeout=10))  # fmt: skip
        host, port = await ready
        _, probe = await asyncio.open_connection(host, port)  # connects and leaves
        probe.close()
        clients = [await asyncio.open_connection(host, port) for _ in range(2)]
        got = await asyncio.gather(
            *(live_node(r, w, dial=True, requests=requests) for r, w in clients)
        )
        assert all(g.count("block") == 5 for g in got)
        return await replaying

    reports = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(reports) == 2
    assert all(not r.diverged and r.reached for r in reports), [r.summary() for r in reports]


def test_cli_connections(tmp_path: Path) -> None:
    folder = write_capture(tmp_path / "cap", sync_steps())
    for flags in (["--listen", "127.0.0.1:0", "--connections", "0"],
                  ["--to", "127.0.0.1:1", "--connections", "2"]):  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "msgcap", "replay", str(folder), *flags],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert res.returncode == 2 and "--connections" in res.stderr, res.stderr


@pytest.mark.parametrize("strict", [False, True])
def test_strict_ignores_benign_divergence(tmp_path: Path, strict: bool) -> None:
    """The live side skips getaddr and feefilter and sends extra things: still exit 0."""
    folder = write_capture(tmp_path / "cap", sync_steps())
    requests = [("sendcmpct", b"\x01" + bytes(8)), ("getheaders", getheaders(GENESIS)),
                ("getdata", getdata(*H)), ("addr", b"\x00")]  # fmt: skip

    async def main() -> subprocess.CompletedProcess[str]:
        server, port = await serve_once(requests=requests)()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "msgcap", "replay", str(folder), "--to", f"127.0.0.1:{port}",
            "--timeout", "2", *(["--strict"] if strict else []),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        out, err = await proc.communicate()
        server.close()
        assert proc.returncode is not None
        return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())

    res = asyncio.run(main())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "benign divergence:\n" in res.stdout and "missing feefilter" in res.stdout
    assert "substantive divergence: none" in res.stdout and "reproduced" in res.stdout


def test_block_messages_round_trip() -> None:
    """The synthetic chain is well formed (each block decodes to itself)."""
    for block in BLOCKS:
        msg = decode_message("block", block.encode())
        assert isinstance(msg, BlockMsg) and msg.block == block
