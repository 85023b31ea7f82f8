"""The message codec: byte vectors, Core's test framework as an oracle, and fuzzing."""

from __future__ import annotations

from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verystable.core import messages as vm

from msgcap.capture.framing import KNOWN_MSGTYPES, hash256
from msgcap.parser import messages as m
from msgcap.parser.messages import MESSAGES, Unknown, Version, decode_message
from msgcap.parser.structures import AddressV2, Inventory, InvType, Net
from msgcap.parser.wire import DecodeError, Reader, display_hash, wire_hash
from tests.oracle import reference_body, with_documented_deviations
from tests.vectors import VECTORS


def test_every_message_type_has_a_vector() -> None:
    assert len(MESSAGES) == 35
    assert set(VECTORS) == set(MESSAGES)


def test_registry_is_the_known_types() -> None:
    """framing's KNOWN_MSGTYPES (the names metrics label by) are the codec's table."""
    assert MESSAGES.keys() == KNOWN_MSGTYPES
    assert all(cls.msgtype == name for name, cls in MESSAGES.items())


def test_inventory_messages_share_one_codec_and_stay_distinct() -> None:
    items = (Inventory(InvType.MSG_TX, b"\x11" * 32),)
    payload = m.Inv(items).encode()
    decoded = [decode_message(t, payload) for t in ("inv", "getdata", "notfound")]
    assert [type(d) for d in decoded] == [m.Inv, m.GetData, m.NotFound]
    assert not isinstance(decoded[0], m.GetData | m.NotFound)
    assert decoded[0] != decoded[1]  # same items, another message
    assert all(d.encode() == payload for d in decoded)
    keys = [list(d.json(display_hash)) for d in decoded if isinstance(d, m.InventoryMessage)]
    assert keys == [["inv"], ["inv"], ["vec"]]


@pytest.mark.parametrize("msgtype", sorted(VECTORS))
def test_vector_round_trips(msgtype: str) -> None:
    payload = bytes.fromhex(VECTORS[msgtype])
    msg = decode_message(msgtype, payload)
    assert type(msg) is MESSAGES[msgtype]
    assert msg.msgtype == msgtype
    assert msg.encode() == payload


@pytest.mark.parametrize("msgtype", sorted(VECTORS))
def test_vector_json_matches_core(msgtype: str) -> None:
    payload = bytes.fromhex(VECTORS[msgtype])
    ours = decode_message(msgtype, payload).json(wire_hash)
    ref = with_documented_deviations(msgtype, payload, reference_body(msgtype, payload))
    if not payload:
        ref = {}  # Core's parser prints no body at all; json() of an empty message is {}
    assert ours == ref


@pytest.mark.parametrize("msgtype", sorted(VECTORS))
def test_truncated_vector_is_a_decode_error(msgtype: str) -> None:
    payload = bytes.fromhex(VECTORS[msgtype])
    if not payload:
        return
    cut = payload[:-1]
    if msgtype == "version":
        cut = payload[:-2]  # without the last byte it is a valid pre-70001 version
    with pytest.raises(DecodeError) as e:
        decode_message(msgtype, cut)
    assert e.value.msgtype == msgtype
    assert "need" in e.value.reason or "count" in e.value.reason


@pytest.mark.parametrize("msgtype", sorted(VECTORS))
def test_trailing_bytes_are_a_decode_error(msgtype: str) -> None:
    payload = bytes.fromhex(VECTORS[msgtype])
    with pytest.raises(DecodeError, match="trailing"):
        decode_message(msgtype, payload + b"\x00")


def test_version_fields() -> None:
    msg = decode_message("version", bytes.fromhex(VECTORS["version"]))
    assert isinstance(msg, Version)
    assert msg.version == 70016
    assert msg.services == 0x409
    assert msg.user_agent == "/Satoshi:30.0.0/"
    assert msg.start_height == -1
    assert msg.relay == 1
    assert msg.addr_recv.host == "127.0.0.1"
    assert msg.addr_recv.port == 18444


def test_version_without_relay_byte() -> None:
    payload = bytes.fromhex(VECTORS["version"])[:-1]
    msg = decode_message("version", payload)
    assert msg.relay is None
    assert msg.encode() == payload
    assert msg.json(wire_hash)["relay"] == 0  # as Core's parser prints it


def test_addrv2_networks() -> None:
    msg = decode_message("addrv2", bytes.fromhex(VECTORS["addrv2"]))
    hosts = [(a.net, a.host) for a in msg.addrs]
    assert hosts == [
        (Net.IPV4, "1.2.3.4"),
        (Net.IPV6, "2001:db8::1"),
        (Net.TORV3, "pg6mmjiyjmcrsslvykfwnntlaru7p5svn6y2ymmju6nubxndf4pscryd.onion"),
        (Net.I2P, "ukeu3k5oycgaauneqgtnvselmt4yemvoilkln7jpvamvfx7dnkdq.b32.i2p"),
        (Net.CJDNS, "fc00:1:2:3:4:5:6:7"),
    ]


@pytest.mark.parametrize(
    "ip", ["::ffff:1.2.3.4", "::1.2.3.4", "::", "::1", "fe80::1:2", "2001:db8:0:0:1:0:0:1"]
)
def test_addrv2_ipv6_text_matches_core(ip: str) -> None:
    import socket

    raw = socket.inet_pton(socket.AF_INET6, ip)
    payload = bytes.fromhex("01" + "00000000" + "01" + "02" + "10") + raw + b"\x20\x8d"
    ours = decode_message("addrv2", payload).json(wire_hash)
    assert ours == reference_body("addrv2", payload)


def test_addrv2_unknown_network_is_rejected() -> None:
    # BIP155 net 3 (TorV2) is gone; Core's test framework rejects it too.
    payload = bytes.fromhex("01" + "00000000" + "01" + "03" + "0a" + "00" * 10 + "208d")
    with pytest.raises(DecodeError, match="network 3"):
        decode_message("addrv2", payload)


def test_transaction_ids_match_core() -> None:
    block = decode_message("block", bytes.fromhex(VECTORS["block"])).block
    ref = vm.CBlock()
    ref.deserialize(BytesIO(bytes.fromhex(VECTORS["block"])))
    ref.rehash()
    assert display_hash(block.hash) == ref.hash
    for ours, theirs in zip(block.transactions, ref.vtx, strict=True):
        theirs.rehash()
        assert display_hash(ours.txid) == theirs.hash
        assert display_hash(ours.wtxid) == theirs.getwtxid()


def test_display_hashes_reverse_byte_order() -> None:
    msg = decode_message("inv", bytes.fromhex(VECTORS["inv"]))
    h = msg.inv[0].hash
    assert msg.json(display_hash)["inv"][0]["hash"] == h[::-1].hex()
    assert msg.json(wire_hash)["inv"][0]["hash"] == h.hex()


def test_unknown_type_is_lossless() -> None:
    msg = decode_message("futuremsg", b"\x01\x02")
    assert msg == Unknown("futuremsg", b"\x01\x02")
    assert msg.encode() == b"\x01\x02"


def test_non_canonical_compact_size_is_rejected() -> None:
    with pytest.raises(DecodeError, match="non-canonical"):
        decode_message("inv", b"\xfd\x01\x00" + b"\x01\x00\x00\x00" + b"\x00" * 32)


def test_huge_count_fails_before_allocating() -> None:
    with pytest.raises(DecodeError, match="count"):
        decode_message("inv", b"\xff" + (2**60).to_bytes(8, "little"))


def test_segwit_marker_with_unusual_flag_round_trips() -> None:
    tx = decode_message("tx", bytes.fromhex(VECTORS["tx"]))
    raw = tx.encode()
    assert raw[4:6] == b"\x00\x01"
    odd = raw[:5] + b"\x03" + raw[6:]
    again = decode_message("tx", odd)
    assert again.tx.flags == 3
    assert again.encode() == odd


def test_legacy_transaction_without_inputs_or_outputs() -> None:
    payload = bytes.fromhex("02000000" + "00" + "00" + "65000000")
    tx = decode_message("tx", payload)
    assert tx.tx.inputs == () and tx.tx.outputs == () and tx.tx.flags == 0
    assert tx.encode() == payload


# --- fuzzing: arbitrary bytes never raise anything but DecodeError ---------------------


@settings(max_examples=300, deadline=None)
@given(msgtype=st.sampled_from(sorted(MESSAGES)), payload=st.binary(max_size=300))
def test_arbitrary_payload_only_raises_decode_error(msgtype: str, payload: bytes) -> None:
    try:
        msg = decode_message(msgtype, payload)
    except DecodeError:
        return
    assert msg.encode() == payload  # whatever decodes, re-encodes exactly
    msg.json(wire_hash)


@settings(max_examples=300, deadline=None)
@given(
    msgtype=st.sampled_from(sorted(MESSAGES)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10_000),
)
def test_mutated_vector_only_raises_decode_error(
    msgtype: str, flips: list[tuple[int, int]], cut: int
) -> None:
    payload = bytearray.fromhex(VECTORS[msgtype])
    for pos, value in flips:
        if payload:
            payload[pos % len(payload)] = value
    data = bytes(payload[: cut % (len(payload) + 1)])
    try:
        msg = decode_message(msgtype, data)
    except DecodeError:
        return
    assert msg.encode() == data


# --- Core's test framework as an oracle on generated messages --------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
uint256 = st.integers(0, 2**256 - 1)
script = st.binary(max_size=80)


@st.composite
def transactions(draw: st.DrawFn) -> vm.CTransaction:
    tx = vm.CTransaction()
    tx.version = draw(u32)
    n_in = draw(st.integers(1, 3))
    tx.vin = [
        vm.CTxIn(vm.COutPoint(draw(uint256), draw(u32)), draw(script), draw(u32))
        for _ in range(n_in)
    ]
    tx.vout = [
        vm.CTxOut(draw(st.integers(-(2**63), 2**63 - 1)), draw(script))
        for _ in range(draw(st.integers(0, 3)))
    ]
    tx.nLockTime = draw(u32)
    if draw(st.booleans()):
        for _ in range(n_in):
            w = vm.CTxInWitness()
            w.scriptWitness.stack = draw(st.lists(st.binary(max_size=40), max_size=3))
            tx.wit.vtxinwit.append(w)
    return tx


@st.composite
def headers(draw: st.DrawFn) -> vm.CBlockHeader:
    h = vm.CBlockHeader()
    h.nVersion, h.hashPrevBlock, h.hashMerkleRoot = draw(i32), draw(uint256), draw(uint256)
    h.nTime, h.nBits, h.nNonce = draw(u32), draw(u32), draw(u32)
    return h


@st.composite
def addresses_v2(draw: st.DrawFn) -> vm.CAddress:
    a = vm.CAddress()
    a.time, a.nServices, a.port = draw(u32), draw(u64), draw(st.integers(0, 65535))
    a.net = draw(st.sampled_from([Net.IPV4, Net.IPV6, Net.TORV3, Net.I2P, Net.CJDNS]))
    raw = draw(st.binary(min_size=32, max_size=32))
    a.ip = AddressV2(0, 0, a.net, raw[: {1: 4, 2: 16, 6: 16}.get(a.net, 32)], 0).host
    return a


@st.composite
def generated_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(
        st.sampled_from(
            ["tx", "block", "headers", "inv", "addrv2", "cmpctblock", "version", "getheaders"]
        )
    )
    if kind == "tx":
        return kind, vm.msg_tx(draw(transactions())).serialize()
    if kind == "block":
        blk = vm.CBlock(draw(headers()))
        blk.vtx = draw(st.lists(transactions(), max_size=3))
        return kind, vm.msg_block(blk).serialize()
    if kind == "headers":
        return kind, vm.msg_headers(draw(st.lists(headers(), max_size=4))).serialize()
    if kind == "inv":
        invs = draw(st.lists(st.builds(vm.CInv, u32, uint256), max_size=5))
        return kind, vm.msg_inv(invs).serialize()
    if kind == "addrv2":
        msg = vm.msg_addrv2()
        msg.addrs = draw(st.lists(addresses_v2(), max_size=4))
        return kind, msg.serialize()
    if kind == "cmpctblock":
        hs = vm.P2PHeaderAndShortIDs()
        hs.header = draw(headers())
        hs.nonce = draw(u64)
        hs.shortids = draw(st.lists(st.integers(0, 2**48 - 1), max_size=5))
        hs.shortids_length = len(hs.shortids)
        hs.prefilled_txn = [
            vm.PrefilledTransaction(draw(st.integers(0, 300)), tx)
            for tx in draw(st.lists(transactions(), max_size=2))
        ]
        hs.prefilled_txn_length = len(hs.prefilled_txn)
        return kind, hs.serialize(with_witness=True)
    if kind == "version":
        v = vm.msg_version()
        v.nVersion, v.nServices, v.nTime = draw(i32), draw(u64), draw(st.integers(0, 2**40))
        v.nNonce, v.nStartingHeight = draw(u64), draw(i32)
        v.strSubVer = draw(st.text(max_size=20))
        v.relay = draw(st.integers(0, 1))
        return kind, v.serialize()
    gh = vm.msg_getheaders()
    gh.locator.vHave = draw(st.lists(uint256, max_size=5))
    gh.hashstop = draw(uint256)
    return kind, gh.serialize()


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(max_examples=400, deadline=None)
@given(generated_messages())
def test_core_serialized_payloads_decode_to_the_same_values(case: tuple[str, bytes]) -> None:
    msgtype, payload = case
    ours = decode_message(msgtype, payload)
    assert ours.encode() == payload
    ref = with_documented_deviations(msgtype, payload, reference_body(msgtype, payload))
    assert ours.json(wire_hash) == ref


def test_reader_error_names_type_and_offset() -> None:
    r = Reader(b"\x01\x02", "ping")
    with pytest.raises(DecodeError) as e:
        r.u64()
    assert e.value.msgtype == "ping" and e.value.offset == 0
    assert "ping" in str(e.value) and "offset 0" in str(e.value)


def test_block_hash_of_regtest_genesis() -> None:
    genesis = bytes.fromhex(
        "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd"
        "7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4adae5494dffff7f2002000000"
    )
    r = Reader(genesis, "headers")
    from msgcap.parser.structures import BlockHeader

    header = BlockHeader.read(r)
    assert display_hash(header.hash) == (
        "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"
    )
    assert hash256(genesis) == header.hash
