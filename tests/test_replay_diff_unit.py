"""Differential replay's comparison (:func:`msgcap.proxy.diff.compare`) on made-up node
transcripts: what is normalised, and nothing else."""

from __future__ import annotations

from msgcap.parser import messages as m
from msgcap.parser.structures import MSG_WITNESS_FLAG, AddressV1, Inventory, InvType
from msgcap.proxy.diff import compare
from msgcap.proxy.replay_conversation import Divergence, Kind, Report

LOCAL = b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])


def version(**changes: object) -> tuple[str, bytes, bool]:
    fields: dict[str, object] = {
        "version": 70016, "services": 0xC09, "timestamp": 1_700_000_000,
        "addr_recv": AddressV1(None, 0, LOCAL, 40000),
        "addr_from": AddressV1(None, 0xC09, LOCAL, 0),
        "nonce": 1, "user_agent": "/Satoshi:30.0.0/", "start_height": 0, "relay": 1,
    }  # fmt: skip
    fields.update(changes)
    return ("version", m.Version(**fields).encode(), False)  # type: ignore[arg-type]


def getdata(*hashes: bytes) -> tuple[str, bytes, bool]:
    items = tuple(Inventory(InvType.MSG_BLOCK | MSG_WITNESS_FLAG, h) for h in hashes)
    return ("getdata", m.GetData(items).encode(), True)


def node(*live: tuple[str, bytes, bool], port: int = 40000) -> Report:
    report = Report("peer", live=list(live), local=("127.0.0.1", port),
                    remote=("127.0.0.1", 18444))  # fmt: skip
    report.reached = True
    report.last_request = "getdata: block"
    return report


H = [bytes([i]) * 32 for i in range(4)]


def test_what_differs_between_runs_is_normalised() -> None:
    a = node(
        version(nonce=1, timestamp=1, addr_recv=AddressV1(None, 0, LOCAL, 40000)),
        ("verack", b"", False),
        ("sendheaders", b"", True),
        ("feefilter", m.FeeFilter(1000).encode(), True),
        ("ping", m.Ping(5).encode(), True),
        getdata(H[0], H[1]),
        getdata(H[2]),
        ("addr", m.Addr((AddressV1(123, 1, LOCAL, 40000),)).encode(), True),
    )
    b = node(
        version(nonce=2, timestamp=9, addr_recv=AddressV1(None, 0, LOCAL, 50000)),
        ("verack", b"", False),
        getdata(H[0]),
        ("feefilter", m.FeeFilter(1090).encode(), True),  # one rounding step away
        ("sendheaders", b"", True),
        getdata(H[1], H[2], H[2]),
        ("addr", m.Addr((AddressV1(456, 1, LOCAL, 50000),)).encode(), True),
        port=50000,
    )
    result = compare(["a", "b"], [a, b])
    assert result.substantive == [], result.summary()
    assert {d.kind for d in result.benign} == {"count", "reordered"}


def test_what_a_node_did_differently_is_named() -> None:
    a = node(version(), ("verack", b"", False), ("feefilter", m.FeeFilter(1000).encode(), True),
             getdata(H[0], H[1]), ("sendheaders", b"", True))  # fmt: skip
    b = node(version(relay=0, services=0xC0D), ("verack", b"", False),
             ("feefilter", m.FeeFilter(5000).encode(), True), getdata(H[0], H[3]))  # fmt: skip
    b.substantive.append(Divergence(Kind.DISCONNECTED, "", 1, ("the live side closed",)))
    b.reached = False
    result = compare(["a", "b"], [a, b])
    names = result.names()
    assert names == ["disconnected", "reached", "version.services", "version.relay",
                     "feefilter.feerate", "request getdata", "message sendheaders",
                     "request getdata"], result.summary()  # fmt: skip
    by_items = {d.items: d.values for d in result.substantive if d.msgtype == "getdata"}
    assert by_items[(f"block {H[1][::-1].hex()}",)] == {"a": "sent", "b": "not sent"}
    assert by_items[(f"block {H[3][::-1].hex()}",)] == {"a": "not sent", "b": "sent"}
    assert result.diverged and "DIFFERENT" in result.summary()
