"""Load generator for tests/test_load.py: many connections of random v1 frames.

    python tests/loadgen.py node HOST PORT CONNECTIONS FRAMES SEED   # dials, plays nodes
    python tests/loadgen.py peer PORT CONNECTIONS FRAMES SEED        # listens, plays peers

Each connection sends FRAMES random frames (mostly under 1 KB, about 1 in 1,000 between
1 KB and 1 MB) while reading everything the other side sends. The node side opens with a
``version`` frame naming the connection; the peer side seeds its stream from it. At the
end each process prints one JSON line: per connection, the SHA-256 and length of the bytes
it sent and of the bytes it received.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
from typing import Any

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from msgcap.capture.framing import HEADER_SIZE, Network, encode_frame

MAGIC = Network.REGTEST.magic


def frames(seed: str, count: int) -> Any:
    rng = random.Random(seed)
    for _ in range(count):
        if rng.random() < 0.001:
            size = rng.randint(1_000, 1_000_000)
        else:
            size = min(int(rng.expovariate(1 / 200)), 999)
        yield encode_frame(MAGIC, rng.choice(("inv", "tx", "blob", "getdata")), rng.randbytes(size))


async def pump(
    w: asyncio.StreamWriter, seed: str, count: int, first: bytes = b""
) -> tuple[str, int]:
    h = hashlib.sha256(first)
    n = len(first)
    batch = [first] if first else []
    size = len(first)
    for f in frames(seed, count):
        h.update(f)
        n += len(f)
        batch.append(f)
        size += len(f)
        if size >= 1 << 16:
            w.write(b"".join(batch))
            batch, size = [], 0
            await w.drain()
    w.write(b"".join(batch))
    await w.drain()
    w.write_eof()
    return h.hexdigest(), n


async def drain_all(r: asyncio.StreamReader, first: bytes = b"") -> tuple[str, int]:
    h = hashlib.sha256(first)
    n = len(first)
    while data := await r.read(1 << 18):
        h.update(data)
        n += len(data)
    return h.hexdigest(), n


async def node(host: str, port: int, conns: int, count: int, seed: int) -> dict[str, Any]:
    async def one(i: int) -> tuple[str, dict[str, Any]]:
        r, w = await asyncio.open_connection(host, port, limit=1 << 18)
        hello = encode_frame(MAGIC, "version", f"conn-{seed}-{i}".encode())
        sent, received = await asyncio.gather(
            pump(w, f"node-{seed}-{i}", count, hello), drain_all(r)
        )
        w.close()
        return f"conn-{seed}-{i}", {"sent": sent, "received": received}

    return dict(await asyncio.gather(*(one(i) for i in range(conns))))


async def peer(port: int, conns: int, count: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    done = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        header = await r.readexactly(HEADER_SIZE)
        hello = await r.readexactly(int.from_bytes(header[16:20], "little"))
        name = hello.decode()
        sent, received = await asyncio.gather(
            pump(w, f"peer-{name}", count), drain_all(r, header + hello)
        )
        w.close()
        results[name] = {"sent": sent, "received": received}
        if len(results) == conns:
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1 << 18, backlog=conns)
    print("ready", flush=True)
    async with server:
        await done.wait()
    return results


def main() -> None:
    role = sys.argv[1]
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    if role == "node":
        host, port, conns, count, seed = sys.argv[2], *map(int, sys.argv[3:7])
        out = run(node(host, port, conns, count, seed))
    else:
        port, conns, count = map(int, sys.argv[2:5])
        out = run(peer(port, conns, count))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
