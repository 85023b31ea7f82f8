"""Many nodes, one proxy: named nodes' captures go to their own folders, and no capture
file ever holds two conversations (over real loopback sockets, scripted peers)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from msgcap.capture.conversation import expand_paths, folder_conversation
from msgcap.capture.framing import encode_frame
from tests.conftest import (
    MAGIC,
    Upstream,
    echo,
    logged,
    read_events,
    route_to,
    running_proxy,
    wait_until_async,
)


def version(tag: int) -> bytes:
    return encode_frame(MAGIC, "version", bytes([tag]) * 100)


async def talk(port: int, tag: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(version(tag))
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(124), 10) == version(tag)
    return r, w


def conversations(cap: Path) -> dict[Path, list[bytes]]:
    """Every capture folder under ``cap`` and the version payloads its sent file holds."""
    out: dict[Path, list[bytes]] = {}
    for f in expand_paths([str(cap)]):
        folder = f.path.parent
        if folder in out:
            continue
        out[folder] = [
            i.record.payload
            for i in folder_conversation(folder)
            if i.direction == "sent" and i.record.msgtype.text == "version"
        ]
    return out


async def test_two_live_connections_to_one_peer_never_share_a_file(tmp_path: Path) -> None:
    async with (
        Upstream(echo) as up,
        running_proxy(tmp_path, route=route_to(up.port)) as px,
    ):
        port = px.addresses[0][1]
        _, w1 = await talk(port, 1)
        _, w2 = await talk(port, 2)  # while the first is live: captured apart
        await wait_until_async(logged(tmp_path / "cap", "capture_apart"), 10)
        w1.close()
        w2.close()
        await wait_until_async(logged(tmp_path / "cap", "close", 2), 10)
        _, w3 = await talk(port, 3)  # after both ended: appends to the peer folder, as Core
        w3.close()
        await wait_until_async(logged(tmp_path / "cap", "close", 3), 10)
    convs = conversations(tmp_path / "cap")
    main = tmp_path / "cap" / f"127.0.0.1_{up.port}"
    # The connections that overlapped were captured apart; the sequential ones append,
    # one after the other, as Core appends across reconnections.
    assert [p[:1] for p in convs[main]] == [b"\x01", b"\x03"]
    (apart,) = [f for f in convs if f != main]
    assert apart.parent == main and convs[apart] == [version(2)[24:]]
    (event,) = read_events(tmp_path / "cap", "capture_apart")
    opens = {e["conn"]: e["capture"] for e in read_events(tmp_path / "cap", "open")}
    assert event["capture"] == str(apart) and event["live_capture"] == str(main)
    assert opens[event["conn"]] == str(apart) and opens[event["live_conn"]] == str(main)


async def test_named_nodes_capture_under_their_own_folders(tmp_path: Path) -> None:
    async with (
        Upstream(echo) as up,
        running_proxy(tmp_path, route=[
            {"listen": "127.0.0.1:0", "peer": f"127.0.0.1:{up.port}", "node_name": "n1"},
            {"listen": "127.0.0.1:0", "peer": f"127.0.0.1:{up.port}", "node_name": "n2"},
        ]) as px,
    ):  # fmt: skip
        (_, p1), (_, p2) = px.addresses
        _, w1 = await talk(p1, 1)
        _, w2 = await talk(p2, 2)  # at the same time, but different nodes: no conflict
        w1.close()
        w2.close()
        await wait_until_async(logged(tmp_path / "cap", "close", 2), 10)
    peer = f"127.0.0.1_{up.port}"
    convs = conversations(tmp_path / "cap")
    assert convs == {
        tmp_path / "cap" / "n1" / peer: [version(1)[24:]],
        tmp_path / "cap" / "n2" / peer: [version(2)[24:]],
    }
    assert not read_events(tmp_path / "cap", "capture_apart")
    opens = read_events(tmp_path / "cap", "open")
    assert sorted(e["node_name"] for e in opens) == ["n1", "n2"]
    files = expand_paths([str(tmp_path / "cap")])
    assert sorted({(f.node, f.peer) for f in files}) == [("n1", peer), ("n2", peer)]
