"""Hostile conditions around the capture tree, class by class (issue "Hostile conditions").

1. Links planted in the capture tree: every path under ``capture_dir`` (peer, node and
   session folders, ``msgs_{recv,sent}.dat``, ``events.jsonl``) is opened without
   following links, from ``capture_dir`` down through directory descriptors; a link is
   refused with a ``capture_error`` naming it, and nothing is written through it, even
   when it is planted between the check and the use.
2. A full disk (or any write error) in the middle of a batch: the file is cut back to
   where the batch began, so it ends on a whole record and later appends stay readable;
   the reader names the offset of a torn record. The native helper and its Python twin.
11. Long destination names: distinct destinations never share a capture folder, however
   long their names; a name that fits keeps exactly Core's folder name.
9. Start-up errors: ``msgcap proxy`` names the step, the file or address, and the cause
   of a failed start, with exit status 1 (a malformed config is exit status 2 before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from msgcap.capture import batch
from msgcap.capture.framing import FrameDecoder, UncheckedFrame, encode_frame
from msgcap.capture.layout import RECV_FILE, SENT_FILE, peer_folder_name
from msgcap.capture.records import (
    RECORD_HEADER_SIZE,
    Damage,
    Direction,
    Record,
    encode_record,
    read_records,
    record_header,
)
from msgcap.proxy import server
from msgcap.proxy.config import config_from_dict
from msgcap.proxy.events import EventLog
from msgcap.proxy.server import Proxy, StartupError
from msgcap.proxy.store import CaptureStore
from tests.bitcoind import MSGCAP
from tests.conftest import (
    MAGIC,
    PING,
    VERSION,
    echo_server,
    logged,
    read_events,
    running_proxy,
    wait_until_async,
)

PEER = "127.0.0.1_8333"
WAYS = ["native", "python"]


def use(monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    impl = batch.native_write_checked if way == "native" else batch.python_write_checked
    if impl is None:
        if os.environ.get("MSGCAP_REQUIRE_NATIVE_CAPTURE"):
            pytest.fail("capture/_capture.c was not compiled")
        pytest.skip("capture/_capture.c not compiled")
    monkeypatch.setattr(batch, "write_checked", impl)


def make_store(cap: Path, policy: str = "continue", **more: Any) -> CaptureStore:
    config = config_from_dict({
        "network": "regtest", "capture_dir": str(cap), "socks5": {"listen": "127.0.0.1:0"},
        "on_capture_error": policy, **more,
    })  # fmt: skip
    return CaptureStore(config, EventLog(config.event_log_path))


def frames(*payloads: bytes, msgtype: str = "tx") -> list[UncheckedFrame]:
    dec = FrameDecoder(MAGIC)
    dec.receive_data(b"".join(encode_frame(MAGIC, msgtype, p) for p in payloads))
    got, error = dec.take_unchecked()
    assert error is None and len(got) == len(payloads)
    return got


def records_of(path: Path) -> list[Record | Damage]:
    with open(path, "rb") as f:
        return list(read_records(f))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (links as their target's text) and each file's bytes."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = b"-> " + os.fsencode(os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = None
    return out


# --- 1. links in the capture tree -----------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the capture directory, with a file that must stay untouched."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "precious").write_bytes(b"not a capture\n")
    return out


PLANTS: dict[str, tuple[str, str, str | None]] = {
    # case: (path under capture_dir to make a link, what it points to, node_name)
    "msgs_sent.dat to a file": (f"{PEER}/{SENT_FILE}", "precious", None),
    "msgs_recv.dat to a file": (f"{PEER}/{RECV_FILE}", "precious", None),
    "msgs_sent.dat dangling": (f"{PEER}/{SENT_FILE}", "created-through-link", None),
    "peer folder": (PEER, ".", None),
    "node folder": ("n1", ".", "n1"),
    "peer folder under a node": (f"n1/{PEER}", ".", "n1"),
    "msgs_recv.dat under a node": (f"n1/{PEER}/{RECV_FILE}", "precious", "n1"),
}


def plant(cap: Path, where: str, target: Path) -> None:
    link = cap / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


@pytest.mark.parametrize("layout", ["core", "session"])
@pytest.mark.parametrize("case", list(PLANTS))
def test_planted_link_is_refused(tmp_path: Path, outside: Path, case: str, layout: str) -> None:
    where, target, node_name = PLANTS[case]
    cap = tmp_path / "cap"
    plant(cap, where, outside / target)
    before = snapshot(outside)
    store = make_store(cap, layout=layout)
    capture = store.open(PEER, 1, node_name=node_name)
    capture.capture(Direction.SENT, 1, frames(b"x" * 100))
    capture.capture(Direction.RECV, 2, frames(b"y" * 100))
    capture.close()
    assert snapshot(outside) == before, "bytes were written through a link"
    if layout == "session" and where.endswith(".dat"):  # the files are in a new folder below
        assert capture.bytes == 2 * (RECORD_HEADER_SIZE + 100)
        return
    errors = read_events(cap, "capture_error")
    assert errors, "the link was not reported"
    assert "symbolic link" in errors[0]["error"] and where.split("/")[-1] in errors[0]["error"]
    assert capture.bytes == 0 and not capture.active


@pytest.mark.parametrize("policy", ["continue", "stop"])
async def test_planted_link_through_the_proxy(tmp_path: Path, outside: Path, policy: str) -> None:
    """A link planted as a peer's msgs_sent.dat: refused with a capture_error, and the
    policy holds (continue: forwarding goes on without capture; stop: closed)."""

    srv = await echo_server()
    port = srv.sockets[0].getsockname()[1]
    cap = tmp_path / "cap"
    plant(cap, f"127.0.0.1_{port}/{SENT_FILE}", outside / "precious")
    before = snapshot(outside)
    try:
        route = [{"listen": "127.0.0.1:0", "peer": f"127.0.0.1:{port}"}]
        async with running_proxy(tmp_path, route=route, on_capture_error=policy) as proxy:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.addresses[0][1])
            w.write(VERSION + PING)
            got = b""
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                got = await asyncio.wait_for(r.readexactly(len(VERSION + PING)), 3)
            w.close()
            await wait_until_async(logged(cap, "capture_error"), 10, "capture_error")
    finally:
        srv.close()
    assert snapshot(outside) == before
    (error,) = read_events(cap, "capture_error")
    assert "symbolic link" in error["error"] and error["policy"] == policy
    assert got == (VERSION + PING if policy == "continue" else b"")


def test_capture_dir_itself_may_be_a_link(tmp_path: Path) -> None:
    """The user chose capture_dir: reaching it through a link is fine."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "cap").symlink_to(real)
    store = make_store(tmp_path / "cap")
    capture = store.open(PEER, 1, node_name="n1")
    assert capture.capture(Direction.SENT, 1, frames(b"abc"))[1] == 1
    capture.close()
    assert records_of(real / "n1" / PEER / SENT_FILE)[0] == Record(
        1, b"tx".ljust(12, b"\0"), b"abc", 0
    )
    assert read_events(real, "capture_error") == []


@pytest.mark.parametrize("what", ["peer folder", "node folder", "msgs_sent.dat"])
def test_link_planted_after_the_check_is_not_followed(
    tmp_path: Path, outside: Path, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Race: the link appears between creating (or checking) a path and opening it."""
    cap = tmp_path / "cap"
    real_mkdir, real_open = os.mkdir, os.open
    name = {"peer folder": PEER, "node folder": "n1", "msgs_sent.dat": SENT_FILE}[what]

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(path, mode, dir_fd=dir_fd)
        if os.path.basename(os.fsdecode(path)) == name:  # swap it for a link at once
            os.rmdir(path, dir_fd=dir_fd)
            os.symlink(outside, path, dir_fd=dir_fd)

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if os.path.basename(os.fsdecode(path)) == name:  # planted just before the open
            with contextlib.suppress(FileExistsError):
                os.symlink(outside / "precious", path, dir_fd=dir_fd)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    before = snapshot(outside)
    store = make_store(cap)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    capture = store.open(PEER, 1, node_name="n1")
    capture.capture(Direction.SENT, 1, frames(b"x" * 10))
    capture.close()
    monkeypatch.undo()
    assert snapshot(outside) == before
    (error,) = read_events(cap, "capture_error")
    assert "symbolic link" in error["error"]


def test_event_log_link_is_refused(tmp_path: Path, outside: Path) -> None:
    cap = tmp_path / "cap"
    plant(cap, "events.jsonl", outside / "precious")
    before = snapshot(outside)
    config = config_from_dict({"network": "regtest", "capture_dir": str(cap),
                               "socks5": {"listen": "127.0.0.1:0"}})  # fmt: skip
    with pytest.raises(StartupError) as e:
        Proxy(config)
    assert "cannot open event log" in str(e.value) and "symbolic link" in str(e.value)
    assert snapshot(outside) == before


def test_event_log_outside_the_capture_dir_follows_the_users_link(tmp_path: Path) -> None:
    """An event log the user put elsewhere is opened as given (their choice)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "events.jsonl").symlink_to(tmp_path / "logs" / "real.jsonl")
    log = EventLog(tmp_path / "events.jsonl")
    log.close()
    assert (tmp_path / "logs" / "real.jsonl").exists()


def test_probe_of_the_capture_dir_follows_no_link(tmp_path: Path, outside: Path) -> None:
    """The start-up probe of capture_dir never opens a planted name (its name was
    guessable: the pid)."""
    cap = tmp_path / "cap"
    cap.mkdir()
    (cap / f".msgcap-probe-{os.getpid()}").symlink_to(outside / "precious")
    before = snapshot(outside)
    store = make_store(cap)
    assert store.writable
    assert snapshot(outside) == before


def test_fifo_planted_as_a_capture_file_neither_blocks_nor_takes_bytes(tmp_path: Path) -> None:
    cap = tmp_path / "cap"
    (cap / PEER).mkdir(parents=True)
    os.mkfifo(cap / PEER / SENT_FILE)
    store = make_store(cap)
    capture = store.open(PEER, 1)  # an open of a FIFO for writing would block: it must not
    capture.close()
    (error,) = read_events(cap, "capture_error")
    assert "not a regular file" in error["error"] and SENT_FILE in error["error"]


# --- 2. a full disk in the middle of a record -----------------------------------------


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail (EFBIG) for this process, as a full disk would
    (a write that crosses it is cut short first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def whole(path: Path) -> list[Record]:
    """The records of a file that must end on a record boundary."""
    got = records_of(path)
    assert all(isinstance(r, Record) for r in got), [r for r in got if isinstance(r, Damage)]
    return [r for r in got if isinstance(r, Record)]


PAYLOADS = [b"a" * 40, b"", b"b" * 300, b"c" * 7]


@pytest.mark.parametrize("way", [*WAYS, "write_all"])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(cut=st.integers(0, sum(RECORD_HEADER_SIZE + len(p) for p in PAYLOADS) - 1))
def test_failed_write_leaves_the_file_at_its_last_whole_record(
    tmp_path: Path, way: str, cut: int
) -> None:
    """The write fails ``cut`` bytes into a batch of records: the file is back where the
    batch began, and the next append is readable."""
    impl = batch.native_write_checked if way == "native" else batch.python_write_checked
    if impl is None:
        pytest.skip("capture/_capture.c not compiled")
    path = tmp_path / f"cut-{way}-{cut}.dat"
    first = encode_record(1, "verack", b"")
    path.write_bytes(first)
    items: list[batch.BatchItem] = [
        (record_header(10 + i, "tx", len(p)), (p,), encode_frame(MAGIC, "tx", p)[20:24])
        for i, p in enumerate(PAYLOADS)
    ]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(OSError) as e, file_size_limit(len(first) + cut):
            if way == "write_all":
                batch.write_all(fd, [part for h, (p,), _ in items for part in (h, p)])
            else:
                impl(fd, items)
        assert e.value.errno == errno.EFBIG
        assert path.read_bytes() == first, "a torn batch was left in the file"
        batch.write_all(fd, [encode_record(99, "ping", b"12345678")])
    finally:
        os.close(fd)
    assert [r.time for r in whole(path)] == [1, 99]


@pytest.mark.parametrize("fails", ["writev", "the write that completes it"])
def test_write_error_after_bytes_reached_the_file(
    tmp_path: Path, fails: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure injected after some bytes reached the file (however the write reports
    it): the file is still cut back to where the batch began."""
    path = tmp_path / "msgs_sent.dat"
    first = encode_record(1, "verack", b"")
    path.write_bytes(first)
    real_writev, real_write = os.writev, os.write

    def writev(fd: int, parts: Any) -> int:
        if fails == "writev":
            real_write(fd, bytes(parts[0])[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, bytes(parts[0])[:10])  # a short write

    def write(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        monkeypatch.setattr(os, "writev", writev)
        monkeypatch.setattr(os, "write", write)
        with pytest.raises(OSError, match="No space left"):
            batch.write_all(fd, [encode_record(2, "ping", b"12345678"), b"x" * 50])
        monkeypatch.undo()
        assert path.read_bytes() == first
        assert real_writev is os.writev
        batch.write_all(fd, [encode_record(3, "pong", b"12345678")])
    finally:
        os.close(fd)
    assert [r.time for r in whole(path)] == [1, 3]


def test_event_log_line_is_never_torn(tmp_path: Path) -> None:
    from msgcap.proxy.events import CaptureError

    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log.emit(CaptureError(error="first", policy="continue"))
    size = path.stat().st_size
    with file_size_limit(size + 10):
        log.emit(CaptureError(error="second, which does not fit", policy="continue"))
    log.emit(CaptureError(error="third", policy="continue"))
    log.close()
    assert [e["error"] for e in read_events(path)] == ["first", "third"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB file system (tmpfs; needs root), unmounted afterwards."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up, then free ``leave`` bytes (whole pages): the filler file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


@pytest.mark.parametrize("way", WAYS)
def test_disk_full_mid_record_on_a_real_file_system(
    small_disk: Path, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    use(monkeypatch, way)
    cap = small_disk / "cap"
    config = config_from_dict({"network": "regtest", "capture_dir": str(cap),
                               "event_log": str(small_disk.parent / "events.jsonl"),
                               "socks5": {"listen": "127.0.0.1:0"}})  # fmt: skip
    store = CaptureStore(config, EventLog(config.event_log_path))
    capture = store.open(PEER, 1)
    filler = fill(small_disk, 8192)
    payload = b"p" * 1100  # 1,124-byte records: one of them straddles the end of the disk
    batches = 0
    while capture.active:
        capture.capture(Direction.SENT, 3 * batches, frames(payload, payload, payload))
        batches += 1
        assert batches < 100
    capture.close()
    sent = cap / PEER / SENT_FILE
    kept = whole(sent)
    assert len(kept) == 3 * (batches - 1) and sent.stat().st_size == len(kept) * 1124
    (error,) = read_events(small_disk.parent / "events.jsonl", "capture_error")
    assert "No space left on device" in error["error"]
    filler.unlink()  # space again: a later connection appends to the same file
    again = store.open(PEER, 2)
    assert again.capture(Direction.SENT, 1000, frames(b"after"))[1] == 1
    again.close()
    assert [r.payload for r in whole(sent)] == [payload] * len(kept) + [b"after"]


def test_reader_names_the_offset_of_a_torn_record(tmp_path: Path) -> None:
    """What a torn record looks like to the reader and to ``msgcap parse``."""
    path = tmp_path / "msgs_recv.dat"
    good = encode_record(1, "ping", b"12345678") + encode_record(2, "verack", b"")
    path.write_bytes(good + encode_record(3, "tx", b"z" * 100)[:70])
    *records, damage = records_of(path)
    assert len(records) == 2 and isinstance(damage, Damage)
    assert damage.offset == len(good) and "truncated record" in damage.reason
    res = subprocess.run([str(MSGCAP), "parse", str(path)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert f"offset {len(good)}" in res.stderr


# --- 11. long SOCKS5 names --------------------------------------------------------------


def core_name(host: str, port: int) -> str:
    """Core's folder name for a name that needs no escaping."""
    return f"{host}_{port}"


LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)


@st.composite
def long_dns_names(draw: st.DrawFn) -> str:
    """Names of 190 to 253 bytes (the SOCKS5 limit for a DNS name), random at the end."""
    name = ".".join(draw(st.lists(LABEL, min_size=1, max_size=4)))
    target = draw(st.integers(190, 253))
    while len(name) < target:
        name = "a" * 63 + "." + name
    return name[-target:].lstrip(".-")


@settings(max_examples=300, deadline=None)
@given(base=long_dns_names(), a=LABEL, b=LABEL, port=st.integers(0, 65535))
def test_long_names_that_differ_near_the_end_get_distinct_folders(
    base: str, a: str, b: str, port: int
) -> None:
    one, two = base[: 253 - len(a)] + a, base[: 253 - len(b)] + b
    assume(one != two)
    x, y = peer_folder_name(one, port), peer_folder_name(two, port)
    assert x != y
    for host, name in ((one, x), (two, y)):
        assert len(name.encode()) <= 255 and "/" not in name
        if len(core_name(host, port)) <= 255:
            assert name == core_name(host, port)  # Core's name whenever it fits


@settings(max_examples=500, deadline=None)
@given(one=st.text(min_size=200, max_size=400), two=st.text(min_size=200, max_size=400),
       p=st.integers(0, 65535), q=st.integers(0, 65535))  # fmt: skip
def test_distinct_names_never_share_a_folder(one: str, two: str, p: int, q: int) -> None:
    assume((one, p) != (two, q))
    x, y = peer_folder_name(one, p), peer_folder_name(two, q)
    assert x != y
    assert len(x.encode()) <= 255 and len(y.encode()) <= 255


@settings(max_examples=300, deadline=None)
@given(stem=st.text(min_size=1, max_size=300), tail=st.text(min_size=1, max_size=4),
       other=st.text(min_size=1, max_size=4), port=st.integers(0, 65535))  # fmt: skip
def test_names_differing_only_at_the_end(stem: str, tail: str, other: str, port: int) -> None:
    assume(tail != other)
    assert peer_folder_name(stem + tail, port) != peer_folder_name(stem + other, port)


def test_names_that_fit_keep_cores_name() -> None:
    for n in (1, 100, 245, 249):
        host = "a" * n
        assert peer_folder_name(host, 8333) == f"{host}_8333"
    assert len(peer_folder_name("a" * 250, 8333)) == 255


def greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def connect_request(name: bytes, port: int) -> bytes:
    return bytes((5, 1, 0, 3, len(name))) + name + port.to_bytes(2, "big")


async def test_long_socks5_destinations_are_captured_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two SOCKS5 destinations whose 253-byte names differ in the last byte: two
    folders, each with its own conversation."""

    srv = await echo_server()
    echo_port = srv.sockets[0].getsockname()[1]
    real_connect = server.connect_any

    async def resolve_to_echo(host: str, port: int, timeout: float) -> Any:
        return await real_connect("127.0.0.1", echo_port, timeout)

    monkeypatch.setattr(server, "connect_any", resolve_to_echo)
    stem = ".".join(["a" * 63] * 3) + "." + "b" * 60  # 252 bytes
    names = [stem + "x", stem + "y"]
    cap = tmp_path / "cap"
    try:
        async with running_proxy(tmp_path, socks5={"listen": "127.0.0.1:0"}) as proxy:
            for i, name in enumerate(names, 1):
                r, w = await asyncio.open_connection("127.0.0.1", proxy.addresses[0][1])
                w.write(greeting(0) + connect_request(name.encode(), 8333))
                frame = encode_frame(MAGIC, "version", name.encode())
                reply = await asyncio.wait_for(r.readexactly(12), 5)
                assert reply == b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)  # succeeded
                w.write(frame)
                assert await asyncio.wait_for(r.readexactly(len(frame)), 5) == frame
                w.close()
                await wait_until_async(logged(cap, "close", i), 10, "close")
    finally:
        srv.close()
    opens = read_events(cap, "open")
    folders = {e["capture"] for e in opens}
    assert len(folders) == 2, folders
    for event, name in zip(opens, names, strict=True):
        (record,) = whole(Path(event["capture"]) / SENT_FILE)
        assert record.payload == name.encode()
        assert len(Path(event["capture"]).name) <= 255


# --- 9. start-up errors name their cause ----------------------------------------------


def run_proxy(*flags: str, cwd: Path, as_unprivileged: bool = False) -> tuple[int, str]:
    cmd = [str(MSGCAP), "proxy", "--network", "regtest", *flags]
    if as_unprivileged and os.geteuid() == 0:
        # root ignores file modes: drop the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root's file-permission override")
        cmd = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd,
                             check=False, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"msgcap proxy started instead of failing: {e.stdout!r} {e.stderr!r}")
    return res.returncode, res.stderr


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    assert "Traceback" not in stderr, stderr
    return lines[-1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def route_flags(tmp: Path) -> list[str]:
    return ["--capture-dir", str(tmp / "cap"), "--route", "127.0.0.1:0=127.0.0.1:1",
            "--socks5", "off"]  # fmt: skip


def test_unwritable_event_log_is_named(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    log.write_text("")
    log.chmod(0o444)
    status, err = run_proxy(*route_flags(tmp_path), "--event-log", str(log), cwd=tmp_path,
                            as_unprivileged=True)  # fmt: skip
    assert status == 1
    assert last_line(err) == f"msgcap: error: cannot open event log {log}: Permission denied"


@pytest.mark.parametrize("case", ["a folder", "under a file", "a link in capture_dir"])
def test_event_log_errors_name_file_and_cause(tmp_path: Path, case: str) -> None:
    cap = tmp_path / "cap"
    cap.mkdir()
    if case == "a folder":
        log = tmp_path / "events.jsonl"
        log.mkdir()
        cause = "Is a directory"
    elif case == "under a file":
        (tmp_path / "file").write_text("")
        log = tmp_path / "file" / "events.jsonl"
        cause = "Not a directory"
    else:
        log = cap / "events.jsonl"
        log.symlink_to(tmp_path / "elsewhere.jsonl")
        cause = "symbolic link"
    status, err = run_proxy(*route_flags(tmp_path), "--event-log", str(log), cwd=tmp_path)
    line = last_line(err)
    assert status == 1
    assert line.startswith(f"msgcap: error: cannot open event log {log}: ") and cause in line
    assert not (tmp_path / "elsewhere.jsonl").exists()


def test_capture_dir_error_names_the_cause(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cap = tmp_path / "file" / "cap"
    status, err = run_proxy("--capture-dir", str(cap), "--event-log",
                            str(tmp_path / "events.jsonl"), "--route",
                            "127.0.0.1:0=127.0.0.1:1", "--socks5", "off",
                            "--on-capture-error", "stop", cwd=tmp_path)  # fmt: skip
    line = last_line(err)
    assert status == 1
    assert line.startswith(f"msgcap: error: capture directory {cap} is not writable")
    assert "Not a directory" in line


def test_capture_dir_error_with_the_default_event_log(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cap = tmp_path / "file" / "cap"
    status, err = run_proxy("--capture-dir", str(cap), "--route", "127.0.0.1:0=127.0.0.1:1",
                            "--socks5", "off", cwd=tmp_path)  # fmt: skip
    line = last_line(err)
    assert status == 1
    assert line.startswith(f"msgcap: error: cannot open event log {cap / 'events.jsonl'}: ")
    assert "Not a directory" in line


@pytest.mark.parametrize("which", ["outbound route", "inbound route", "socks5"])
def test_busy_listen_address_is_named(tmp_path: Path, busy_port: int, which: str) -> None:
    at = f"127.0.0.1:{busy_port}"
    flags = {
        "outbound route": ["--route", f"{at}=127.0.0.1:1", "--socks5", "off"],
        "inbound route": ["--inbound", f"{at}=127.0.0.1:1", "--socks5", "off"],
        "socks5": ["--route", "127.0.0.1:0=127.0.0.1:1", "--socks5", at],  # not the default's
    }[which]
    status, err = run_proxy("--capture-dir", str(tmp_path / "cap"), *flags, cwd=tmp_path)
    assert status == 1
    kind = which.split()[0]
    assert last_line(err) == (
        f"msgcap: error: cannot listen on {at} ({kind}): Address already in use"
    )


def test_busy_metrics_port_is_named(tmp_path: Path, busy_port: int) -> None:
    at = f"127.0.0.1:{busy_port}"
    status, err = run_proxy(*route_flags(tmp_path), "--metrics", at, cwd=tmp_path)
    assert status == 1
    assert last_line(err) == f"msgcap: error: cannot serve metrics on {at}: Address already in use"


def test_listen_address_not_on_this_machine_is_named(tmp_path: Path) -> None:
    """Status 1, as for ``msgcap replay --listen`` there: the config is well formed, the
    machine cannot do it."""
    at = "192.0.2.1:18555"  # TEST-NET-1: never a local address
    status, err = run_proxy("--capture-dir", str(tmp_path / "cap"), "--route",
                            f"{at}=127.0.0.1:1", "--socks5", "off", cwd=tmp_path)  # fmt: skip
    assert status == 1
    assert last_line(err) == (
        f"msgcap: error: cannot listen on {at} (outbound): Cannot assign requested address"
    )
