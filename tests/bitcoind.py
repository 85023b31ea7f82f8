"""Real Bitcoin Core regtest nodes and a ``msgcap proxy`` process, for end-to-end tests.

Nothing here imports the project: the proxy is driven through its command line only.

bitcoind is found through ``MSGCAP_BITCOIND`` (a path to the binary), else on ``PATH``.
Without it the tests that need it skip, visibly and with the reason; with
``MSGCAP_REQUIRE_BITCOIND=1`` (CI) a missing bitcoind fails them instead. JSON-RPC goes
over HTTP with :mod:`urllib`, so bitcoin-cli is not needed.

Every node runs in the foreground (not ``-daemon``) in its own temporary datadir, on free
loopback ports; every wait is bounded; :meth:`BitcoinNode.stop` (``stop`` over RPC, then
SIGKILL if that does not end it in time) is safe to call twice and from finalizers.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

ENV_BITCOIND = "MSGCAP_BITCOIND"
ENV_REQUIRE = "MSGCAP_REQUIRE_BITCOIND"

RPC_USER = "msgcap"
RPC_PASSWORD = "msgcap"
RPC_HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Basic " + base64.b64encode(f"{RPC_USER}:{RPC_PASSWORD}".encode()).decode(),
}
"""The headers of every JSON-RPC request."""

MSGCAP = Path(sys.executable).parent / "msgcap"

CAPTURE = "-capturemessages"
FAST_RELAY = "-whitelist=noban,in,out@127.0.0.1"
"""Loopback peers get ``noban``, as in Core's functional tests: transactions are announced
to them at once instead of on the trickle timer (Poisson, 2-5 s mean, seen up to 23 s)."""
MATURITY = 101
"""Blocks before the first coinbase can be spent."""

T = TypeVar("T")


# --- finding bitcoind -------------------------------------------------------------------


def find_bitcoind() -> Path | None:
    """``$MSGCAP_BITCOIND`` if set (it must exist), else ``bitcoind`` on ``PATH``."""
    configured = os.environ.get(ENV_BITCOIND)
    if configured:
        path = Path(configured)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("bitcoind")
    return Path(found) if found else None


def missing_reason() -> str:
    configured = os.environ.get(ENV_BITCOIND)
    if configured:
        return f"bitcoind not found: {ENV_BITCOIND}={configured} is not an executable file"
    return f"bitcoind not found: set {ENV_BITCOIND}=/path/to/bitcoind or put it on PATH"


def require_bitcoind() -> Path:
    """The bitcoind binary; otherwise skip the test with the reason, or fail it when
    ``MSGCAP_REQUIRE_BITCOIND`` is set (as ``MSGCAP_REQUIRE_E2E`` does for bcoin)."""
    path = find_bitcoind()
    if path is not None:
        return path
    reason = missing_reason()
    if os.environ.get(ENV_REQUIRE) not in (None, "", "0"):
        pytest.fail(f"{reason} ({ENV_REQUIRE} is set)", pytrace=False)
    pytest.skip(reason)


# --- small helpers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Deadline:
    """``timeout`` seconds from now, for a wait on ``what``: what :func:`wait_until` and
    ``tests.conftest.wait_until_async`` share."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout, self.what = timeout, what
        self.at = time.monotonic() + timeout

    def check(self) -> None:
        """Raise :class:`TimeoutError` naming ``what`` once the deadline has passed."""
        if time.monotonic() > self.at:
            raise TimeoutError(f"{self.what}: not reached in {self.timeout:g}s")


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str = "condition", poll: float = 0.1
) -> T:
    """Call ``predicate`` until it returns something truthy (returned), at most ``timeout``
    seconds; then raise :class:`TimeoutError` naming ``what``."""
    deadline = Deadline(timeout, what)
    while True:
        if value := predicate():
            return value
        deadline.check()
        time.sleep(poll)


class Laps:
    """The seconds each phase of a long test took, for its report: :meth:`lap` ends the
    phase that began at the previous lap (or at the start)."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.took: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.monotonic()
        self.took[name] = round(now - self._last, 2)
        self._last = now
        return self.took[name]

    def total(self) -> dict[str, float]:
        """Every lap, and ``total``: the seconds since the start."""
        self.took["total"] = round(time.monotonic() - self.started, 2)
        return self.took


def read_events(where: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The events of an event log (``where``: the ``events.jsonl`` file or the capture
    directory holding it), only those named ``event`` if given. A line still being
    written is left out, so this can be polled while the proxy runs."""
    path = where if where.suffix == ".jsonl" else where / "events.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last piece has no newline yet
    out = [json.loads(x) for x in lines if x]
    return out if event is None else [e for e in out if e["event"] == event]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@functools.cache
def _supported_options(binary: Path) -> frozenset[str]:
    """The option names ``binary -help`` lists (``upnp`` was dropped in Core 29)."""
    out = subprocess.run(
        [str(binary), "-help"], capture_output=True, text=True, timeout=20, check=False
    ).stdout
    names = set()
    for line in out.splitlines():
        word = line.strip().split("=", 1)[0].split(" ", 1)[0]
        if word.startswith("-"):
            names.add(word[1:])
    return frozenset(names)


class RPCError(Exception):
    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.code = code
        self.message = message


# --- nodes ------------------------------------------------------------------------------


class BitcoinNode:
    """One ``bitcoind -regtest`` in ``workdir/name``, on free loopback ports."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        extra: Sequence[str] = (),
        *,
        binary: Path | None = None,
        start_timeout: float = 60,
    ) -> None:
        self.name = name
        self.binary = binary or require_bitcoind()
        self.datadir = workdir / name
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.rpc_port = free_port()
        self.wallet: str | None = None
        self.extra = list(extra)
        args = [
            str(self.binary),
            "-regtest",
            f"-datadir={self.datadir}",
            "-listen=1",
            "-bind=127.0.0.1",
            f"-port={self.port}",
            "-rpcbind=127.0.0.1",
            "-rpcallowip=127.0.0.1",
            f"-rpcport={self.rpc_port}",
            f"-rpcuser={RPC_USER}",
            f"-rpcpassword={RPC_PASSWORD}",
            "-dnsseed=0",
            "-fixedseeds=0",
            "-discover=0",
            "-listenonion=0",
            "-natpmp=0",
            "-fallbackfee=0.0002",
            "-printtoconsole=0",
            "-server=1",
        ]
        if "upnp" in _supported_options(self.binary):
            args.append("-upnp=0")
        args += self.extra
        self.args = args
        self.log_path = self.datadir / "stdout.log"
        self._log: IO[bytes] | None = open(self.log_path, "wb")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self.wait_rpc(start_timeout)
        except BaseException:
            self.stop()
            raise

    # RPC

    @property
    def address(self) -> str:
        """The P2P listener, ``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    @property
    def capture_dir(self) -> Path:
        """Where ``-capturemessages`` writes (one folder per peer address)."""
        return self.datadir / "regtest" / "message_capture"

    @property
    def debug_log(self) -> Path:
        return self.datadir / "regtest" / "debug.log"

    def rpc(self, method: str, *params: Any, wallet: str | None = None, timeout: float = 30) -> Any:
        path = "/" if wallet is None else f"/wallet/{wallet}"
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        status, raw = self.post(path, body.encode(), timeout)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise RPCError(method, status, raw.decode(errors="replace")) from None
        error = reply.get("error")
        if error:
            raise RPCError(method, int(error.get("code", 0)), str(error.get("message")))
        return reply["result"]

    def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """One HTTP POST of ``body`` to the RPC port, with the credentials: the status and
        the response body. (The one thing a node reached another way overrides.)"""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.rpc_port}{path}", data=body, headers=RPC_HEADERS
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as e:  # JSON-RPC 1.x errors come as HTTP 500
            return e.code, e.read()

    def wallet_rpc(self, method: str, *params: Any) -> Any:
        assert self.wallet is not None, f"{self.name}: no wallet (call create_wallet)"
        return self.rpc(method, *params, wallet=self.wallet)

    def wait_rpc(self, timeout: float = 60) -> None:
        """Until RPC answers (past Core's warm-up), or raise with the node's output."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: bitcoind exited ({self.proc and self.proc.returncode}): "
                    f"{_tail(self.log_path)}"
                )
            try:
                self.rpc("getblockcount", timeout=5)
                return
            except (OSError, RPCError):  # refused, reset, or -28 "warming up"
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name}: RPC not ready in {timeout:g}s: {_tail(self.log_path)}"
                    ) from None
                time.sleep(0.1)

    # state

    def peers(self) -> list[dict[str, Any]]:
        peers: list[dict[str, Any]] = self.rpc("getpeerinfo")
        return peers

    def tip(self) -> str:
        tip: str = self.rpc("getbestblockhash")
        return tip

    def height(self) -> int:
        return int(self.rpc("getblockcount"))

    def mempool(self) -> list[str]:
        txids: list[str] = self.rpc("getrawmempool")
        return txids

    # wallet and mining

    def create_wallet(self, name: str = "w") -> str:
        self.rpc("createwallet", name)
        self.wallet = name
        return name

    def new_address(self) -> str:
        address: str = self.wallet_rpc("getnewaddress")
        return address

    def mine(self, n: int, address: str | None = None) -> list[str]:
        """``n`` blocks to ``address`` (default: a new address of this node's wallet)."""
        to = address or self.new_address()
        hashes: list[str] = self.rpc("generatetoaddress", n, to, timeout=120)
        return hashes

    def send(self, address: str, amount: float) -> str:
        txid: str = self.wallet_rpc("sendtoaddress", address, amount)
        return txid

    # lifetime

    def stop(self, timeout: float = 30) -> int | None:
        """Stop over RPC, wait, SIGKILL past ``timeout``. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                try:
                    self.rpc("stop", timeout=10)
                except (OSError, RPCError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        finally:
            self.proc = None
            if self._log is not None:
                self._log.close()
                self._log = None
        return proc.returncode

    def __enter__(self) -> BitcoinNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"BitcoinNode({self.name}, p2p={self.port}, rpc={self.rpc_port})"


def only_peer(node: BitcoinNode) -> dict[str, Any]:
    """The node's one peer (``getpeerinfo``); asserts that it has exactly one."""
    peers = node.peers()
    assert len(peers) == 1, f"{node.name}: expected one peer, got {peers}"
    return peers[0]


def handshaken(*group: BitcoinNode) -> Callable[[], bool]:
    """A predicate for :func:`wait_until`: each node has exactly one peer, and its version
    handshake is done."""
    return lambda: all(len(p := n.peers()) == 1 and bool(p[0].get("version")) for n in group)


def wait_synced(nodes: Iterable[BitcoinNode], timeout: float = 60) -> str:
    """Until every node has the same tip and an empty mempool; returns the tip."""
    group = list(nodes)

    def same() -> str | None:
        tips = {n.tip() for n in group}
        if len(tips) == 1 and not any(n.mempool() for n in group):
            return tips.pop()
        return None

    return wait_until(same, timeout, f"same tip and empty mempools on {group}", poll=0.2)


def wait_quiet(*group: BitcoinNode, settle: float = 1.0, timeout: float = 30) -> None:
    """Until no node's per-peer byte counters move for ``settle`` seconds (nothing in
    flight on any connection)."""
    last: list[Any] = []
    since = [0.0]

    def quiet() -> bool:
        now = [
            [(p["addr"], p["bytessent"], p["bytesrecv"]) for p in node.peers()] for node in group
        ]
        if now != last:
            last[:] = now
            since[0] = time.monotonic()
            return False
        return time.monotonic() - since[0] >= settle

    wait_until(quiet, timeout, f"no traffic for {settle}s on {list(group)}", poll=0.2)


def wait_mempools(nodes: Iterable[BitcoinNode], txids: Iterable[str], timeout: float = 60) -> None:
    """Until every node's mempool holds every one of ``txids``."""
    group, want = list(nodes), set(txids)
    wait_until(
        lambda: all(want <= set(n.mempool()) for n in group),
        timeout,
        f"{len(want)} transactions in the mempools of {group}",
        poll=0.2,
    )


class NodeFactory:
    """Starts nodes in one work directory and stops them all in :meth:`close` (give that
    to a fixture's finalizer, or use the factory as a context manager: it runs even when
    the test fails)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.binary = require_bitcoind()
        self.nodes: list[BitcoinNode] = []

    def __call__(self, name: str, *extra: str) -> BitcoinNode:
        node = BitcoinNode(self.workdir, name, extra, binary=self.binary)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        """Stop every node, the last started first; a node that fails to stop does not
        keep the others running (its error is raised once all are stopped)."""
        with contextlib.ExitStack() as stack:
            for node in self.nodes:
                stack.callback(node.stop)

    def __enter__(self) -> NodeFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- recorded sessions ----------------------------------------------------------------

BURN = "bcrt1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqdku202"
"""An address whose coins nobody can spend: mine to it when no wallet is needed."""


@dataclass(frozen=True)
class Recording:
    """A recorded sync: the capture folder of the peer that served the chain, the tip the
    recording node reached and its height."""

    folder: Path
    tip: str
    height: int
    transport: str = ""
    """The connection's ``transport_protocol_type`` as the recording node saw it (empty
    when not known)."""


def only_capture_folder(node: BitcoinNode) -> Path:
    """The node's one ``-capturemessages`` folder (asserts there is exactly one)."""
    folders = [f for f in node.capture_dir.iterdir() if f.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def copy_capture(node: BitcoinNode, out: Path) -> Path:
    """A copy of the node's one capture folder in ``out`` (same name)."""
    folder = only_capture_folder(node)
    return Path(shutil.copytree(folder, out / folder.name))


def record_sync(nodes: NodeFactory, miner: BitcoinNode, out: Path) -> tuple[Recording, BitcoinNode]:
    """A new node ``syncer`` dials ``miner`` with ``-capturemessages`` and syncs its chain;
    once stopped, its capture of the miner is copied into ``out``. Returns the recording
    and the stopped syncer (its datadir holds the chain)."""
    tip, height = miner.tip(), miner.height()
    syncer = nodes("syncer", "-capturemessages", f"-connect={miner.address}")
    wait_until(lambda: syncer.tip() == tip, 60, "the recording node did not sync")
    transport = str(only_peer(syncer)["transport_protocol_type"])
    syncer.stop()
    return Recording(copy_capture(syncer, out), tip, height, transport), syncer


# --- capture files, read directly (no project imports) ---------------------------------

_RECORD_HEADER = struct.Struct("<Q12sI")  # time (µs), message type (NUL-padded), length


@dataclass(frozen=True)
class CaptureRecord:
    """One record of a ``-capturemessages`` file (Core's or the proxy's)."""

    time_us: int
    msgtype: str
    payload: bytes

    def encode(self) -> bytes:
        """The record as the file holds it: the header, then the payload."""
        header = _RECORD_HEADER.pack(self.time_us, self.msgtype.encode(), len(self.payload))
        return header + self.payload


def read_capture(path: Path) -> list[CaptureRecord]:
    """The records of one ``msgs_recv.dat``/``msgs_sent.dat`` (none if it is absent);
    asserts that the file ends on a record boundary."""
    data = path.read_bytes() if path.exists() else b""
    out, pos = [], 0
    while pos < len(data):
        assert pos + _RECORD_HEADER.size <= len(data), f"{path}: truncated header at {pos}"
        time_us, msgtype, length = _RECORD_HEADER.unpack_from(data, pos)
        start = pos + _RECORD_HEADER.size
        assert start + length <= len(data), f"{path}: truncated payload at {pos}"
        out.append(
            CaptureRecord(time_us, msgtype.rstrip(b"\0").decode(), data[start : start + length])
        )
        pos = start + length
    return out


def capture_folder_name(addr: str) -> str:
    """Core's capture folder for a peer address ``host:port`` (``:`` becomes ``_``)."""
    return addr.replace(":", "_")


def compare_captures(
    a: Path, b: Path, mirror: bool = False
) -> tuple[int, list[dict[str, Any]], str]:
    """``msgcap compare --json [--mirror] A B``: exit status, the per-file-pair results,
    and the raw output (for assertion messages)."""
    res = msgcap("compare", "--json", *(["--mirror"] if mirror else []), str(a), str(b))
    assert res.returncode in (0, 1), res.stderr
    results: list[dict[str, Any]] = json.loads(res.stdout)
    return res.returncode, results, res.stdout


# --- the msgcap proxy process -----------------------------------------------------------


class ProxyProcess:
    """``msgcap proxy`` as a subprocess, from ``flags`` and optionally a TOML config.

    Started when the banner (printed once every listener is bound and listening) is
    complete, so the listeners accept from then on; no probe connection is made (it would
    show in the event log). :meth:`stop` sends SIGTERM and returns the exit status.
    ``prefix`` is a command the proxy runs under (``ip netns exec NS``).
    """

    BANNER_END = "SIGTERM stops it cleanly"

    def __init__(
        self,
        workdir: Path,
        *flags: str,
        config: str | None = None,
        network: str = "regtest",
        start_timeout: float = 20,
        prefix: Sequence[str] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.capture_dir = workdir / "capture"
        self.config_path: Path | None = None
        cmd = [*prefix, str(MSGCAP), "proxy"]
        if config is not None:
            self.config_path = workdir / "msgcap.toml"
            self.config_path.write_text(config)
            cmd += ["--config", str(self.config_path)]
        cmd += ["--capture-dir", str(self.capture_dir), "--network", network, *flags]
        self.cmd = cmd
        self.stdout_path = workdir / "proxy.stdout"
        self.stderr_path = workdir / "proxy.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )
        self.returncode: int | None = None
        try:
            self.banner = wait_until(self._banner, start_timeout, "msgcap proxy banner", 0.05)
        except BaseException:
            self.kill()
            raise

    def _banner(self) -> str | None:
        text = _tail(self.stdout_path, 100_000)
        if self.BANNER_END in text:
            return text
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"msgcap proxy exited {self.proc.returncode}: {text}{_tail(self.stderr_path)}"
            )
        return None

    @property
    def event_log(self) -> Path:
        return self.capture_dir / "events.jsonl"

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.event_log)

    def stderr(self) -> str:
        return _tail(self.stderr_path, 20_000)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then wait (SIGKILL past ``timeout``: then the status is negative)."""
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.returncode = self.proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def msgcap(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``msgcap ARGS`` (compare, parse, ...) to completion."""
    return subprocess.run(
        [str(MSGCAP), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
