"""Replay recorded sessions into live bcoin nodes and scripted peers; export captures."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture.export import export_fuzz, export_pcap
from msgcap.capture.framing import Frame, FrameDecoder, encode_frame, hash256
from msgcap.capture.records import Record, encode_record, read_records
from msgcap.parser.messages import GetData, Inv
from msgcap.parser.structures import MSG_WITNESS_FLAG, Inventory, InvType
from msgcap.proxy.replay_conversation import Report
from tests.bcoin import BcoinNode, require_bcoin, wait_listening
from tests.bitcoind import Recording
from tests.conftest import MAGIC, VERSION_PAYLOAD, ProxyProcess, free_port, wait_until
from tests.vectors import VECTORS

DATA = Path(__file__).parent / "data" / "core-v30-pair"


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recording]:
    """A bcoin miner with 250 blocks and a second node syncing from it through the proxy
    (outbound route: the capture is from the syncing node's side, the miner is the peer)."""
    require_bcoin()
    work = tmp_path_factory.mktemp("recording")
    miner = BcoinNode(work, "miner")
    try:
        miner.mine(200)
        wait_listening(miner.port)
        listen = free_port()
        with ProxyProcess(work, "--route", f"127.0.0.1:{listen}=127.0.0.1:{miner.port}",
                          "--socks5", "off") as proxy:  # fmt: skip
            syncer = BcoinNode(work, "syncer", f"--only=127.0.0.1:{listen}", listen=False)
            try:
                syncer.wait_height(200, timeout=90)
                miner.mine(50)
                syncer.wait_height(250, timeout=90)
                tip = miner.rpc("getbestblockhash")
            finally:
                syncer.stop()
                assert proxy.stop() == 0
    finally:
        miner.stop()
    yield Recording(proxy.capture_dir / f"127.0.0.1_{miner.port}", tip, 250)


def msgcap(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msgcap", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.mark.e2e
def test_replay_miner_to_fresh_node(tmp_path: Path, recording: Recording) -> None:
    fresh = BcoinNode(tmp_path, "fresh")
    try:
        wait_listening(fresh.port)
        res = msgcap("replay", str(recording.folder), "--to", f"127.0.0.1:{fresh.port}",
                     "--network", "regtest", "--timeout", "5", "--json", "--strict")  # fmt: skip
        report = json.loads(res.stdout)
        print("divergence report (--to):", json.dumps(report, indent=1))
        # bcoin syncs only from peers it dialed: it learns of the blocks from the recorded
        # announcements and asks for the rest with getblocks, answered from the chain.
        assert res.returncode == 0, (report, res.stderr)
        assert report["reached"] and report["substantive"] == []
        fresh.wait_height(recording.height, timeout=30)
        assert fresh.rpc("getbestblockhash") == recording.tip
    finally:
        fresh.stop()


@pytest.mark.e2e
def test_replay_miner_as_listener(tmp_path: Path, recording: Recording) -> None:
    listen = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "msgcap", "replay", str(recording.folder), "--listen",
         f"127.0.0.1:{listen}", "--play", "peer", "--timeout", "5", "--json", "--strict"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    fresh = None
    try:
        _wait_bound(listen)
        fresh = BcoinNode(tmp_path, "fresh", f"--only=127.0.0.1:{listen}", listen=False)
        fresh.wait_height(recording.height, timeout=60)
        assert fresh.rpc("getbestblockhash") == recording.tip
        out, err = proc.communicate(timeout=120)
        report = json.loads(out)
        print("divergence report (--listen):", json.dumps(report, indent=1))
        assert proc.returncode == 0, (report, err)
        assert report["reached"] and report["substantive"] == []
    finally:
        if fresh is not None:
            fresh.stop()
        if proc.poll() is None:
            proc.kill()


def _wait_bound(port: int, timeout: float = 20) -> None:
    """Wait until something listens on ``port`` without connecting to it."""

    def bound() -> bool:
        out = Path("/proc/net/tcp").read_text()
        return any(f":{port:04X} 00000000:0000 0A" in line for line in out.splitlines())

    wait_until(bound, timeout, f"a listener on {port}")


# --- scripted peers: --strict --------------------------------------------------------

BLOCK = bytes.fromhex(VECTORS["block"])
BLOCK_HASH = hash256(BLOCK[:80])
INV = Inv((Inventory(InvType.MSG_BLOCK, BLOCK_HASH),)).encode()
GETDATA = GetData((Inventory(InvType.MSG_BLOCK | MSG_WITNESS_FLAG, BLOCK_HASH),)).encode()


def write_capture(folder: Path) -> Path:
    """A recorded conversation: the peer announces a block, the node asks for it."""
    folder.mkdir(parents=True)
    recv = [
        (1, "version", VERSION_PAYLOAD),
        (4, "verack", b""),
        (5, "inv", INV),
        (7, "block", BLOCK),
    ]
    sent = [(2, "version", VERSION_PAYLOAD), (3, "verack", b""), (6, "getdata", GETDATA)]
    (folder / "msgs_recv.dat").write_bytes(b"".join(encode_record(*r) for r in recv))
    (folder / "msgs_sent.dat").write_bytes(b"".join(encode_record(*r) for r in sent))
    return folder


async def scripted_node(answer_inv: bool) -> tuple[asyncio.Server, list[str]]:
    """A node that does the handshake, answers pings and, if ``answer_inv``, asks for
    announced blocks."""
    got: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        dec = FrameDecoder(MAGIC)
        while data := await r.read(1 << 16):
            dec.receive_data(data)
            while isinstance(ev := dec.next_event(), Frame):
                got.append(ev.msgtype)
                if ev.msgtype == "version":
                    w.write(encode_frame(MAGIC, "version", VERSION_PAYLOAD))
                    w.write(encode_frame(MAGIC, "verack", b""))
                elif ev.msgtype == "ping":
                    w.write(encode_frame(MAGIC, "pong", ev.payload))
                elif ev.msgtype == "inv" and answer_inv:
                    w.write(encode_frame(MAGIC, "getdata", GETDATA))
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), got


@pytest.mark.parametrize("faithful", [True, False])
def test_strict_fails_when_the_conversation_cannot_be_reproduced(
    tmp_path: Path, faithful: bool
) -> None:
    folder = write_capture(tmp_path / "127.0.0.1_18444")

    async def main() -> tuple[subprocess.CompletedProcess[str], list[str]]:
        server, got = await scripted_node(answer_inv=faithful)
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "msgcap", "replay", str(folder), "--to",
            f"127.0.0.1:{port}", "--strict", "--timeout", "1", "--json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        server.close()
        assert proc.returncode is not None
        return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode()), got

    res, got = asyncio.run(main())
    report = json.loads(res.stdout)
    print(report)
    assert got[:2] == ["version", "verack"] and "inv" in got
    if faithful:
        assert res.returncode == 0 and not report["diverged"] and report["reached"]
        assert report["substantive"] == [] and report["answered"] == {"getdata": 1}
        assert got.count("block") == 1
    else:
        # The block answers a getdata: it is never sent unasked.
        assert "block" not in got
        assert res.returncode == 1 and report["diverged"] and not report["reached"]
        assert report["substantive"] == [
            {"kind": "not_requested", "msgtype": "getdata", "count": 1,
             "items": [f"block {BLOCK_HASH[::-1].hex()}"]},
        ]  # fmt: skip


def test_version_is_refreshed_unless_verbatim(tmp_path: Path) -> None:
    folder = write_capture(tmp_path / "p")
    seen: dict[bool, bytes] = {}
    for verbatim in (False, True):

        async def main(verbatim: bool = verbatim) -> bytes:
            first: list[bytes] = []

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                dec = FrameDecoder(MAGIC)
                dec.receive_data(await r.read(1 << 16))
                ev = dec.next_event()
                assert isinstance(ev, Frame)
                first.append(ev.payload)
                w.close()

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            from msgcap.proxy.replay import replay_to
            from msgcap.proxy.replay_plan import load_conversation

            await replay_to(load_conversation([folder]), "127.0.0.1", port, magic=MAGIC,
                            verbatim=verbatim, timeout=0.5)  # fmt: skip
            server.close()
            return first[0]

        seen[verbatim] = asyncio.run(main())
    assert seen[True] == VERSION_PAYLOAD
    assert seen[False] != VERSION_PAYLOAD and len(seen[False]) == len(VERSION_PAYLOAD)
    assert seen[False][80:] == VERSION_PAYLOAD[80:]  # only time and nonce change


def test_pytest_fixtures(
    tmp_path: Path, msgcap_capture: Callable[..., Any], msgcap_replay: Callable[..., Report]
) -> None:
    folder = write_capture(tmp_path / "127.0.0.1_18444")
    messages = msgcap_capture(folder)
    assert [(m.direction, m.msgtype) for m in messages] == [
        ("recv", "version"), ("sent", "version"), ("sent", "verack"), ("recv", "verack"),
        ("recv", "inv"), ("sent", "getdata"), ("recv", "block"),
    ]  # fmt: skip
    assert messages[-1].message.block.transactions

    async def serve() -> tuple[asyncio.Server, list[str]]:
        return await scripted_node(answer_inv=True)

    loop = asyncio.new_event_loop()
    server, _ = loop.run_until_complete(serve())
    port = server.sockets[0].getsockname()[1]
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        report = msgcap_replay(folder, to=f"127.0.0.1:{port}", timeout=2)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert not report.diverged and report.reached, report.summary()
    assert report.sent_types["block"] == 1 and report.answered["getdata"] == 1
    assert report.substantive == [] and report.benign == []


# --- export ---------------------------------------------------------------------------


def test_export_fuzz_frames(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    res = msgcap("export", "--fuzz", str(out), str(DATA / "a"), "--network", "regtest")
    assert res.returncode == 0, res.stderr
    records = []
    for f in sorted((DATA / "a").rglob("*.dat")):
        with open(f, "rb") as fh:
            records += [r for r in read_records(fh) if isinstance(r, Record)]
    distinct = {(r.raw_msgtype, r.payload) for r in records}
    files = sorted(out.iterdir())
    assert len(files) == len(distinct) < len(records)
    for f in files:
        data = f.read_bytes()
        assert f.name == hashlib.sha1(data).hexdigest()
        dec = FrameDecoder(MAGIC)
        dec.receive_data(data)
        ev = dec.next_event()
        assert isinstance(ev, Frame), ev  # valid magic, type and checksum
        assert ev.wire_size == len(data)
    again = export_fuzz([DATA / "a"], out, MAGIC)
    assert again.written == 0 and again.distinct == len(files)


def test_export_fuzz_payloads(tmp_path: Path) -> None:
    result = export_fuzz([DATA / "b"], tmp_path, MAGIC, payloads=True)
    assert (tmp_path / "block").is_dir() and (tmp_path / "cmpctblock").is_dir()
    blocks = list((tmp_path / "block").iterdir())
    assert blocks and all(f.name == hashlib.sha1(f.read_bytes()).hexdigest() for f in blocks)
    assert result.distinct == sum(1 for _ in tmp_path.rglob("*") if _.is_file())


def tshark() -> str:
    path = shutil.which("tshark")
    if path is None:
        import os

        if os.environ.get("MSGCAP_REQUIRE_TSHARK"):
            pytest.fail("tshark is not installed (apt-get install tshark)")
        pytest.skip("tshark is not installed (apt-get install tshark); CI installs it")
    return path


def test_export_pcap_reads_in_tshark(tmp_path: Path) -> None:
    exe = tshark()
    pcap = tmp_path / "out.pcap"
    big = tmp_path / "cap" / "203.0.113.7_8333"
    big.mkdir(parents=True)
    (big / "msgs_sent.dat").write_bytes(
        encode_record(1, "version", VERSION_PAYLOAD) + encode_record(5, "block", BLOCK * 1)
    )
    (big / "msgs_recv.dat").write_bytes(
        encode_record(2, "version", VERSION_PAYLOAD) + encode_record(3, "ping", bytes(8))
        + encode_record(4, "tx", bytes(5000))
    )  # fmt: skip
    res = msgcap("export", "--pcap", str(pcap), str(DATA / "a"), str(tmp_path / "cap"))
    assert res.returncode == 0, res.stderr
    out = subprocess.run(
        [exe, "-r", str(pcap), "-Y", "bitcoin", "-T", "fields", "-e", "tcp.stream",
         "-e", "bitcoin.command", "-e", "bitcoin.length", "-o", "tcp.desegment_tcp_streams:TRUE"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines() if line]
    by_stream: dict[str, list[tuple[str, int]]] = {}
    for stream, commands, lengths in rows:
        for c, n in zip(commands.split(","), lengths.split(","), strict=True):
            by_stream.setdefault(stream, []).append((c, int(n)))
    expected = []
    for folder in sorted([DATA / "a" / "127.0.0.1_39912", big]):
        recs = []
        for name in ("msgs_sent.dat", "msgs_recv.dat"):
            with open(folder / name, "rb") as fh:
                recs += [r for r in read_records(fh) if isinstance(r, Record)]
        recs.sort(key=lambda r: r.time)
        expected.append([(r.msgtype.name.decode(), len(r.payload)) for r in recs])
    assert [by_stream[k] for k in sorted(by_stream, key=int)] == expected


def test_export_pcap_has_a_proper_tcp_handshake(tmp_path: Path) -> None:
    exe = tshark()
    pcap = tmp_path / "a.pcap"
    export_pcap([DATA / "a"], pcap, MAGIC)
    out = subprocess.run(
        [exe, "-r", str(pcap), "-T", "fields", "-e", "tcp.flags.syn", "-e", "tcp.flags.ack",
         "-e", "tcp.flags.fin", "-e", "tcp.analysis.flags"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    rows = [line.split("\t") for line in out]
    syn_ack_fin = [tuple(int(x == "True" or x == "1") for x in r[:3]) for r in rows]
    assert syn_ack_fin[:3] == [(1, 0, 0), (1, 1, 0), (0, 1, 0)]  # SYN, SYN-ACK, ACK
    assert syn_ack_fin[-3:] == [(0, 1, 1), (0, 1, 1), (0, 1, 0)]  # FIN, FIN, ACK
    # tshark's TCP analysis finds no lost segments, retransmissions or bad sequence numbers.
    assert all(r[3] == "" for r in rows), [r for r in rows if r[3]][:3]


def test_replay_usage_errors(tmp_path: Path) -> None:
    res = msgcap("replay", str(tmp_path / "missing"), "--to", "127.0.0.1:1")
    assert res.returncode == 2 and "no such file" in res.stderr
    res = msgcap("replay", str(DATA / "a" / "127.0.0.1_39912"), "--to", "nowhere")
    assert res.returncode == 2 and "HOST:PORT" in res.stderr
    res = msgcap("replay", str(DATA / "a" / "127.0.0.1_39912"), "--network", "moon", "--to",
                 "127.0.0.1:1")  # fmt: skip
    assert res.returncode == 2 and "unknown network" in res.stderr
