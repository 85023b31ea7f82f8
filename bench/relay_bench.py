"""Relay throughput and latency of ``msgcap proxy`` (capture on) against plain relays.

Every relay runs as its own process on loopback: ``msgcap proxy`` with an outbound route;
``bench/plain_relay.py``, a byte relay on asyncio streams (the baseline of the goal);
``bench/bare_relay.py``, a byte relay on transports and protocols like the proxy's; and
socat when installed. A sender and a sink (blocking sockets in threads) push a stream of
v1 frames through each and time it until the sink has every byte and, for msgcap, the
capture files hold every message (quotas are lifted so that capture never stops). Rounds
take the relays in turn, so a slow moment of the machine hits them alike; a ping/pong
echo measures round trips. Captures are deleted after each round so that rounds start
alike, without our dirty pages waiting for writeback: this measures the relay and the
page cache. (A capture that goes on for longer than the kernel lets dirty pages pile up
runs at the disk's write speed: the capture thread waits for the disk, the relay for
the capture thread.) With
``--sync`` it also times a real bcoin node syncing blocks from another, directly and
through the proxy.

    python bench/relay_bench.py [--rounds-relay N] [--sync]
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
from msgcap.capture.framing import Network, encode_frame  # noqa: E402
from tests.bcoin import free_port, wait_listening  # noqa: E402

MAGIC = Network.REGTEST.magic
VERSION = encode_frame(MAGIC, "version", bytes(100))


class Sink(bench.Sink):
    """Counts (or echoes) the bytes of every connection it accepts."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        if not self.echo:
            return super().serve(conn)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(1 << 20):
                conn.sendall(data)
                self.add(len(data))


RELAYS = ("msgcap", "plain", "bare", "socat")


def start_relay(kind: str, target: int, capture_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "msgcap":
        cmd = [sys.executable, "-m", "msgcap", "proxy", "--network", "regtest",
               "--capture-dir", str(capture_dir), "--socks5", "off",
               "--capture-bytes-per-peer", str(1 << 40), "--capture-bytes-total", str(1 << 40),
               "--route", f"127.0.0.1:{port}=127.0.0.1:{target}"]  # fmt: skip
    elif kind in ("plain", "bare"):
        cmd = [sys.executable, str(ROOT / "bench" / f"{kind}_relay.py"), str(port), str(target)]
    else:
        cmd = ["socat", f"TCP-LISTEN:{port},reuseaddr,fork,bind=127.0.0.1",
               f"TCP:127.0.0.1:{target}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc, port


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process and its children so far (Linux), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime, stime, cutime, cstime (socat forks a child per connection)
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def captured_bytes(capture_dir: Path) -> int:
    return sum(f.stat().st_size for f in capture_dir.rglob("msgs_*.dat"))


def throughput(
    port: int, sink: Sink, payload_size: int, count: int, capture_dir: Path | None = None
) -> float:
    """Messages per second for ``count`` frames of ``payload_size`` bytes: until the sink
    has them all and, with ``capture_dir``, until they are all in the capture files."""
    frame = encode_frame(MAGIC, "block" if payload_size > 1000 else "tx", bytes(payload_size))
    per_write = max(1, (1 << 20) // len(frame))
    block = frame * per_write
    with sink.cond:
        sink.received = 0
    total = len(VERSION) + len(frame) * count
    start_size = captured_bytes(capture_dir) if capture_dir else 0
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
        # A record's header is as long as a frame's: a complete capture grew by `total`.
        deadline = time.monotonic() + 60
        while capture_dir and captured_bytes(capture_dir) - start_size < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"capture incomplete in {capture_dir}")
            time.sleep(0.001)
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


def relay_benchmarks(kinds: list[str], rounds: int) -> None:
    sink = Sink()
    echo = Sink(echo=True)
    work = Path(
        tempfile.mkdtemp(prefix="msgcap-relay-bench-", dir=os.environ.get("MSGCAP_BENCH_DIR"))
    )
    small: dict[str, list[float]] = {k: [] for k in kinds}
    big: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    rtt: dict[str, float] = {}
    relays = {k: start_relay(k, sink.port, work / k) for k in kinds}
    captures = {"msgcap": work / "msgcap"}
    try:
        for kind, (_proc, port) in relays.items():
            throughput(port, sink, 100, 20_000, captures.get(kind))  # warm up
        for _ in range(rounds):
            for kind, (proc, port) in relays.items():
                small[kind].append(throughput(port, sink, 100, 200_000, captures.get(kind)))
                before = cpu_seconds(proc.pid)
                big[kind].append(throughput(port, sink, 1_000_000, 300, captures.get(kind)))
                after = cpu_seconds(proc.pid)
                if before is not None and after is not None:
                    cpu[kind].append((after - before) * 1000 / 300)
                if kind in captures:  # every round starts with no dirty pages of ours
                    for folder in captures[kind].glob("*/"):
                        shutil.rmtree(folder)
    finally:
        for proc, _port in relays.values():
            stop(proc)
    try:
        for kind in kinds:
            proc, port = start_relay(kind, echo.port, work / f"{kind}-rtt")
            try:
                rtt[kind] = round_trips(port)
            finally:
                stop(proc)
        direct_rtt = round_trips(echo.port)
    finally:
        sink.close()
        echo.close()
        shutil.rmtree(work, ignore_errors=True)

    def span(xs: list[float], fmt: str) -> str:
        med = statistics.median(xs)
        return f"{med:{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    print(f"medians (and ranges) over {rounds} rounds; 1 MB messages are 1,000,024 bytes a frame")
    print(f"{'relay':7} {'100 B msg/s':>28} {'1 MB MB/s':>22} {'CPU ms/MB':>10} {'RTT µs':>7}")
    for kind in kinds:
        c = f"{statistics.median(cpu[kind]):.2f}" if cpu[kind] else "-"
        print(f"{kind:7} {span(small[kind], ',.0f'):>28} {span(big[kind], '.0f'):>22} "
              f"{c:>10} {rtt[kind]:7.0f}")  # fmt: skip
    print(f"{'direct':7} {'':>28} {'':>22} {'':>10} {direct_rtt:7.0f}")

    def ratio(results: dict[str, list[float]], other: str) -> str:
        r = [m / o for m, o in zip(results["msgcap"], results[other], strict=True)]
        return f"{statistics.median(r):.2f}x (rounds: {min(r):.2f}-{max(r):.2f}x)"

    print(f"msgcap / plain relay, 1 MB messages: {ratio(big, 'plain')} (goal >= 0.7x)")
    print(
        f"msgcap, 100 B messages: {statistics.median(small['msgcap']):,.0f} msg/s (goal >= 150,000)"
    )
    print(
        f"added latency over the plain relay: {rtt['msgcap'] - rtt['plain']:.0f} µs per round "
        f"trip (two relay passes); over direct: {rtt['msgcap'] - direct_rtt:.0f} µs"
    )
    for other in kinds[2:]:
        print(f"msgcap / {other}, 1 MB messages: {ratio(big, other)}")


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
    ap.add_argument("--rounds-relay", type=int, default=5, help="relay throughput rounds")
    ap.add_argument("--sync", action="store_true", help="also time a bcoin sync")
    ap.add_argument("--blocks", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    kinds = [k for k in RELAYS if k != "socat" or shutil.which("socat")]
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    print(f"event loop: {loop}; CPUs: {os.cpu_count()}")
    relay_benchmarks(kinds, args.rounds_relay)
    if args.sync:
        sync_benchmark(args.blocks, args.rounds)


if __name__ == "__main__":
    main()
