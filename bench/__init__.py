"""Benchmarks: each prints ratios against a baseline measured in the same run."""

from __future__ import annotations

import socket
import threading


class Sink:
    """A loopback server that counts the bytes of every connection it accepts, each served
    in a thread of its own by :meth:`serve` (which calls :meth:`add` as bytes arrive)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.received = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                self.add(len(data))

    def add(self, n: int) -> None:
        with self.cond:
            self.received += n
            self.cond.notify_all()

    def wait_for(self, total: int, timeout: float = 300) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.received >= total, timeout)

    def close(self) -> None:
        self.sock.close()
