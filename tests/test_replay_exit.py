"""``msgcap replay`` never claims success after a crash of its own.

An exception raised while the replayer serves or dials a live side (in the task that
reads it, in the connection handler of ``--listen``, in the transport set-up) must end the
command with exit status 1 and one line ``msgcap: error: ...`` naming what failed: never
exit 0, never a report that says ``reproduced``. Faults are injected in-process at each
layer (the reading task, the playing coroutine, the transport accept or handshake), over
v1 and v2, with ``--to``, with ``--listen`` and with ``--listen --connections 2`` (where the
first connection is served faithfully and the second crashes); one case goes through a
real ``python -m msgcap`` process. Live sides that are merely hostile (garbage, a malformed
or abandoned BIP324 handshake, probes) are not crashes: they do not count as connections
and the honest client after them is served.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import msgcap.proxy.replay as replay_mod
from msgcap.capture.bip324 import V2Session
from msgcap.capture.framing import Message, v1_version_prefix
from msgcap.capture.records import encode_record
from msgcap.cli import main
from msgcap.parser.messages import Headers
from msgcap.proxy.v2 import Leg, V1Leg, V2Leg, handshake
from tests.conftest import (
    GENESIS,
    MAGIC,
    VERSION_PAYLOAD,
    free_port,
    getdata,
    getheaders,
    live_node,
    make_chain,
)
from tests.vectors import VECTORS

FAULT = "injected fault"

BLOCKS = make_chain(3)
HASHES = [b.hash for b in BLOCKS]
GETHEADERS = getheaders(GENESIS)
GETDATA = getdata(*HASHES)
REQUESTS: list[Message] = [("getheaders", GETHEADERS), ("getdata", GETDATA)]
"""What the live node asks for after verack: everything the recording answers."""


def write_recording(folder: Path) -> Path:
    """A node syncing three blocks from the peer, as the node recorded it (the replayer
    plays the peer)."""
    recv = [(1, "version", VERSION_PAYLOAD), (3, "verack", b""),
            (5, "sendcmpct", bytes.fromhex(VECTORS["sendcmpct"])),
            (7, "headers", Headers(tuple(b.header for b in BLOCKS)).encode())]  # fmt: skip
    recv += [(9 + i, "block", b.encode()) for i, b in enumerate(BLOCKS)]
    sent = [(2, "version", VERSION_PAYLOAD), (4, "verack", b""), (6, "getheaders", GETHEADERS),
            (8, "getdata", GETDATA)]  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "msgs_recv.dat").write_bytes(b"".join(encode_record(*r) for r in recv))
    (folder / "msgs_sent.dat").write_bytes(b"".join(encode_record(*r) for r in sent))
    return folder


# --- a live node (tests.conftest.live_node), v1 or BIP324 ----------------------------------


async def connect_when_listening(
    port: int, timeout: float = 30
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the replayer's ``--listen`` port, retried until it listens (the
    last refusal is raised after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def dial_node(port: int, transport: str) -> list[str]:
    """A node that dials the listening replayer (retrying until it listens)."""
    reader, writer = await connect_when_listening(port)
    return await live_node(reader, writer, transport=transport, dial=True, requests=REQUESTS)


# --- faults --------------------------------------------------------------------------------


def inject(monkeypatch: pytest.MonkeyPatch, fault: str, where: str, nth: int) -> None:
    """Make the ``nth`` Replayer of this process raise at one layer:

    - ``reading``: in the task that reads the live side (when its getheaders arrives);
    - ``playing``: in the coroutine that plays the script and settles;
    - ``transport``: while the transport is set up (the accept of ``--listen``, or the
      BIP324 handshake of ``--to --transport v2``).
    """
    index: dict[int, int] = {}
    count = itertools.count(1)
    original_init = replay_mod.Replayer.__init__

    def init(self: replay_mod.Replayer, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        index[id(self)] = next(count)

    def hit(replayer: replay_mod.Replayer) -> bool:
        return index.get(id(replayer)) == nth

    monkeypatch.setattr(replay_mod.Replayer, "__init__", init)
    if fault == "reading":
        received = replay_mod.Replayer._received

        def _received(self: replay_mod.Replayer, messages: list[Message]) -> None:
            if hit(self) and any(t == "getheaders" for t, _ in messages):
                raise RuntimeError(FAULT)
            received(self, messages)

        monkeypatch.setattr(replay_mod.Replayer, "_received", _received)
    elif fault == "playing":
        settle = replay_mod.Replayer._settle

        async def _settle(self: replay_mod.Replayer) -> None:
            if hit(self):
                raise RuntimeError(FAULT)
            await settle(self)

        monkeypatch.setattr(replay_mod.Replayer, "_settle", _settle)
    else:
        accept = replay_mod._accept_transport

        async def _accept_transport(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replayer: Any
        ) -> Any:
            if hit(replayer):
                raise RuntimeError(FAULT)
            return await accept(reader, writer, replayer)

        async def v2_handshake(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(FAULT)

        if where == "listen":
            monkeypatch.setattr(replay_mod, "_accept_transport", _accept_transport)
        else:
            monkeypatch.setattr(replay_mod, "handshake", v2_handshake)


# --- running the command in-process ---------------------------------------------------------


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]]


def run_command(
    argv: Callable[[int], list[str]],
    transport: str,
    clients: Callable[[int], Awaitable[object]] | None = None,
    node: Handler | None = None,
) -> tuple[int | str, float]:
    """Run ``main(argv(port))`` in a thread against a live node: ``clients(port)`` dial the
    listening replayer, or (without ``clients``) a node listens on ``port`` for the
    replayer to dial (``node``, default :func:`live_node`). Returns the exit status (or
    what escaped ``main``) and the seconds the command took."""
    result: dict[str, Any] = {}

    def command(port: int) -> None:
        started = time.monotonic()
        try:
            result["status"] = main(argv(port))
        except SystemExit as e:
            result["status"] = e.code
        except BaseException as e:  # the test reports it
            result["status"] = f"raised {type(e).__name__}: {e}"
        result["seconds"] = time.monotonic() - started

    async def scenario() -> None:
        server = None
        if clients is None:

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                if node is not None:
                    await node(r, w)
                else:
                    await live_node(r, w, transport=transport, requests=REQUESTS)

            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            port = int(server.sockets[0].getsockname()[1])
        else:
            port = free_port()
        thread = threading.Thread(target=command, args=(port,), daemon=True)
        thread.start()
        try:
            if clients is not None:
                await asyncio.wait_for(clients(port), 40)
            await asyncio.to_thread(thread.join, 30)
        finally:
            if server is not None:
                server.close()
        assert not thread.is_alive(), "the command did not end"

    asyncio.run(scenario())
    return result["status"], result["seconds"]


CASES = [
    pytest.param(where, transport, connections, fault,
                 id=f"{where}-{transport}-{connections}conn-{fault}")
    for where, connections in (("to", 1), ("listen", 1), ("listen", 2))
    for transport in ("v1", "v2")
    for fault in ("reading", "playing", "transport")
    if not (where == "to" and transport == "v1" and fault == "transport")  # v1: no set-up
]  # fmt: skip


@pytest.mark.parametrize(("where", "transport", "connections", "fault"), CASES)
def test_a_crash_while_replaying_fails_the_command(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    transport: str,
    connections: int,
    fault: str,
) -> None:
    folder = write_recording(tmp_path / "rec")
    inject(monkeypatch, fault, where, nth=connections)

    def argv(port: int) -> list[str]:
        flag = ["--to"] if where == "to" else ["--listen"]
        more = ["--connections", str(connections)] if where == "listen" else []
        return ["replay", str(folder), *flag, f"127.0.0.1:{port}", "--play", "peer",
                "--transport", transport, "--timeout", "2", *more]  # fmt: skip

    async def clients(port: int) -> None:
        for _ in range(connections):
            await dial_node(port, transport)

    status, seconds = run_command(argv, transport, None if where == "to" else clients)
    out, err = capsys.readouterr()
    print(out, err)
    assert status == 1, (status, out, err)
    assert "reproduced" not in out
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("msgcap: error: "), err
    assert FAULT in lines[-1] and "RuntimeError" in lines[-1]
    assert [x for x in lines if x.startswith("msgcap: error:")] == lines[-1:]
    assert "Traceback" not in err
    assert seconds < 10, seconds  # at once, not after an accept timeout


def test_the_faithful_run_still_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The harness above, without a fault: exit 0 and ``reproduced`` (both transports,
    two connections)."""
    folder = write_recording(tmp_path / "rec")
    for transport in ("v1", "v2"):

        def argv(port: int, transport: str = transport) -> list[str]:
            return ["replay", str(folder), "--listen", f"127.0.0.1:{port}", "--play", "peer",
                    "--timeout", "2", "--connections", "2", "--strict"]  # fmt: skip

        async def clients(port: int, transport: str = transport) -> None:
            for _ in range(2):
                got = await dial_node(port, transport)
                assert got.count("block") == 3, got

        status, _ = run_command(argv, transport, clients)
        out, err = capsys.readouterr()
        assert status == 0, out + err
        assert out.count("reproduced") == 2 and "DIVERGED" not in out, out
        assert out.count(f"over {transport}") == 2


# --- a live side that makes the replay impossible ------------------------------------------


async def _node_sends_garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Answers whatever comes (a v1 version, a BIP324 key) with bytes that are neither."""
    await r.read(1 << 16)
    w.write(b"\xff" * 2000)
    await w.drain()
    await r.read()
    w.close()


async def _node_closes_mid_handshake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Reads the replayer's first bytes (its version, or its BIP324 key), then hangs up."""
    await r.read(1 << 16)
    w.close()


async def _client_closes_after_version(port: int, transport: str) -> None:
    """Dials, sends its version (so it counts), and hangs up before verack."""
    r, w = await connect_when_listening(port)
    leg: Leg = V1Leg(MAGIC)
    if transport == "v2":
        session = V2Session(initiator=True, magic=MAGIC)
        await handshake(replay_mod.StreamIO(r, w), session)
        leg = V2Leg(session)
    w.write(leg.encode([("version", VERSION_PAYLOAD)]))
    await w.drain()
    w.close()


IMPOSSIBLE = [
    pytest.param(where, transport, how, id=f"{where}-{transport}-{how}")
    for where, how in (("to", "garbage"), ("to", "closes"), ("listen", "closes"))
    for transport in ("v1", "v2")
]


@pytest.mark.parametrize(("where", "transport", "how"), IMPOSSIBLE)
def test_a_replay_that_could_not_be_carried_out_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, transport: str, how: str
) -> None:
    """The live side answers with garbage or hangs up in the handshake: the report says
    why (``error: ...``, ``DIVERGED``), and the command fails with that reason, with or
    without ``--strict``."""
    folder = write_recording(tmp_path / "rec")

    def argv(port: int) -> list[str]:
        return ["replay", str(folder), f"--{where}", f"127.0.0.1:{port}", "--play", "peer",
                "--transport", transport, "--timeout", "2"]  # fmt: skip

    node = _node_sends_garbage if how == "garbage" else _node_closes_mid_handshake

    async def client(port: int) -> None:
        await _client_closes_after_version(port, transport)

    if where == "to":
        status, _ = run_command(argv, transport, node=node)
    else:
        status, _ = run_command(argv, transport, clients=client)
    out, err = capsys.readouterr()
    print(out, err)
    assert status == 1, (status, out, err)
    assert "reproduced" not in out and "DIVERGED" in out and "\nerror: " in out
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("msgcap: error: "), err
    assert [x for x in lines if x.startswith("msgcap: error:")] == lines[-1:]
    assert "Traceback" not in err


# --- as a process ------------------------------------------------------------------------


def crash_script(module: str, target: str, coroutine: bool = False) -> str:
    """Source for ``python -c``: msgcap's command line, with ``module.target`` (a method)
    replaced by one that raises :data:`FAULT`."""
    return textwrap.dedent(
        f"""
        import sys
        import {module} as patched
        from msgcap.cli import main

        {"async " if coroutine else ""}def crash(self, *args):
            raise RuntimeError({FAULT!r})

        patched.{target} = crash
        sys.exit(main(sys.argv[1:]))
        """
    )


INJECT = crash_script("msgcap.proxy.replay", "Replayer._settle")


def test_a_crash_fails_the_process_without_a_traceback(tmp_path: Path) -> None:
    """The same through ``python``: the exit status the shell sees, and stderr as the
    user sees it (asyncio's own logging of lost exceptions included)."""
    folder = write_recording(tmp_path / "rec")
    port = free_port()
    cmd = [sys.executable, "-c", INJECT, "replay", str(folder), "--listen", f"127.0.0.1:{port}",
           "--play", "peer", "--timeout", "2", "--transport", "v2"]  # fmt: skip

    async def scenario() -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ}
        )
        await asyncio.wait_for(dial_node(port, "v2"), 40)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    status, out, err = asyncio.run(scenario())
    assert status == 1, out + err
    assert "reproduced" not in out
    assert "Traceback" not in err and "Unhandled exception" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("msgcap: error: ") and FAULT in lines[0], err


# --- hostile live sides are not crashes -------------------------------------------------------


async def _garbage(port: int) -> None:
    _, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(os.urandom(300))
    await w.drain()
    await asyncio.sleep(0.1)
    w.close()


async def _probe(port: int) -> None:
    _, w = await asyncio.open_connection("127.0.0.1", port)
    w.close()


async def _v1_prefix_then_close(port: int) -> None:
    _, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(v1_version_prefix(MAGIC)[:10])
    await w.drain()
    w.close()


async def _v2_key_then_close(port: int) -> None:
    """Closes in the middle of the BIP324 handshake, after its key and some garbage."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    session = V2Session(initiator=True, magic=MAGIC, garbage=b"\x00" * 100)
    w.write(session.data_to_send())
    await w.drain()
    await r.read(64)
    w.close()


async def _v2_bad_terminator(port: int) -> None:
    """A key, then 4095+ bytes without the garbage terminator: a malformed handshake."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    session = V2Session(initiator=True, magic=MAGIC, garbage=b"")
    w.write(session.data_to_send()[:64] + os.urandom(5000))
    await w.drain()
    await r.read()  # the replayer hangs up
    w.close()


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_hostile_clients_do_not_count_and_the_next_is_served(
    tmp_path: Path, transport: str
) -> None:
    folder = write_recording(tmp_path / "rec")
    port = free_port()
    cmd = [sys.executable, "-m", "msgcap", "replay", str(folder), "--listen",
           f"127.0.0.1:{port}", "--play", "peer", "--timeout", "2", "--strict",
           "--transport", transport]  # fmt: skip

    async def scenario() -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 30
        while True:  # wait until it listens
            try:
                await _probe(port)
                break
            except OSError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        for hostile in (_garbage, _probe, _v1_prefix_then_close, _v2_key_then_close,
                        _v2_bad_terminator):  # fmt: skip
            await asyncio.wait_for(hostile(port), 10)
        got = await asyncio.wait_for(dial_node(port, transport), 40)
        assert got.count("block") == 3, got
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    status, out, err = asyncio.run(scenario())
    assert status == 0, out + err
    assert out.count("reproduced") == 1 and f"over {transport}" in out, out
    assert "Traceback" not in err and "exception" not in err.lower(), err


# --- the proxy: a crashed connection handler is not a clean run --------------------------

PROXY_INJECT = crash_script("msgcap.proxy.server", "Proxy._on_route", coroutine=True)


def test_the_proxy_exits_1_after_a_connection_handler_crashed(tmp_path: Path) -> None:
    """``msgcap proxy`` keeps serving when one connection's handler raises, logs it in one
    line, and exits 1 at SIGTERM instead of 0 (a clean run exits 0: tests/test_faults.py)."""
    cmd = [sys.executable, "-c", PROXY_INJECT, "proxy", "--capture-dir", str(tmp_path / "cap"),
           "--route", "127.0.0.1:0=127.0.0.1:1", "--socks5", "off"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        route = next(x for x in lines if "outbound route" in x)
        port = int(route.split("outbound route 127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\x00" * 24)
            time.sleep(0.3)  # the handler has run (and raised)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("msgcap: error: while running:") and FAULT in last, err
