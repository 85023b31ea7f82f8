"""The baseline for the relay benchmark: a plain asyncio byte relay as it is usually
written, with streams (read 256 KiB, write, drain), on the same event loop as the proxy
(uvloop when installed). No framing, no capture, nothing else.

    python bench/plain_relay.py LISTEN_PORT TARGET_PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any

READ_SIZE = 1 << 18


async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await r.read(READ_SIZE):
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()


async def main(listen: int, target: int) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", target, limit=READ_SIZE)
        await asyncio.gather(pump(r, uw), pump(ur, w))
        w.close()
        uw.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen, limit=READ_SIZE)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def run_relay(main: Callable[[int, int], Coroutine[Any, Any, None]]) -> None:
    """Run ``main(LISTEN_PORT, TARGET_PORT)`` from the command line, on uvloop when it is
    installed (as the proxy does)."""
    listen, target = int(sys.argv[1]), int(sys.argv[2])
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(listen, target))
    else:
        uvloop.run(main(listen, target))


if __name__ == "__main__":
    run_relay(main)
