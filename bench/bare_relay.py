"""A second baseline for the relay benchmark: the leanest asyncio byte relay we know.

Transports and protocols, as ``msgcap proxy`` relays: each received chunk is written
straight to the other side, and reading pauses while the other side's send buffer is
full. No framing, no capture, nothing else.

    python bench/bare_relay.py LISTEN_PORT TARGET_PORT
"""

from __future__ import annotations

import asyncio


class Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Side | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.other is None or self.other.transport is None:
            self.early.append(data)  # upstream not connected yet
        else:
            self.other.transport.write(data)

    def eof_received(self) -> bool:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


async def main(listen: int, target: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def accept() -> Side:
        client = Side()

        async def connect() -> None:
            _, upstream = await loop.create_connection(Side, "127.0.0.1", target)
            upstream.other, client.other = client, upstream
            assert upstream.transport is not None
            for data in client.early:
                upstream.transport.write(data)
            client.early.clear()

        task = loop.create_task(connect())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_server(accept, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    from plain_relay import run_relay  # this script's folder is on sys.path

    run_relay(main)
