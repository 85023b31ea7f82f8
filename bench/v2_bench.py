"""Throughput of ``msgcap proxy --v2 decrypt`` against a plain relay, and a bitcoind sync.

Every relay runs as its own process on loopback, as in ``bench/relay_bench.py``:
``msgcap proxy --v2 decrypt`` (an outbound route; quotas lifted so that capture never
stops), ``bench/plain_relay.py`` (a byte relay on asyncio streams, the baseline of the
goal) and, for reference, ``msgcap proxy`` relaying the same messages as v1.

* v2 through the proxy: a BIP324 initiator (``V2Session``) does its handshake with the
  proxy, then encrypts every message into one buffer *before* the timer starts and sends
  it; the sink, a BIP324 responder, does its handshake with the proxy and then only
  counts bytes until it has every packet (packet sizes are deterministic), without
  decrypting. The time runs until the sink has every byte and the capture files hold
  every message. The load generator's cryptography is thus off the clock; the proxy's
  (decrypt, capture, encrypt) is on it.
* v1 through the plain relay (and through ``msgcap proxy``): the same messages as v1
  frames, one pre-built buffer, until the sink has every byte (and, for msgcap, the
  capture is complete).

Rounds take the relays in turn, so a slow moment of the machine hits them alike; the
ratios are medians of the per-round ratios. Captures are deleted after each round.

With bitcoind (``$MSGCAP_BITCOIND``, else /work/shared/bitcoin-core/bin/bitcoind, else
``PATH``) it also times a fresh node syncing N blocks from a miner, directly and through
``msgcap proxy --v2 decrypt`` (both legs v2), in interleaved rounds: from the node's
start until its tip is the miner's.

    python bench/v2_bench.py [--rounds N] [--mb MB] [--small-count N]
                             [--sync-blocks N] [--big-blocks N] [--skip-sync] [--python]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
from msgcap.capture.bip324 import GARBAGE_TERMINATOR_LEN, V2Session  # noqa: E402
from msgcap.capture.bip324_cipher import ELLSWIFT_LEN, EXPANSION  # noqa: E402
from msgcap.capture.bip324_events import V2_SHORT_IDS  # noqa: E402
from msgcap.capture.framing import MSGTYPE_SIZE, Network, encode_frame  # noqa: E402
from tests.bcoin import free_port, wait_listening  # noqa: E402

MAGIC = Network.REGTEST.magic
VERSION_PAYLOAD = bytes(100)
RECORD_HEADER = 24
"""A capture record's header (time 8, type 12, length 4): as long as a v1 frame's."""
DEFAULT_BITCOIND = Path("/work/shared/bitcoin-core/bin/bitcoind")
TIMEOUT = 120.0
"""Longest wait for any one measurement."""

Messages = list[tuple[str, int]]
"""(message type, payload size) per message, ``count`` times the same one after a version."""


def workload(msgtype: str, size: int, count: int) -> Messages:
    return [("version", len(VERSION_PAYLOAD))] + [(msgtype, size)] * count


def v2_packet_size(msgtype: str, size: int) -> int:
    """Length (3) + header (1) + type (1 for a short id, else 1 + 12) + payload + tag (16)."""
    return EXPANSION + (1 if msgtype in V2_SHORT_IDS else 1 + MSGTYPE_SIZE) + size


def capture_size(messages: Messages) -> int:
    return sum(RECORD_HEADER + size for _, size in messages)


# --- sink ------------------------------------------------------------------------------


class Sink(bench.Sink):
    """Counts the bytes of every connection it accepts; with ``v2`` it is a BIP324
    responder that does its handshake and then counts the bytes after it, undecrypted."""

    def __init__(self, v2: bool) -> None:
        self.v2 = v2
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        with conn, contextlib.suppress(OSError):
            if self.v2:
                early = self._handshake(conn)
                if early is None:
                    return
                self.add(early)
            while n := conn.recv_into(buf):
                self.add(n)

    @staticmethod
    def _handshake(conn: socket.socket) -> int | None:
        """The responder's handshake: the application bytes already received, or None
        if the connection ends first (e.g. a probe)."""
        session = V2Session(initiator=False, magic=MAGIC)
        got = 0
        while not (session.established and session.peer_version_received):
            data = conn.recv(1 << 16)
            if not data:
                return None
            got += len(data)
            session.receive_data(data)
            _, error = session.take_events()
            if error is not None:
                return None
            if out := session.data_to_send():
                conn.sendall(out)
        garbage = session.received_garbage
        assert garbage is not None and session.decoys_received == 0
        # key, garbage, terminator, and the version packet (empty contents)
        return got - (ELLSWIFT_LEN + len(garbage) + GARBAGE_TERMINATOR_LEN + EXPANSION)

    def reset(self) -> None:
        with self.cond:
            self.received = 0

    def wait_for(self, total: int, timeout: float = TIMEOUT) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.received >= total, timeout):
                raise TimeoutError(f"sink: {self.received} of {total} bytes in {timeout:g}s")
        if self.received != total:
            raise RuntimeError(f"sink: {self.received} bytes, expected {total}")


# --- relays ----------------------------------------------------------------------------


@dataclass
class Relay:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    sink: Sink
    v2: bool
    capture_dir: Path | None


def spawn_plain(target: int) -> tuple[subprocess.Popen[bytes], int]:
    """``bench/plain_relay.py`` to 127.0.0.1:``target``, listening."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "bench" / "plain_relay.py"), str(port), str(target)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def start_relay(
    name: str, sink: Sink, capture_dir: Path | None, env: dict[str, str] | None = None
) -> Relay:
    if capture_dir is None:
        proc, port = spawn_plain(sink.port)
        return Relay(name, proc, port, sink, sink.v2, None)
    port = free_port()
    cmd = [sys.executable, "-m", "msgcap", "proxy", "--network", "regtest",
           "--v2", "decrypt", "--capture-dir", str(capture_dir), "--socks5", "off",
           "--capture-bytes-per-peer", str(1 << 40), "--capture-bytes-total", str(1 << 40),
           "--route", f"127.0.0.1:{port}=127.0.0.1:{sink.port}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=None if env is None else {**os.environ, **env})  # fmt: skip
    try:
        wait_listening(port)
    except BaseException:
        stop(proc)
        raise
    return Relay(name, proc, port, sink, sink.v2, capture_dir)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def captured_bytes(capture_dir: Path) -> int:
    return sum(f.stat().st_size for f in capture_dir.rglob("msgs_*.dat"))


def v1_buffer(messages: Messages) -> bytes:
    frames: dict[tuple[str, int], bytes] = {}
    parts = []
    for m in messages:
        if m not in frames:
            frames[m] = encode_frame(MAGIC, m[0], bytes(m[1]))
        parts.append(frames[m])
    return b"".join(parts)


def v2_connect(port: int) -> tuple[socket.socket, V2Session]:
    """A connection to ``port`` with the initiator's BIP324 handshake done."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    session = V2Session(initiator=True, magic=MAGIC)
    try:
        s.sendall(session.data_to_send())
        while not (session.established and session.peer_version_received):
            data = s.recv(1 << 16)
            if not data:
                raise ConnectionError("the proxy closed during the BIP324 handshake")
            session.receive_data(data)
            _, error = session.take_events()
            if error is not None:
                raise error
            if out := session.data_to_send():
                s.sendall(out)
    except BaseException:
        s.close()
        raise
    return s, session


def v2_buffer(session: V2Session, messages: Messages) -> bytes:
    payloads: dict[int, bytes] = {}
    parts = []
    for msgtype, size in messages:
        payload = payloads.get(size)
        if payload is None:
            payload = payloads[size] = bytes(size)
        parts.append(session.encrypt_message(msgtype, payload))
    return b"".join(parts)


def run_once(relay: Relay, messages: Messages, v1: bytes) -> tuple[float, float]:
    """Seconds to relay ``messages`` (and capture them all, for msgcap), and of them the
    seconds the capture was still incomplete after the sink had every byte."""
    sink = relay.sink
    sink.reset()
    cap = relay.capture_dir
    start_size = captured_bytes(cap) if cap else 0
    if relay.v2:
        s, session = v2_connect(relay.port)
        data = v2_buffer(session, messages)  # off the clock
        total = sum(v2_packet_size(t, n) for t, n in messages)
        assert len(data) == total, (len(data), total)
    else:
        s = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
        data = v1
        total = len(data)
    with s:
        t = time.perf_counter()
        s.sendall(data)
        sink.wait_for(total)
        delivered = time.perf_counter()
        if cap is not None:
            want = capture_size(messages)
            deadline = time.monotonic() + TIMEOUT
            while captured_bytes(cap) - start_size < want:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"capture incomplete in {cap}")
                time.sleep(0.001)
        end = time.perf_counter()
        return end - t, end - delivered


def span(xs: list[float], fmt: str) -> str:
    med = statistics.median(xs)
    return f"{med:{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"


def relay_benchmarks(rounds: int, mb: int, small_count: int, python: bool) -> None:
    v1_sink, v2_sink = Sink(v2=False), Sink(v2=True)
    work = Path(tempfile.mkdtemp(prefix="msgcap-v2-bench-", dir=os.environ.get("MSGCAP_BENCH_DIR")))
    big = workload("block", 1_000_000, mb)
    small = workload("tx", 100, small_count)
    big_v1, small_v1 = v1_buffer(big), v1_buffer(small)
    names = ("plain", "msgcap-v1", "decrypt") + (("decrypt-py",) if python else ())
    relays: list[Relay] = []
    big_mbs: dict[str, list[float]] = {n: [] for n in names}
    small_rate: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    cpu_small: dict[str, list[float]] = {n: [] for n in names}
    lags: dict[str, list[float]] = {n: [] for n in names}
    try:
        relays.append(start_relay("plain", v1_sink, None))
        relays.append(start_relay("msgcap-v1", v1_sink, work / "msgcap-v1"))
        relays.append(start_relay("decrypt", v2_sink, work / "decrypt"))
        if python:  # the pure-Python path: the fallback, and the code before the native step
            py = {"MSGCAP_PURE_PYTHON": "1"}
            relays.append(start_relay("decrypt-py", v2_sink, work / "decrypt-py", py))
        warm = workload("tx", 100, 20_000)
        warm_v1 = v1_buffer(warm)
        for relay in relays:
            run_once(relay, warm, warm_v1)  # warm up
        for r in range(rounds):
            for relay in relays if r % 2 == 0 else reversed(relays):
                before = cpu_seconds(relay.proc.pid)
                secs, lag = run_once(relay, big, big_v1)
                lags[relay.name].append(lag * 1000)
                after = cpu_seconds(relay.proc.pid)
                big_mbs[relay.name].append(mb / secs)
                if before is not None and after is not None:
                    cpu[relay.name].append((after - before) * 1000 / mb)
                small_rate[relay.name].append(small_count / run_once(relay, small, small_v1)[0])
                done = cpu_seconds(relay.proc.pid)
                if after is not None and done is not None:
                    cpu_small[relay.name].append((done - after) * 1e6 / small_count)
                if relay.capture_dir is not None:  # every round starts with no dirty pages
                    for folder in relay.capture_dir.glob("*/"):
                        shutil.rmtree(folder)
    finally:
        for relay in relays:
            stop(relay.proc)
        v1_sink.close()
        v2_sink.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"relays: medians (ranges) over {rounds} rounds; {mb} x 1 MB 'block', "
          f"{small_count:,} x 100 B 'tx' (plus one 'version')")  # fmt: skip
    print(f"{'relay':10} {'1 MB: MB/s':>22} {'CPU ms/MB':>10} {'capture lag ms':>15} "
          f"{'100 B: msg/s':>30} {'CPU us/msg':>11}")  # fmt: skip
    for n in names:
        c = f"{statistics.median(cpu[n]):.2f}" if cpu[n] else "-"
        cs = f"{statistics.median(cpu_small[n]):.2f}" if cpu_small[n] else "-"
        lag = f"{statistics.median(lags[n]):.0f}" if n != "plain" else "-"
        print(f"{n:10} {span(big_mbs[n], '.0f'):>22} {c:>10} {lag:>15} "
              f"{span(small_rate[n], ',.0f'):>30} {cs:>11}")  # fmt: skip

    def ratio(results: dict[str, list[float]], a: str, b: str) -> str:
        r = [x / y for x, y in zip(results[a], results[b], strict=True)]
        return f"{statistics.median(r):.2f}x (rounds: {min(r):.2f}-{max(r):.2f}x)"

    print(f"decrypt / plain relay, 1 MB messages: {ratio(big_mbs, 'decrypt', 'plain')} "
          "(goal >= 0.7x)")  # fmt: skip
    print(f"decrypt / msgcap v1, 1 MB messages: {ratio(big_mbs, 'decrypt', 'msgcap-v1')} "
          "(goal >= 0.9x)")  # fmt: skip
    print(f"decrypt, 100 B messages: {statistics.median(small_rate['decrypt']):,.0f} msg/s "
          "(goal >= 250,000)")  # fmt: skip
    if python:
        print(f"decrypt / decrypt-py, 1 MB: {ratio(big_mbs, 'decrypt', 'decrypt-py')}; "
              f"100 B: {ratio(small_rate, 'decrypt', 'decrypt-py')}")  # fmt: skip


# --- bitcoind sync ---------------------------------------------------------------------


SYNC_MODES = ("direct", "plain", "decrypt")


def mine_big_blocks(miner: Any, count: int) -> None:
    """Extend the miner's chain by ``count`` blocks of about 950 kB each: ten 95 kB
    OP_RETURN transactions per block, as tests/test_core_large.py builds them (the chain
    below must hold ten mature coinbases or change outputs: mine at least 110 first)."""
    from tests.test_core_large import BURN, DATA_PER_TX, TXS_PER_BLOCK, send_data_tx

    for _ in range(count):
        coins = sorted(
            miner.wallet_rpc("listunspent", 1), key=lambda u: float(u["amount"]), reverse=True
        )[:TXS_PER_BLOCK]
        for c in coins:
            send_data_tx(miner, DATA_PER_TX, inputs=[{"txid": c["txid"], "vout": c["vout"]}])
        (block,) = miner.mine(1, BURN)
        size = miner.rpc("getblock", block, 1)["size"]
        assert size >= 900_000, f"block {block} is only {size} bytes"


def sync_benchmark(blocks: int, rounds: int, big_blocks: int = 0) -> None:
    if not os.environ.get("MSGCAP_BITCOIND") and DEFAULT_BITCOIND.is_file():
        os.environ["MSGCAP_BITCOIND"] = str(DEFAULT_BITCOIND)
    from tests.bitcoind import BitcoinNode, ProxyProcess, find_bitcoind, wait_until

    binary = find_bitcoind()
    if binary is None:
        print("bitcoind sync: skipped (no bitcoind; set MSGCAP_BITCOIND)")
        return
    work = Path(tempfile.mkdtemp(prefix="msgcap-v2-sync-", dir=os.environ.get("MSGCAP_BENCH_DIR")))
    nodes: list[BitcoinNode] = []
    procs: list[subprocess.Popen[bytes]] = []
    proxies: list[ProxyProcess] = []
    total: dict[str, list[float]] = {m: [] for m in SYNC_MODES}
    synced: dict[str, list[float]] = {m: [] for m in SYNC_MODES}
    transports: dict[str, set[str]] = {m: set() for m in SYNC_MODES}
    relay_cpu: dict[str, list[float]] = {m: [] for m in SYNC_MODES}
    try:
        miner = BitcoinNode(work, "miner", binary=binary)
        nodes.append(miner)
        t = time.perf_counter()
        miner.create_wallet()
        address = miner.new_address()
        for done in range(0, blocks, 500):
            miner.mine(min(500, blocks - done), address)
        if big_blocks:
            mine_big_blocks(miner, big_blocks)
        tip = miner.tip()
        print(f"bitcoind: mined {blocks} blocks" + (f" and {big_blocks} near-1 MB blocks" if
              big_blocks else "") + f" in {time.perf_counter() - t:.1f}s")  # fmt: skip
        for i in range(rounds):
            k = i % len(SYNC_MODES)
            for mode in SYNC_MODES[k:] + SYNC_MODES[:k]:
                target = miner.address
                relay_pid: int | None = None
                if mode == "plain":
                    proc, port = spawn_plain(miner.port)
                    procs.append(proc)
                    target = f"127.0.0.1:{port}"
                    relay_pid = proc.pid
                elif mode == "decrypt":
                    port = free_port()
                    route = f"127.0.0.1:{port}={miner.address}"
                    proxy = ProxyProcess(work / f"proxy{i}", "--v2", "decrypt", "--socks5", "off",
                                         "--capture-bytes-per-peer", str(1 << 40),
                                         "--capture-bytes-total", str(1 << 40),
                                         "--route", route)  # fmt: skip
                    proxies.append(proxy)
                    target = f"127.0.0.1:{port}"
                    relay_pid = proxy.proc.pid
                cpu_before = cpu_seconds(relay_pid) if relay_pid else None
                t = time.perf_counter()
                node = BitcoinNode(work, f"{mode}{i}", [f"-connect={target}"], binary=binary)
                nodes.append(node)
                ready = time.perf_counter()
                at_tip: Callable[[], bool] = lambda n=node: n.tip() == tip  # noqa: E731
                wait_until(at_tip, TIMEOUT, f"{mode} sync of {blocks} blocks", poll=0.02)
                done_at = time.perf_counter()
                cpu_after = cpu_seconds(relay_pid) if relay_pid else None
                if cpu_before is not None and cpu_after is not None:
                    relay_cpu[mode].append(cpu_after - cpu_before)
                total[mode].append(done_at - t)
                synced[mode].append(done_at - ready)
                for side in (node, miner):
                    transports[mode].update(
                        p.get("transport_protocol_type", "?")
                        for p in side.peers()
                        if side is node or p.get("inbound")
                    )
                node.stop()
                nodes.remove(node)
                shutil.rmtree(node.datadir, ignore_errors=True)
                for proc in procs:
                    stop(proc)
                procs.clear()
                for proxy in proxies:
                    proxy.stop()
                proxies.clear()
    finally:
        for proc in procs:
            stop(proc)
        for proxy in proxies:
            with contextlib.suppress(Exception):
                proxy.stop()
        for n in reversed(nodes):
            with contextlib.suppress(Exception):
                n.stop()
        shutil.rmtree(work, ignore_errors=True)

    what = f"{blocks} blocks" + (f" + {big_blocks} near-1 MB blocks" if big_blocks else "")
    print(f"bitcoind sync of {what}, medians (ranges) over {rounds} interleaved rounds")
    print("  ('total' from the node's start, 'sync' from its RPC being up, to the miner's tip;")
    print("   'relay CPU': the relay process's user+system CPU over the total)")
    for mode in SYNC_MODES:
        c = f"  relay CPU {span(relay_cpu[mode], '.2f')}s" if relay_cpu[mode] else ""
        print(f"  {mode:8} total {span(total[mode], '.2f')}s  sync {span(synced[mode], '.2f')}s  "
              f"transport {'/'.join(sorted(transports[mode]))}{c}")  # fmt: skip

    def ratio(results: dict[str, list[float]], mode: str) -> str:
        r = [b / a for a, b in zip(results["direct"], results[mode], strict=True)]
        return f"{statistics.median(r):.3f}x ({min(r):.3f}-{max(r):.3f}x)"

    print(f"  decrypt / direct: total {ratio(total, 'decrypt')}, sync {ratio(synced, 'decrypt')} "
          "(goal <= 1.05x)")  # fmt: skip
    print(f"  plain relay / direct: total {ratio(total, 'plain')}, sync {ratio(synced, 'plain')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--mb", type=int, default=256, help="1 MB messages per run (default 256)")
    ap.add_argument("--small-count", type=int, default=200_000,
                    help="100-byte messages per run (default 200,000)")  # fmt: skip
    ap.add_argument("--sync-blocks", type=int, default=2000, help="blocks to sync (default 2000)")
    ap.add_argument("--sync-rounds", type=int, default=5, help="sync rounds (default 5)")
    ap.add_argument("--big-blocks", type=int, default=0,
                    help="near-1 MB blocks mined on top of the sync chain (default 0)")  # fmt: skip
    ap.add_argument("--skip-sync", action="store_true", help="no bitcoind sync")
    ap.add_argument("--skip-relay", action="store_true", help="only the bitcoind sync")
    ap.add_argument("--python", action="store_true",
                    help="also decrypt on the pure-Python path (MSGCAP_PURE_PYTHON=1)")  # fmt: skip
    args = ap.parse_args()
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    print(f"event loop: {loop}; CPUs: {os.cpu_count()}; load: {os.getloadavg()[0]:.2f}")
    if not args.skip_relay:
        relay_benchmarks(args.rounds, args.mb, args.small_count, args.python)
    if not args.skip_sync:
        sync_benchmark(args.sync_blocks, args.sync_rounds, args.big_blocks)
    print(f"load at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
