"""Real regtest nodes for end-to-end tests: bcoin 1.0.2 from npm (see DESIGN.md §9).

Each node runs in memory on loopback, with its own P2P and HTTP RPC ports, and is killed
when the test ends. Set MSGCAP_REQUIRE_E2E=1 to make a missing bcoin a failure instead
of a skip (CI does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture.framing import hash256
from tests.conftest import free_port, wait_until

E2E_DIR = Path(__file__).parent / "e2e"
BCOIN = Path(os.environ.get("MSGCAP_BCOIN", E2E_DIR / "node_modules" / ".bin" / "bcoin"))


def require_bcoin() -> Path:
    if BCOIN.exists() and shutil.which("node"):
        return BCOIN
    reason = f"bcoin not installed at {BCOIN} (npm --prefix tests/e2e install)"
    if os.environ.get("MSGCAP_REQUIRE_E2E"):
        pytest.fail(reason)
    pytest.skip(reason)


def wait_listening(port: int, timeout: float = 30) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""

    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_until(accepts, timeout, f"a listener on 127.0.0.1:{port}", poll=0.05)


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def regtest_p2pkh_address(seed: bytes) -> str:
    """A base58 P2PKH address in bcoin's regtest format (version byte 0x3c)."""
    payload = b"\x3c" + hashlib.new("ripemd160", hashlib.sha256(seed).digest()).digest()
    raw = payload + hash256(payload)[:4]
    n = int.from_bytes(raw, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


MINER_ADDRESS = regtest_p2pkh_address(b"msgcap e2e miner")


class BcoinNode:
    def __init__(self, workdir: Path, name: str, *extra: str, listen: bool = True) -> None:
        self.name = name
        self.port = free_port()
        self.http_port = free_port()
        self.prefix = workdir / name
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.log_path = self.prefix / "stdout.log"
        args = [
            str(require_bcoin()),
            "--network=regtest",
            "--memory=true",
            f"--prefix={self.prefix}",
            f"--port={self.port}",
            f"--http-port={self.http_port}",
            "--http-host=127.0.0.1",
            "--host=127.0.0.1",
            "--no-wallet=true",
            f"--listen={'true' if listen else 'false'}",
            "--log-level=debug",
            *extra,
        ]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_rpc()

    def rpc(self, method: str, *params: Any) -> Any:
        body = json.dumps({"method": method, "params": list(params)}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            reply = json.loads(resp.read())
        if reply.get("error"):
            raise RuntimeError(f"{self.name} {method}: {reply['error']}")
        return reply["result"]

    def wait_rpc(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                self.rpc("getblockcount")
            except OSError:
                return False
            return True

        wait_until(answers, timeout, f"{self.name}: RPC", poll=0.2)

    def mine(self, n: int) -> list[str]:
        hashes: list[str] = self.rpc("generatetoaddress", n, MINER_ADDRESS)
        return hashes

    def wait_for(self, what: str, check: Any, timeout: float = 60) -> None:
        wait_until(check, timeout, f"{self.name}: {what}", poll=0.2)

    def wait_height(self, height: int, timeout: float = 60) -> None:
        self.wait_for(f"height {height}", lambda: self.rpc("getblockcount") >= height, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
