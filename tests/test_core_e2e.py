"""Real Bitcoin Core through the real ``msgcap proxy`` process, over loopback.

Node B listens; node A reaches B only through the proxy (outbound route, inbound route
with B dialing A, SOCKS5). Both nodes run ``-capturemessages``. They mine past coinbase
maturity, send wallet transactions both ways and mine again until both have the same tip
and empty mempools; then the proxy is stopped (SIGTERM, exit 0) and the nodes too. Checked:

- ``getpeerinfo`` on each node shows exactly the one connection through the proxy, with
  the transport the v2 policy implies;
- ``msgcap compare`` finds Core's own capture of the proxy's node equal to the proxy's
  capture, and (``--mirror``) Core's capture of the other node too, message by message in
  both directions;
- the proxy's event log shows the v2 attempts it closed, one ``open`` and one ``close``
  whose counts match the capture files, and nothing else.

The one edge of Core's own capture that the comparison must know about (DESIGN.md §4):
under ``downgrade`` the dialing node queues a ``version`` for its v2 attempt, and Core
captures a sent message when it queues it; whether that happens before Core notices the
close is a race (seen both ways). Such stale ``version`` records lead the dialer's
``msgs_sent.dat``; the test counts them, checks that there are no more than the proxy's
``v2_downgrade`` events and that they all predate the v1 session, checks that plain
``msgcap compare`` reports exactly that difference and nothing else, and compares a copy
of the folder without them, which must agree exactly.

The v2 policy is a parameter (:data:`POLICIES`): a new policy adds one entry saying what
``getpeerinfo`` reports and whether v2 attempts are closed, plus its own checks in
:func:`check_policy`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.bitcoind import (
    CAPTURE,
    FAST_RELAY,
    MATURITY,
    BitcoinNode,
    Laps,
    NodeFactory,
    ProxyProcess,
    capture_folder_name,
    compare_captures,
    free_port,
    handshaken,
    msgcap,
    only_peer,
    read_capture,
    wait_mempools,
    wait_quiet,
    wait_synced,
    wait_until,
)

pytestmark = pytest.mark.e2e

HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Policy:
    """A ``v2`` policy and what it implies for two v2-capable Core nodes."""

    name: str
    transport: str
    """``transport_protocol_type`` both nodes report for the proxied connection."""
    closes_v2: bool
    """The proxy closes v2 attempts (the dialer then retries with v1)."""


POLICIES = [
    Policy("decrypt", transport="v2", closes_v2=False),
    Policy("downgrade", transport="v1", closes_v2=True),
]


def event_time_us(event: dict[str, Any]) -> int:
    t = dt.datetime.fromisoformat(str(event["ts"]))
    return int(t.timestamp() * 1_000_000)


# --- one session through the proxy ------------------------------------------------------


@dataclass
class Session:
    route: str
    """The proxy's name for the route, as in its event log."""
    policy: Policy
    a: BitcoinNode
    """The proxy's node: its capture is compared with the proxy's as is."""
    b: BitcoinNode
    """A's peer: its capture is compared with the proxy's with ``--mirror``."""
    dialer: BitcoinNode
    proxy: ProxyProcess
    listen: str
    proxy_folder: str
    a_folder: str | None = None
    """Core's folder for the connection in A's capture (None: from ``getpeerinfo``)."""
    dialer_addrbind: str = ""
    """The dialer's own socket: the proxy's ``client``."""
    report: dict[str, Any] = field(default_factory=dict)


def wait_connected(*group: BitcoinNode, timeout: float = 30) -> None:
    """Until each node has exactly one peer whose version handshake is done."""
    wait_until(handshaken(*group), timeout, f"one handshaken peer on each of {group}", poll=0.1)


def run_scenario(a: BitcoinNode, b: BitcoinNode, laps: Laps) -> None:
    """Mine past maturity on A, pay B, mine on B, pay A back, mine on A; both synced.
    Each step is a lap of ``laps``."""
    wait_connected(a, b)
    laps.lap("connect")
    a.create_wallet()
    b.create_wallet()
    a.mine(MATURITY)
    wait_synced([a, b])
    laps.lap("mine")
    to_b = [a.send(b.new_address(), 1.25) for _ in range(3)]
    wait_mempools([a, b], to_b)
    laps.lap("relay_a_to_b")
    b.mine(1)  # confirms A's payments: B can spend them
    wait_synced([a, b])
    to_a = [b.send(a.new_address(), 0.5) for _ in range(2)]
    wait_mempools([a, b], to_a)
    laps.lap("relay_b_to_a")
    a.mine(1)
    wait_synced([a, b])
    laps.lap("final_block")
    assert a.height() == b.height() == MATURITY + 2


def outbound_session(
    nodes: NodeFactory, start_proxy: Callable[..., ProxyProcess], policy: Policy
) -> Session:
    b = nodes("b", CAPTURE, FAST_RELAY)
    listen = f"127.0.0.1:{free_port()}"
    proxy = start_proxy("--route", f"{listen}={b.address}", "--socks5", "off", "--v2", policy.name)
    a = nodes("a", CAPTURE, FAST_RELAY, f"-connect={listen}")
    # A dialed the proxy's listener: Core names its folder after that address.
    return Session("outbound", policy, a, b, a, proxy, listen, capture_folder_name(b.address),
                   a_folder=capture_folder_name(listen))  # fmt: skip


def inbound_session(
    nodes: NodeFactory, start_proxy: Callable[..., ProxyProcess], policy: Policy
) -> Session:
    a = nodes("a", CAPTURE, FAST_RELAY)
    listen = f"127.0.0.1:{free_port()}"
    proxy = start_proxy("--inbound", f"{listen}={a.address}", "--socks5", "off",
                        "--v2", policy.name)  # fmt: skip
    b = nodes("b", CAPTURE, FAST_RELAY, f"-connect={listen}")
    # The proxy names its folder after the connecting peer: B's socket, B's `addrbind`.
    return Session("inbound", policy, a, b, b, proxy, listen, proxy_folder="")


def socks5_session(
    nodes: NodeFactory, start_proxy: Callable[..., ProxyProcess], policy: Policy
) -> Session:
    b = nodes("b", CAPTURE, FAST_RELAY)
    listen = f"127.0.0.1:{free_port()}"
    # A config file with no forward route at all (the flags cannot remove the default one).
    config = f'network = "regtest"\nv2 = "{policy.name}"\n\n[socks5]\nlisten = "{listen}"\n'
    proxy = start_proxy(config=config)
    # Core dials loopback addresses directly even with -proxy: name the peer. (A connection
    # made by name has no address, so FAST_RELAY's whitelist matches only on B's side.)
    a = nodes("a", CAPTURE, FAST_RELAY, f"-proxy={listen}", f"-connect=localhost:{b.port}")
    # Core's CNode for a connection made by name through a proxy has no address (`[::]:0`).
    return Session("socks5", policy, a, b, a, proxy, listen, f"localhost_{b.port}",
                   a_folder="[__]_0")  # fmt: skip


SESSIONS = {"outbound": outbound_session, "inbound": inbound_session, "socks5": socks5_session}


# --- checks -----------------------------------------------------------------------------


def check_peers(s: Session) -> None:
    """Each node has exactly one peer, the proxied connection, over the expected transport."""
    a_peer, b_peer = only_peer(s.a), only_peer(s.b)
    dialer_peer, dialed_peer = (a_peer, b_peer) if s.dialer is s.a else (b_peer, a_peer)
    assert dialer_peer["connection_type"] == "manual" and not dialer_peer["inbound"]
    assert dialed_peer["connection_type"] == "inbound" and dialed_peer["inbound"]
    # The dialed node sees the proxy's socket, never the dialer's own.
    assert dialed_peer["addr"] != dialer_peer["addrbind"]
    assert dialed_peer["addrbind"] == (s.b.address if s.dialer is s.a else s.a.address)
    if s.route == "socks5":
        assert dialer_peer["addr"] == f"localhost:{s.b.port}", dialer_peer
    else:
        assert dialer_peer["addr"] == s.listen, dialer_peer
    s.dialer_addrbind = dialer_peer["addrbind"]
    if s.route == "inbound":
        s.proxy_folder = capture_folder_name(b_peer["addrbind"])
    for name, peer in (("a", a_peer), ("b", b_peer)):
        s.report[f"{name}_transport"] = peer["transport_protocol_type"]
        s.report[f"{name}_session_id"] = peer["session_id"]
        s.report[f"{name}_peer_addr"] = peer["addr"]
        assert peer["transport_protocol_type"] == s.policy.transport, peer
    if s.policy.transport == "v1":
        assert a_peer["session_id"] == b_peer["session_id"] == ""
    s.report["a_folder_expected"] = s.a_folder or capture_folder_name(a_peer["addr"])
    s.report["b_folder_expected"] = capture_folder_name(b_peer["addr"])


def check_events(s: Session, counts: dict[str, int], sizes: dict[str, int]) -> list[int]:
    """The event log: v2 attempts closed, one open, one close matching the files, a stop.
    Returns the times (µs) of the ``v2_downgrade`` events."""
    events = s.proxy.events()
    kinds = Counter(e["event"] for e in events)
    s.report["events"] = dict(kinds)
    assert set(kinds) <= {"listen", "v2_downgrade", "v2_session", "open", "close", "stop"}, events
    assert events[-1]["event"] == "stop", events[-1]
    opens = [e for e in events if e["event"] == "open"]
    closes = [e for e in events if e["event"] == "close"]
    assert len(opens) == 1 and len(closes) == 1, events
    (opened,), (closed,) = opens, closes
    assert opened["route"] == s.route
    assert opened["peer"] == closed["peer"] == s.proxy_folder
    assert opened["node"] == ("client" if s.dialer is s.a else "upstream")
    assert opened["client"] == s.dialer_addrbind
    assert closed["conn"] == opened["conn"]
    for direction in ("recv", "sent"):
        stats = closed[direction]
        assert stats["messages"] == stats["captured"] == counts[direction], (direction, stats)
        assert stats["invalid"] == 0, (direction, stats)
        if s.policy.transport == "v1":  # v2 bytes are packets: no simple relation
            assert stats["bytes"] == sizes[direction], (direction, stats)
    downgrades = [e for e in events if e["event"] == "v2_downgrade"]
    if s.policy.closes_v2:
        # Core tries v2 first on a manual connection; every attempt is closed and logged
        # before the v1 session opens.
        assert downgrades, "no v2 attempt was closed"
        assert all(events.index(d) < events.index(opened) for d in downgrades)
        assert all(d["note"] == "closed before sending a byte" for d in downgrades)
    else:
        assert not downgrades, downgrades
    return [event_time_us(d) for d in downgrades]


def stale_versions(folder: Path, downgrade_times: list[int], dialer: bool) -> int:
    """How many stale ``version`` records (queued for closed v2 attempts) lead the sent
    file; checks they are versions, predate the v1 session, and are no more than the
    attempts the proxy closed."""
    sent = read_capture(folder / "msgs_sent.dat")
    recv = read_capture(folder / "msgs_recv.dat")
    leading = next((i for i, r in enumerate(sent) if r.msgtype != "version"), len(sent))
    assert leading >= 1, f"{folder}: sent does not start with version"
    stale = leading - 1
    if not dialer:
        assert stale == 0, f"{folder}: the dialed node has {stale} extra versions"
        return 0
    assert stale <= len(downgrade_times), (stale, downgrade_times)
    if downgrade_times:
        session_start = sent[stale].time_us
        # The v1 session began after the last attempt was closed; the stale ones before it.
        assert session_start > max(downgrade_times), (session_start, downgrade_times)
        assert all(r.time_us < session_start for r in sent[:stale])
        assert all(r.time_us > max(downgrade_times) for r in recv)
    return stale


def without_stale(folder: Path, stale: int, dest: Path) -> Path:
    """A copy of ``folder`` with the first ``stale`` records of msgs_sent.dat left out."""
    dest.mkdir(parents=True)
    shutil.copyfile(folder / "msgs_recv.dat", dest / "msgs_recv.dat")
    sent = read_capture(folder / "msgs_sent.dat")
    (dest / "msgs_sent.dat").write_bytes(b"".join(r.encode() for r in sent[stale:]))
    return dest


def check_core_capture(s: Session, node: BitcoinNode, folder: Path, mirror: bool,
                       downgrade_times: list[int], tmp: Path) -> None:  # fmt: skip
    """Core's own capture of the connection (``folder``) against the proxy's."""
    proxy_folder = s.proxy.capture_dir / s.proxy_folder
    stale = stale_versions(folder, downgrade_times, dialer=node is s.dialer)
    s.report[f"{node.name}_stale_versions"] = stale
    rc, results, text = compare_captures(folder, proxy_folder, mirror)
    if stale:
        # Exactly the stale versions differ, at the start of the sent file: nothing else.
        recv_pair, sent_pair = results
        assert rc == 1 and recv_pair["identical"], text
        assert sent_pair["a_count"] == sent_pair["b_count"] + stale, text
        first = sent_pair["first_difference"]
        assert first["a"]["index"] == first["b"]["index"] == 0, text
        assert first["a"]["msgtype"] == first["b"]["msgtype"] == "version", text
        assert sent_pair["type_counts"] == {"version": {"a": 1 + stale, "b": 1}}, text
        folder = without_stale(folder, stale, tmp / f"{node.name}-{folder.name}-trimmed")
        rc, results, text = compare_captures(folder, proxy_folder, mirror)
    assert rc == 0 and all(r["identical"] for r in results), text
    assert all(r["a_count"] == r["b_count"] > 0 for r in results), text


def parse_counts(folder: Path) -> tuple[dict[str, int], dict[str, int]]:
    """``msgcap parse --jsonl`` of a capture folder: messages and wire bytes per direction."""
    res = msgcap("parse", "--jsonl", str(folder))
    assert res.returncode == 0, res.stderr
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for line in res.stdout.splitlines():
        m = json.loads(line)
        counts[m["direction"]] += 1
        sizes[m["direction"]] += 24 + m["size"]
    return dict(counts), dict(sizes)


def check_policy(s: Session) -> None:
    """Checks specific to one v2 policy (beyond ``Policy.transport``/``closes_v2``)."""
    if s.policy.name == "downgrade":
        # Both legs were v1: nothing but v1 crossed the proxy, so no session ids.
        assert s.report["a_session_id"] == s.report["b_session_id"] == ""
    if s.policy.name == "decrypt":
        # One BIP324 session per leg, each named as the node at its far end prints it.
        sessions = [e for e in s.proxy.events() if e["event"] == "v2_session"]
        assert len(sessions) == 2, sessions
        by_node = {e["node"]: e for e in sessions}
        assert by_node[True]["session_id"] == s.report["a_session_id"], sessions
        assert by_node[False]["session_id"] == s.report["b_session_id"], sessions
        assert s.report["a_session_id"] != s.report["b_session_id"]
        assert len(s.report["a_session_id"]) == 64
        dialer_leg = by_node[s.dialer is s.a]  # the proxy answered the dialer
        assert dialer_leg["leg"] == "client" and dialer_leg["role"] == "responder"


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"v2={p.name}")
@pytest.mark.parametrize("route", list(SESSIONS))
def test_core_through_proxy(
    route: str,
    policy: Policy,
    nodes: NodeFactory,
    start_proxy: Callable[..., ProxyProcess],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    s = SESSIONS[route](nodes, start_proxy, policy)
    laps = Laps()
    run_scenario(s.a, s.b, laps)
    wait_quiet(s.a, s.b)
    laps.lap("quiet")
    s.report["seconds"] = laps.took
    check_peers(s)
    # Stop the proxy first (the connection ends with nothing in flight), then the nodes.
    assert s.proxy.stop() == 0, s.proxy.stderr()
    assert s.a.stop() == 0 and s.b.stop() == 0

    proxy_folder = s.proxy.capture_dir / s.proxy_folder
    assert sorted(p.name for p in s.proxy.capture_dir.iterdir()) == sorted(
        [s.proxy_folder, "events.jsonl"]
    )
    counts, sizes = parse_counts(proxy_folder)
    downgrade_times = check_events(s, counts, sizes)
    check_policy(s)

    # Each node's own capture holds exactly one folder: the proxied connection.
    for node, mirror in ((s.a, False), (s.b, True)):
        expected = s.report[f"{node.name}_folder_expected"]
        folders = sorted(p.name for p in node.capture_dir.iterdir())
        s.report[f"{node.name}_core_folders"] = folders
        assert folders == [expected], (node.name, folders)
        parse_counts(node.capture_dir / expected)  # Core's files parse cleanly
        check_core_capture(s, node, node.capture_dir / expected, mirror, downgrade_times,
                           tmp_path)  # fmt: skip

    for key, value in s.report.items():
        record_property(key, value)
    print(f"\n{route} v2={policy.name}: {json.dumps(s.report, sort_keys=True)}")


def test_direct_v2_reference(nodes: NodeFactory, tmp_path: Path) -> None:
    """Two Core nodes without the proxy: they speak BIP324 (v2), and their own captures
    mirror each other. The reference the proxied sessions are measured against."""
    b = nodes("b", CAPTURE, FAST_RELAY)
    a = nodes("a", CAPTURE, FAST_RELAY, f"-connect={b.address}")
    wait_connected(a, b)
    b.create_wallet()
    b.mine(2)
    wait_synced([a, b])
    wait_quiet(a, b)
    a_peer, b_peer = only_peer(a), only_peer(b)
    assert a_peer["addr"] == b.address and b_peer["addr"] == a_peer["addrbind"]
    for peer in (a_peer, b_peer):
        assert peer["transport_protocol_type"] == "v2", peer
        assert HEX64.fullmatch(peer["session_id"]), peer
    assert a_peer["session_id"] == b_peer["session_id"]
    assert a.stop() == 0 and b.stop() == 0

    a_folders = sorted(p.name for p in a.capture_dir.iterdir())
    b_folders = sorted(p.name for p in b.capture_dir.iterdir())
    assert a_folders == [capture_folder_name(b.address)] and b_folders == [
        capture_folder_name(b_peer["addr"])
    ]
    a_folder, b_folder = a.capture_dir / a_folders[0], b.capture_dir / b_folders[0]
    # No v2 attempt failed: no stale version.
    assert stale_versions(a_folder, [], dialer=True) == 0
    rc, results, text = compare_captures(a_folder, b_folder, mirror=True)
    assert rc == 0 and all(r["identical"] and r["a_count"] > 0 for r in results), text
    print(f"\ndirect: v2 session {a_peer['session_id']}, folders {a_folders} / {b_folders}")
