"""Load: 100 concurrent connections through a ``msgcap proxy`` process, each exchanging
10,000 random frames in both directions. Every capture must equal what its endpoints
sent (nothing lost, duplicated or reordered), bytes out must equal bytes in, and the
proxy's memory must stay bounded. Prints throughput and peak memory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from msgcap.capture.framing import encode_frame
from msgcap.capture.records import Record, read_records
from tests.conftest import MAGIC, free_port, read_events

ROOT = Path(__file__).parent.parent
CONNECTIONS = int(os.environ.get("MSGCAP_LOAD_CONNECTIONS", "100"))
FRAMES = int(os.environ.get("MSGCAP_LOAD_FRAMES", "10000"))
DIRS = ("recv", "sent")
MEMORY_BOUND = 1_000_000_000
"""Peak RSS allowed for the proxy (measured: about 400 MB). Per connection and direction
the proxy holds at most one frame being reassembled (up to 4 MB), one read buffer and
the transport's write buffer; frames queued for the capture thread are capped at 32 MB
over all connections."""


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def stream_digest(folder: Path, name: str) -> tuple[str, int, bytes]:
    """SHA-256 and length of the records of a capture file, re-framed; and the first
    payload."""
    h = hashlib.sha256()
    n = 0
    first = b""
    with open(folder / name, "rb") as f:
        for rec in read_records(f):
            assert isinstance(rec, Record), f"damage in {folder / name}: {rec}"
            frame = encode_frame(MAGIC, rec.msgtype.name.decode(), rec.payload)
            h.update(frame)
            n += len(frame)
            if not first:
                first = rec.payload
    return h.hexdigest(), n, first


def test_load(tmp_path: Path) -> None:
    peer_port, listen = free_port(), free_port()
    cap = tmp_path / "cap"
    peer = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "loadgen.py"), "peer", str(peer_port),
         str(CONNECTIONS), str(FRAMES)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
    proxy = subprocess.Popen(
        [sys.executable, "-m", "msgcap", "proxy", "--capture-dir", str(cap), "--layout",
         "session", "--socks5", "off", "--route", f"127.0.0.1:{listen}=127.0.0.1:{peer_port}",
         "--max-connections", str(CONNECTIONS + 10),
         "--capture-bytes-per-peer", str(1 << 40), "--capture-bytes-total", str(1 << 40)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().startswith("msgcap proxy")
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(rss(proxy.pid, "VmRSS"))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.perf_counter()
        node = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "loadgen.py"), "node", "127.0.0.1",
             str(listen), str(CONNECTIONS), str(FRAMES), "7"],
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        peer_out, _ = peer.communicate(timeout=120)
        elapsed = time.perf_counter() - t
        peak = rss(proxy.pid, "VmHWM")
        stop.set()
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(60) == 0
    finally:
        for p in (peer, proxy):
            if p.poll() is None:
                p.kill()
    nodes = json.loads(node.stdout.strip().splitlines()[-1])
    peers = json.loads(peer_out.strip().splitlines()[-1])
    assert len(nodes) == len(peers) == CONNECTIONS
    total = 0
    for name, n in nodes.items():
        assert n["sent"] == peers[name]["received"], name  # bytes out == bytes in
        assert peers[name]["sent"] == n["received"], name
        total += n["sent"][1] + n["received"][1]
    sessions = [d for d in cap.glob("127.0.0.1_*/*") if d.is_dir()]
    assert len(sessions) == CONNECTIONS
    for folder in sessions:
        sent_sha, sent_len, hello = stream_digest(folder, "msgs_sent.dat")
        recv_sha, recv_len, _ = stream_digest(folder, "msgs_recv.dat")
        name = hello.decode()
        assert [sent_sha, sent_len] == nodes[name]["sent"], f"node side of {name}"
        assert [recv_sha, recv_len] == nodes[name]["received"], f"peer side of {name}"
    anomalies = [
        e
        for e in read_events(cap)
        if e["event"].startswith("capture_")
        or (e["event"] == "close" and [(e.get(d) or {}).get("invalid") for d in DIRS] != [0, 0])
    ]
    assert anomalies == []
    messages = CONNECTIONS * (2 * FRAMES + 1)
    print(
        f"\nload: {CONNECTIONS} connections, {messages:,} messages, {total / 1e9:.2f} GB "
        f"through the proxy in {elapsed:.1f}s: {total / 1e6 / elapsed:.0f} MB/s, "
        f"{messages / elapsed:,.0f} msg/s; proxy peak RSS {peak / 1e6:.0f} MB "
        f"(sampled max {max(samples) / 1e6:.0f} MB); captures equal what was sent"
    )
    assert peak < MEMORY_BOUND, peak
    shutil.rmtree(cap)
