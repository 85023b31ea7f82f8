"""Relay throughput and latency of ``msgcap proxy`` (capture on) against a plain relay.

Every relay runs as its own process on loopback: ``msgcap proxy`` with an outbound route,
``bench/plain_relay.py`` (asyncio, same loop, no framing or capture) and socat when
installed. A sender and a sink (blocking sockets in threads) push a stream of v1 frames
through each and time it; a ping/pong echo measures round trips. With ``--sync`` it also
times a real bcoin node syncing blocks from another, directly and through the proxy.

    python bench/relay_bench.py [--sync]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capture.framing import Network, encode_frame  # noqa: E402
from tests.bcoin import free_port, wait_listening  # noqa: E402

MAGIC = Network.REGTEST.magic
VERSION = encode_frame(MAGIC, "version", bytes(100))


class Sink:
    """Counts (or echoes) the bytes of every connection it accepts."""

    def __init__(self, echo: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.received = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.echo:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(1 << 20):
                if self.echo:
                    conn.sendall(data)
                with self.cond:
                    self.received += len(data)
                    self.cond.notify_all()

    def wait_for(self, total: int, timeout: float = 300) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.received >= total, timeout)

    def close(self) -> None:
        self.sock.close()


def start_relay(kind: str, target: int, capture_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "msgcap":
        cmd = [sys.executable, "-m", "proxy.cli", "proxy", "--network", "regtest",
               "--capture-dir", str(capture_dir), "--socks5", "off",
               "--route", f"127.0.0.1:{port}=127.0.0.1:{target}"]  # fmt: skip
    elif kind == "plain":
        cmd = [sys.executable, str(ROOT / "bench" / "plain_relay.py"), str(port), str(target)]
    else:
        cmd = ["socat", f"TCP-LISTEN:{port},reuseaddr,fork,bind=127.0.0.1",
               f"TCP:127.0.0.1:{target}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def throughput(port: int, sink: Sink, payload_size: int, count: int) -> float:
    """Messages per second for ``count`` frames of ``payload_size`` bytes."""
    frame = encode_frame(MAGIC, "block" if payload_size > 1000 else "tx", bytes(payload_size))
    per_write = max(1, (1 << 20) // len(frame))
    block = frame * per_write
    with sink.cond:
        sink.received = 0
    total = len(VERSION) + len(frame) * count
    with socket.create_connection(("127.0.0.1", port)) as s:
        t = time.perf_counter()
        s.sendall(VERSION)
        sent = 0
        while sent < count:
            n = min(per_write, count - sent)
            s.sendall(block if n == per_write else frame * n)
            sent += n
        s.shutdown(socket.SHUT_WR)
        sink.wait_for(total)
        elapsed = time.perf_counter() - t
    assert sink.received == total, (sink.received, total)
    return count / elapsed


def round_trips(port: int, n: int = 2000) -> float:
    """Median round trip in microseconds for a 32-byte message echoed back."""
    ping = encode_frame(MAGIC, "ping", bytes(8))
    times = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(VERSION)
        got = 0
        while got < len(VERSION):
            got += len(s.recv(1 << 16))
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(ping)
            got = 0
            while got < len(ping):
                got += len(s.recv(1 << 16))
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def relay_benchmarks(kinds: list[str]) -> None:
    sink = Sink()
    echo = Sink(echo=True)
    work = Path(
        tempfile.mkdtemp(prefix="msgcap-relay-bench-", dir=os.environ.get("MSGCAP_BENCH_DIR"))
    )
    results: dict[str, dict[str, float]] = {}
    try:
        for kind in kinds:
            row: dict[str, float] = {}
            proc, port = start_relay(kind, sink.port, work / kind)
            try:
                throughput(port, sink, 100, 20_000)  # warm up
                row["small"] = max(throughput(port, sink, 100, 400_000) for _ in range(3))
                row["big"] = max(throughput(port, sink, 1_000_000, 300) for _ in range(3))
            finally:
                stop(proc)
            proc, port = start_relay(kind, echo.port, work / f"{kind}-rtt")
            try:
                row["rtt"] = round_trips(port)
            finally:
                stop(proc)
            results[kind] = row
        direct_rtt = round_trips(echo.port)
    finally:
        sink.close()
        echo.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'relay':8} {'100 B msg/s':>12} {'1 MB msg/s':>11} {'1 MB MB/s':>10} {'RTT µs':>8}")
    for kind, r in results.items():
        print(f"{kind:8} {r['small']:12,.0f} {r['big']:11.1f} {r['big'] * 1.000024:10.1f} "
              f"{r['rtt']:8.0f}")  # fmt: skip
    print(f"{'direct':8} {'':12} {'':11} {'':10} {direct_rtt:8.0f}")
    m, p = results["msgcap"], results["plain"]
    print(f"msgcap / plain relay, 1 MB messages: {m['big'] / p['big']:.2f}x (goal >= 0.7x)")
    print(
        f"msgcap / plain relay, 100 B messages: {m['small'] / p['small']:.2f}x; "
        f"{m['small']:,.0f} msg/s (goal >= 150,000)"
    )
    print(
        f"added latency over the plain relay: {m['rtt'] - p['rtt']:.0f} µs per round trip "
        f"(two relay passes); over direct: {m['rtt'] - direct_rtt:.0f} µs"
    )
    if "socat" in results:
        print(
            f"msgcap / socat, 1 MB: {m['big'] / results['socat']['big']:.2f}x; "
            f"100 B: {m['small'] / results['socat']['small']:.2f}x"
        )


def sync_benchmark(blocks: int, rounds: int) -> None:
    from tests.bcoin import BcoinNode

    work = Path(tempfile.mkdtemp(prefix="msgcap-sync-bench-"))
    miner = BcoinNode(work, "miner")
    try:
        miner.mine(blocks)
        wait_listening(miner.port)
        timings: dict[str, list[float]] = {"direct": [], "proxy": []}
        for i in range(rounds):
            for mode in ("direct", "proxy"):
                proc = None
                target = miner.port
                if mode == "proxy":
                    proc, target = start_relay("msgcap", miner.port, work / f"cap{i}")
                t = time.perf_counter()
                node = BcoinNode(work, f"{mode}{i}", f"--only=127.0.0.1:{target}", listen=False)
                try:
                    node.wait_height(blocks, timeout=300)
                    timings[mode].append(time.perf_counter() - t)
                finally:
                    node.stop()
                    if proc is not None:
                        stop(proc)
    finally:
        miner.stop()
        shutil.rmtree(work, ignore_errors=True)
    d, p = min(timings["direct"]), min(timings["proxy"])
    print(
        f"bcoin sync of {blocks} blocks (node start to tip, best of {rounds}): "
        f"direct {d:.2f}s, through msgcap {p:.2f}s: {p / d:.3f}x (goal <= 1.05x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sync", action="store_true", help="also time a bcoin sync")
    ap.add_argument("--blocks", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kinds = ["msgcap", "plain"] + (["socat"] if shutil.which("socat") else [])
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    print(f"event loop: {loop}; CPUs: {os.cpu_count()}")
    relay_benchmarks(kinds)
    if args.sync:
        sync_benchmark(args.blocks, args.rounds)


if __name__ == "__main__":
    main()
