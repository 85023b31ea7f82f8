"""BIP324 v2 transport: official vectors, two sessions, Core's test framework as a peer,
any chunking of the stream, and the conditions on which Core disconnects."""

from __future__ import annotations

import csv
import io
import itertools
import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import coincurve
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from verystable.core.v2_p2p import (  # type: ignore[import-untyped]
    MSGTYPE_TO_SHORTID,
    SHORTID,
    EncryptedP2PState,
)

from msgcap.capture.bip324 import (
    MAX_GARBAGE_LEN,
    V1_PREFIX_LEN,
    V2Session,
    classify_prefix,
    looks_like_v1,
    session_id_hex,
    v1_prefix,
)
from msgcap.capture.bip324_cipher import (
    PacketCipher,
    derive_keys,
    ecdh_secret,
    ellswift_create,
    ellswift_decode,
)
from msgcap.capture.bip324_events import (
    CORE_EMPTY_TYPE_IDS,
    MAX_CONTENTS_LEN,
    V2_MESSAGE_IDS,
    V2_SHORT_IDS,
    Event,
    HandshakeComplete,
    UnknownShortId,
    V2Error,
    V2ErrorReason,
    V2Message,
    VersionPacket,
)
from msgcap.capture.framing import NEED_DATA

DATA = Path(__file__).parent / "data" / "bip324"  # copied from BIP324's repository
MAINNET = bytes.fromhex("f9beb4d9")
REGTEST = bytes.fromhex("fabfb5da")

KEY_I = (0x1234).to_bytes(32, "big")
KEY_R = (0xABCDEF).to_bytes(32, "big")
AUX_I = b"\x11" * 32
AUX_R = b"\x22" * 32


def read_csv(name: str) -> list[dict[str, str]]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def norm(events: list[Event]) -> list[tuple[Any, ...]]:
    """Events as comparable tuples (memoryview payloads as bytes)."""
    out = []
    for e in events:
        values = [getattr(e, f.name) for f in fields(e)]
        out.append(
            (type(e).__name__, *(bytes(v) if isinstance(v, memoryview) else v for v in values))
        )
    return out


def initiator(**kw: Any) -> V2Session:
    kw.setdefault("garbage", b"G" * 100)
    return V2Session(True, REGTEST, privkey=KEY_I, auxrand=AUX_I, **kw)


def responder(**kw: Any) -> V2Session:
    kw.setdefault("garbage", b"R" * 50)
    return V2Session(False, REGTEST, privkey=KEY_R, auxrand=AUX_R, **kw)


def handshake(i: V2Session, r: V2Session) -> tuple[list[Event], list[Event]]:
    """Run the handshake; the events each side saw."""
    ev_r = r.feed(i.data_to_send())
    ev_i = i.feed(r.data_to_send())
    ev_r += r.feed(i.data_to_send())
    return ev_i, ev_r


# --- message ids, v1 detection, session id --------------------------------------------


def test_short_ids_match_bip_and_core() -> None:
    # Order from the BIP324 table (and Core v30's V2_MESSAGE_IDS); 29.. are undefined.
    expected = (
        "addr block blocktxn cmpctblock feefilter filteradd filterclear filterload getblocks "
        "getblocktxn getdata getheaders headers inv mempool merkleblock notfound ping pong "
        "sendcmpct tx getcfilters cfilter getcfheaders cfheaders getcfcheckpt cfcheckpt addrv2"
    ).split()
    assert [V2_MESSAGE_IDS[i] for i in range(1, 29)] == expected
    assert set(V2_MESSAGE_IDS) == set(range(1, 29))
    assert V2_SHORT_IDS["getblocktxn"] == 10  # the BIP's own example
    assert {i: t.decode() for i, t in SHORTID.items()} == dict(V2_MESSAGE_IDS)


def test_v1_prefix_detection() -> None:
    prefix = v1_prefix(REGTEST)
    assert prefix == REGTEST + b"version\0\0\0\0\0" and len(prefix) == V1_PREFIX_LEN
    assert looks_like_v1(prefix, REGTEST)
    assert looks_like_v1(prefix + b"more", REGTEST)
    assert classify_prefix(prefix, REGTEST) == "v1"
    for k in range(V1_PREFIX_LEN):
        almost = bytearray(prefix)
        almost[k] ^= 0x01  # 15 of 16 bytes match: v2
        assert not looks_like_v1(almost, REGTEST)
        assert classify_prefix(almost, REGTEST) == "v2"
        assert classify_prefix(almost[: k + 1], REGTEST) == "v2"  # decided at the mismatch
        assert classify_prefix(prefix[:k], REGTEST) is None  # undecided
    assert not looks_like_v1(prefix, MAINNET)
    with pytest.raises(ValueError):
        looks_like_v1(prefix[:15], REGTEST)


def test_responder_sends_key_on_first_mismatching_byte() -> None:
    prefix = v1_prefix(REGTEST)
    r = responder()
    assert r.feed(prefix[:15]) == [] and r.data_to_send() == b""
    r.receive_data(bytes([prefix[15] ^ 0x80]))  # 15 of 16 match: v2
    assert r.next_events() == []
    out = r.data_to_send()
    assert out == r.ellswift + r.garbage and len(out) == 64 + 50
    r2 = responder()
    assert r2.feed(b"\x00") == [] and r2.data_to_send() == r2.ellswift + r2.garbage


def test_responder_v1_peer_and_wrong_network() -> None:
    r = responder()
    r.receive_data(v1_prefix(REGTEST))
    with pytest.raises(V2Error) as exc:
        r.next_events()
    assert exc.value.reason is V2ErrorReason.V1_PEER
    assert r.data_to_send() == b""
    r = responder()
    assert r.feed(v1_prefix(MAINNET)[:15]) == []  # first byte differs: v2, key sent
    assert r.data_to_send()
    r.receive_data(b"\0")
    with pytest.raises(V2Error) as exc:
        r.next_events()
    assert exc.value.reason is V2ErrorReason.WRONG_NETWORK
    with pytest.raises(V2Error):  # sticky
        r.next_events()
    # an initiator does not check for it
    i = initiator()
    assert i.feed(v1_prefix(MAINNET) + bytes(48)) == [HandshakeComplete(i.session_id or b"")]


def test_session_id_hex_is_plain_hex() -> None:
    # Core: getpeerinfo's session_id is HexStr of the 32 bytes (its rpc_net.py functional
    # test compares it with v2_state.peer['session_id'].hex()).
    sid = bytes(range(32))
    assert session_id_hex(sid) == sid.hex()
    assert session_id_hex(sid) == "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"


# --- official vectors -----------------------------------------------------------------


def test_ellswift_decode_vectors() -> None:
    rows = read_csv("ellswift_decode_test_vectors.csv")
    assert len(rows) == 76
    for row in rows:
        assert ellswift_decode(bytes.fromhex(row["ellswift"])).hex() == row["x"], row["comment"]


def test_xswiftec_inv_vectors_forward_direction() -> None:
    """libsecp256k1's API does not expose XSwiftECInv (only ellswift_encode/create with
    random u and case), so the inverse itself cannot be checked. What can be checked is
    that every t these vectors give maps back to x: XSwiftEC(u, t) == x."""
    rows = read_csv("xswiftec_inv_test_vectors.csv")
    checked = 0
    for row in rows:
        u = bytes.fromhex(row["u"])
        for case in range(8):
            t = row[f"case{case}_t"]
            if t:
                assert ellswift_decode(u + bytes.fromhex(t)).hex() == row["x"], (row, case)
                checked += 1
    assert checked == 98  # every non-empty t in the file


def test_ellswift_create_encodes_the_public_key() -> None:
    for seed in range(1, 20):
        priv = seed.to_bytes(32, "big")
        x = coincurve.PrivateKey(priv).public_key.format()[1:]
        enc = ellswift_create(priv, bytes([seed]) * 32)
        assert ellswift_decode(enc) == x
        assert ellswift_create(priv, bytes([seed]) * 32) == enc  # deterministic in auxrand
        assert ellswift_create(priv, bytes([seed + 1]) * 32) != enc
    with pytest.raises(ValueError):
        ellswift_create(bytes(32))


@pytest.mark.parametrize("row", range(7))
def test_packet_encoding_vector(row: int) -> None:
    v = read_csv("packet_encoding_test_vectors.csv")[row]
    ints = ("in_idx", "in_multiply", "in_initiating", "in_ignore")
    h = {k: bytes.fromhex(val) for k, val in v.items() if k not in ints}
    idx, multiply = int(v["in_idx"]), int(v["in_multiply"])
    initiating, ignore = v["in_initiating"] == "1", v["in_ignore"] == "1"
    priv, ours, theirs = h["in_priv_ours"], h["in_ellswift_ours"], h["in_ellswift_theirs"]
    contents = h["in_contents"] * multiply

    assert ellswift_decode(ours) == h["mid_x_ours"]
    assert ellswift_decode(theirs) == h["mid_x_theirs"]
    assert coincurve.PrivateKey(priv).public_key.format()[1:] == h["mid_x_ours"]
    shared_x = coincurve.PublicKey(b"\x02" + h["mid_x_theirs"]).multiply(priv).format()[1:]
    assert shared_x == h["mid_x_shared"]
    secret = ecdh_secret(priv, ours, theirs, initiating)
    assert secret == h["mid_shared_secret"]
    keys = derive_keys(secret, MAINNET)
    assert keys.initiator_l == h["mid_initiator_l"]
    assert keys.initiator_p == h["mid_initiator_p"]
    assert keys.responder_l == h["mid_responder_l"]
    assert keys.responder_p == h["mid_responder_p"]
    assert keys.session_id == h["out_session_id"]
    send_term, recv_term = (
        (keys.initiator_garbage_terminator, keys.responder_garbage_terminator)
        if initiating
        else (keys.responder_garbage_terminator, keys.initiator_garbage_terminator)
    )
    assert send_term == h["mid_send_garbage_terminator"]
    assert recv_term == h["mid_recv_garbage_terminator"]
    send_keys = (
        (keys.initiator_l, keys.initiator_p) if initiating else (keys.responder_l, keys.responder_p)
    )

    # Encrypt as packet number idx of our sending direction.
    enc = PacketCipher(*send_keys)
    enc.skip(idx)
    assert enc.packet_counter == idx
    packet = bytes(enc.encrypt_contents(contents, h["in_aad"], ignore))
    if v["out_ciphertext"]:
        assert packet == h["out_ciphertext"]
    else:
        assert packet.endswith(h["out_ciphertext_endswith"])
    assert len(packet) == len(contents) + 20
    assert enc.packet_counter == idx + 1

    # The peer decrypts it at the same index: skipped ahead, and packet by packet.
    dec = PacketCipher(*send_keys)
    dec.skip(idx)
    assert dec.decrypt_length(packet[:3]) == len(contents)
    assert dec.decrypt(packet[3:], h["in_aad"]) == (ignore, contents)
    if len(contents) < 100_000:
        enc2, dec2 = PacketCipher(*send_keys), PacketCipher(*send_keys)
        for k in range(idx):
            p = enc2.encrypt_contents(bytes(k % 5), ignore=k % 2 == 1)
            assert dec2.decrypt_length(p[:3]) == k % 5
            assert dec2.decrypt(p[3:]) == (k % 2 == 1, bytes(k % 5))
        assert enc2.encrypt_contents(contents, h["in_aad"], ignore) == packet
        assert dec2.decrypt_length(packet[:3]) == len(contents)
        assert dec2.decrypt(packet[3:], h["in_aad"]) == (ignore, contents)

    # The session derives the same from the same keys.
    s = V2Session(initiating, MAINNET, privkey=priv, ellswift=ours, garbage=b"")
    if not initiating:
        assert s.data_to_send() == b""
    s.receive_data(theirs)
    assert s.next_events() == [HandshakeComplete(h["out_session_id"])]
    assert s.session_id == h["out_session_id"] and s.established
    assert s.send_garbage_terminator == h["mid_send_garbage_terminator"]
    out = s.data_to_send()
    assert out[:64] == ours and out[64:80] == h["mid_send_garbage_terminator"]
    version = PacketCipher(*send_keys).encrypt_contents(b"", b"")
    assert out[80:] == version and len(version) == 20


def test_skip_matches_packet_by_packet() -> None:
    a, b = PacketCipher(b"\x01" * 32, b"\x02" * 32), PacketCipher(b"\x01" * 32, b"\x02" * 32)
    for _ in range(500):
        a.encrypt_contents(b"")
    b.skip(500)
    assert a.packet_counter == b.packet_counter == 500
    assert a.encrypt_contents(b"x", b"aad") == b.encrypt_contents(b"x", b"aad")


def test_packets_across_rekeys() -> None:
    """Small and large packets (past 64 KiB) round-trip across rekeys, the AAD going with
    the first one."""
    enc, dec = PacketCipher(b"\x01" * 32, b"\x02" * 32), PacketCipher(b"\x01" * 32, b"\x02" * 32)
    rng = random.Random(5)
    for k in range(500):
        contents = rng.randbytes(rng.choice((0, 1, 100, 70_000)))
        aad, ignore = (b"garbage" if k == 0 else b""), k % 3 == 0
        packet = enc.encrypt_contents(contents, aad, ignore)
        assert isinstance(packet, bytes)
        assert dec.decrypt_length(packet[:3]) == len(contents)
        assert dec.decrypt(packet[3:], aad) == (ignore, contents)
    assert enc.packet_counter == dec.packet_counter == 500
    with pytest.raises(ValueError):
        enc.encrypt(b"", b"")  # no header byte
    assert enc.packet_counter == 500  # nothing encrypted


def test_messages_joined() -> None:
    """encrypt_messages joins the packets after the handshake bytes still pending."""
    i, r = initiator(), responder()
    r.feed(i.data_to_send())
    i.feed(r.data_to_send())  # keys derived; our terminator and version packet pending
    messages = [("tx", bytes([k % 256]) * (k % 300)) for k in range(600)] + [
        ("block", bytes(100_000))
    ]
    stream = i.encrypt_messages(messages)
    assert not i.data_to_send()
    lone = i.encrypt_messages([("block", b"b" * 100_000)])
    assert isinstance(lone, bytes)
    events = r.feed(stream + lone)
    expected = [("V2Message", t, p) for t, p in [*messages, ("block", b"b" * 100_000)]]
    assert norm(events) == [("VersionPacket", b""), *expected]


# --- two sessions ---------------------------------------------------------------------


def test_full_handshake_and_messages_both_ways() -> None:
    i, r = V2Session(True, REGTEST), V2Session(False, REGTEST)
    assert not i.established and i.session_id is None
    with pytest.raises(RuntimeError):
        i.encrypt_message("ping", b"")
    ev_i, ev_r = handshake(i, r)
    assert i.session_id == r.session_id and i.session_id is not None
    assert ev_i == [HandshakeComplete(i.session_id), VersionPacket(b"")]
    assert ev_r == [HandshakeComplete(i.session_id), VersionPacket(b"")]
    assert i.established and r.established and i.peer_version_received
    assert i.received_garbage == r.garbage and r.received_garbage == i.garbage

    rng = random.Random(5)
    for sender, receiver in ((i, r), (r, i)):
        expected = []
        wire = bytearray()
        for k in range(1000):  # crosses four rekeys
            msgtype = rng.choice(["ping", "inv", "tx", "version", "verack", "wtxidrelay", ""])
            payload = rng.randbytes(rng.choice([0, 1, 100, 3000]))
            wire += sender.encrypt_message(msgtype, payload)
            expected.append(("V2Message", msgtype, payload))
            if k % 97 == 0:
                wire += sender.encrypt_decoy(k % 50)
        before = receiver.decoys_received
        assert norm(receiver.feed(bytes(wire))) == expected
        assert receiver.decoys_received - before == 11


def test_short_and_long_encodings() -> None:
    i, r = initiator(), responder()
    handshake(i, r)
    short = i.encrypt_message("ping", b"")
    long = i.encrypt_message("verack", b"")
    assert len(short) == 3 + 1 + 1 + 16  # header, short id, tag
    assert len(long) == 3 + 1 + 13 + 16  # header, 0x00 + 12-byte type, tag
    assert norm(r.feed(short + long)) == [("V2Message", "ping", b""), ("V2Message", "verack", b"")]
    with pytest.raises(ValueError):
        i.encrypt_message("thirteen_char", b"")
    # long encoding of a type that has a short id is the same message (BIP324)
    r.receive_data(i.encrypt_contents(b"\x00ping\0\0\0\0\0\0\0\0" + b"12345678"))
    r.receive_data(i.encrypt_message("ping", b"12345678"))
    assert norm(r.next_events()) == [("V2Message", "ping", b"12345678")] * 2


def test_large_message_in_chunks() -> None:
    i, r = initiator(), responder()
    handshake(i, r)
    big = random.Random(1).randbytes(1_000_000)
    packet = i.encrypt_message("block", big)
    assert isinstance(packet, bytes)
    small = i.encrypt_message("tx", b"t" * 100)
    assert isinstance(small, bytes)
    stream = bytes(packet) + small
    events: list[Event] = []
    for k in range(0, len(stream), 65536):
        events += r.feed(stream[k : k + 65536])
    assert norm(events) == [("V2Message", "block", big), ("V2Message", "tx", b"t" * 100)]
    payload = events[0].payload  # type: ignore[union-attr]
    assert isinstance(payload, memoryview) and payload.readonly
    assert isinstance(payload.obj, bytes)  # a view of the decrypted contents, not a copy
    assert isinstance(events[1].payload, bytes)  # type: ignore[union-attr]


def test_handshake_decoys_carry_the_garbage_aad() -> None:
    i, r = initiator(handshake_decoys=(3, 0, 100)), responder()
    _, ev_r = handshake(i, r)
    assert r.decoys_received == 3 and i.decoys_received == 0
    assert ev_r[-1] == VersionPacket(b"")


def test_version_packet_contents_are_ignored() -> None:
    """Core ignores the version packet's contents (reserved for future versions)."""
    i, r = initiator(garbage=b"abc"), responder()
    r.feed(i.data_to_send())
    r_out = r.data_to_send()
    keys = derive_keys(ecdh_secret(KEY_I, i.ellswift, r_out[:64], True), REGTEST)
    send = PacketCipher(keys.initiator_l, keys.initiator_p)
    stream = keys.initiator_garbage_terminator + send.encrypt_contents(b"future stuff", b"abc")
    stream += send.encrypt_contents(b"\x12" + bytes(8))
    assert norm(r.feed(stream)) == [
        ("VersionPacket", b"future stuff"),
        ("V2Message", "ping", bytes(8)),
    ]


def test_message_type_decoding_like_core() -> None:
    i, r = initiator(), responder()
    handshake(i, r)
    cases: list[tuple[bytes, tuple[Any, ...]]] = [
        (b"", ("InvalidMessageType", b"")),  # empty contents
        (b"\x00", ("InvalidMessageType", b"")),
        (b"\x00abc", ("InvalidMessageType", b"abc")),  # long type cut short
        (b"\x00" + bytes(12) + b"p", ("V2Message", "", b"p")),  # empty type: Core passes it on
        (b"\x00a\x7f" + bytes(10), ("V2Message", "a\x7f", b"")),  # 0x7f is allowed in v2
        (b"\x00a\x19" + bytes(10), ("InvalidMessageType", b"a\x19" + bytes(10))),
        (b"\x00ab\0c" + bytes(8), ("InvalidMessageType", b"ab\0c" + bytes(8))),
        (b"\x00a\x80" + bytes(10), ("InvalidMessageType", b"a\x80" + bytes(10))),
        (b"\x00sendaddrv2\0\0", ("V2Message", "sendaddrv2", b"")),
        (b"\x1c" + b"x", ("V2Message", "addrv2", b"x")),
        (b"\x1d" + b"abc", ("UnknownShortId", 29, b"abc")),
        (b"\x20", ("UnknownShortId", 32, b"")),
        (b"\x21zz", ("UnknownShortId", 33, b"zz")),
        (b"\xff", ("UnknownShortId", 255, b"")),
    ]
    stream = b"".join(bytes(i.encrypt_contents(c)) for c, _ in cases)
    events = r.feed(stream)
    assert norm(events) == [e for _, e in cases]
    unknown = [e for e in events if isinstance(e, UnknownShortId)]
    assert [e.core_delivers for e in unknown] == [True, True, False, False]
    assert list(CORE_EMPTY_TYPE_IDS) == [29, 30, 31, 32]


def test_next_event_one_at_a_time() -> None:
    i, r = initiator(), responder()
    r.receive_data(i.data_to_send())
    assert r.next_event() == HandshakeComplete(r.session_id or b"")
    assert r.next_event() is NEED_DATA
    i.feed(r.data_to_send())
    r.receive_data(i.data_to_send() + i.encrypt_message("ping", b"1") + i.encrypt_decoy(1))
    r.receive_data(i.encrypt_message("pong", b"2"))
    got: list[Event] = []
    while (ev := r.next_event()) is not NEED_DATA:
        got.append(ev)
    assert norm(got) == [
        ("VersionPacket", b""),
        ("V2Message", "ping", b"1"),
        ("V2Message", "pong", b"2"),
    ]


def test_unsent_handshake_bytes_are_prepended() -> None:
    i, r = initiator(), responder()
    r.feed(i.data_to_send())
    i.feed(r.data_to_send())
    # i has terminator + version packet pending; the message packet comes after them
    r.receive_data(i.encrypt_message("ping", b"x"))
    assert i.data_to_send() == b""
    assert norm(r.next_events()) == [("VersionPacket", b""), ("V2Message", "ping", b"x")]


# --- Core's test framework as the peer ------------------------------------------------


def test_against_core_framework_as_responder() -> None:
    ours = V2Session(True, REGTEST, garbage=b"g" * 300)
    theirs = EncryptedP2PState(initiating=False, net="regtest")
    first = ours.data_to_send()
    consumed, reply = theirs.respond_v2_handshake(io.BytesIO(first))
    # read up to the first byte unlike the v1 prefix (the first, unless our random key
    # starts with the network magic's first byte)
    assert 1 <= consumed < 16 and reply != -1
    random.seed(3)
    n_decoys = random.randint(0, 10)
    random.seed(3)
    used, reply2 = theirs.complete_handshake(io.BytesIO(first[consumed:]))
    assert used == 64 - consumed
    events = ours.feed(reply + reply2)
    assert events == [HandshakeComplete(theirs.peer["session_id"]), VersionPacket(b"")]
    assert ours.decoys_received == n_decoys > 0
    _, ok = theirs.authenticate_handshake(first[64:] + ours.data_to_send())
    assert ok and theirs.tried_v2_handshake
    assert session_id_hex(ours.session_id or b"") == theirs.peer["session_id"].hex()
    exchange(ours, theirs)


def test_against_core_framework_as_initiator() -> None:
    theirs = EncryptedP2PState(initiating=True, net="regtest")
    ours = V2Session(False, REGTEST)
    first = theirs.initiate_v2_handshake()
    events = ours.feed(first)
    assert events == [HandshakeComplete(ours.session_id or b"")]
    out = ours.data_to_send()
    random.seed(4)
    n_decoys = random.randint(0, 10)
    random.seed(4)
    used, reply = theirs.complete_handshake(io.BytesIO(out))
    assert used == 64
    length, ok = theirs.authenticate_handshake(out[64:])
    assert ok and theirs.tried_v2_handshake and length == len(out) - 64
    assert ours.feed(reply) == [VersionPacket(b"")]
    assert ours.decoys_received == n_decoys > 0
    assert ours.session_id == theirs.peer["session_id"]
    exchange(ours, theirs)


def exchange(ours: V2Session, theirs: Any) -> None:
    """Messages and decoys both ways, across rekeys."""
    rng = random.Random(9)
    decoys_before = ours.decoys_received
    for k in range(600):
        msgtype = rng.choice(["ping", "inv", "version", "sendaddrv2", "block"])
        payload = rng.randbytes(100_000 if k == 300 else rng.randrange(200))
        # ours -> theirs
        packet = bytes(ours.encrypt_message(msgtype, payload))
        length, contents = theirs.v2_receive_packet(packet)
        assert length == len(packet)
        if msgtype.encode() in MSGTYPE_TO_SHORTID:
            assert contents == bytes([MSGTYPE_TO_SHORTID[msgtype.encode()]]) + payload
        else:
            assert contents == b"\x00" + msgtype.encode().ljust(12, b"\0") + payload
        if k % 50 == 0:
            decoy = bytes(ours.encrypt_decoy(k % 7))
            assert theirs.v2_receive_packet(decoy) == (len(decoy), None)
        # theirs -> ours
        if msgtype.encode() in MSGTYPE_TO_SHORTID:
            tmsg = bytes([MSGTYPE_TO_SHORTID[msgtype.encode()]])
        else:
            tmsg = b"\x00" + msgtype.encode().ljust(12, b"\0")
        wire = theirs.v2_enc_packet(tmsg + payload)
        if k % 40 == 0:
            wire += theirs.v2_enc_packet(b"\x00" * (k % 13), ignore=True)
        assert norm(ours.feed(wire)) == [("V2Message", msgtype, payload)]
    assert ours.decoys_received - decoys_before == 15


# --- any chunking gives the same events -----------------------------------------------


def build_streams() -> dict[str, tuple[bytes, bytes]]:
    """For each receiving side: everything the other side sends it, and one more packet."""
    i = initiator(handshake_decoys=(5, 0))
    r = responder(handshake_decoys=(1,))
    to_r = i.data_to_send()
    r.feed(to_r)
    to_i = r.data_to_send()
    i.feed(to_i)
    to_r += i.data_to_send()
    rng = random.Random(7)
    out = {}
    for sender, side, start in ((i, "responder", to_r), (r, "initiator", to_i)):
        parts = [
            sender.encrypt_message("version", rng.randbytes(100)),
            sender.encrypt_message("verack", b""),
            sender.encrypt_decoy(10),
            sender.encrypt_message("tx", rng.randbytes(70_000)),  # in-place path
            sender.encrypt_contents(b"\x28abc"),  # unknown short id 40
            sender.encrypt_contents(b"\x00bad\x01" + bytes(8)),  # invalid type
            sender.encrypt_contents(b""),
        ]
        parts += [sender.encrypt_message("inv", rng.randbytes(37)) for _ in range(230)]
        parts.append(sender.encrypt_message("block", rng.randbytes(5000)))
        extra = bytes(sender.encrypt_message("ping", bytes(8)))
        out[side] = (start + b"".join(bytes(p) for p in parts), extra)
    return out


STREAMS = build_streams()


def receiver(side: str) -> tuple[V2Session, bytes]:
    if side == "responder":
        return responder(handshake_decoys=(1,)), STREAMS[side][0]
    s = initiator(handshake_decoys=(5, 0))
    s.data_to_send()
    return s, STREAMS[side][0]


def events_for(side: str, chunks: list[bytes]) -> tuple[list[tuple[Any, ...]], int]:
    s, _ = receiver(side)
    events: list[Event] = []
    for c in chunks:
        events += s.feed(c)
    assert s.take_events() == ([], None)
    return norm(events), s.decoys_received


EXPECTED = {side: events_for(side, [receiver(side)[1]]) for side in ("responder", "initiator")}


def test_expected_stream_events() -> None:
    events, decoys = EXPECTED["responder"]
    assert decoys == 3  # two handshake decoys and one later
    assert events[:3] == [
        ("HandshakeComplete", events[0][1]),
        ("VersionPacket", b""),
        ("V2Message", "version", events[2][2]),
    ]
    assert events[5] == ("UnknownShortId", 40, b"abc")
    assert events[6] == ("InvalidMessageType", b"bad\x01" + bytes(8))
    assert events[7] == ("InvalidMessageType", b"")
    assert len(events) == 3 + 5 + 230 + 1
    assert EXPECTED["initiator"][1] == 2


@pytest.mark.parametrize("side", ["responder", "initiator"])
def test_byte_by_byte(side: str) -> None:
    _, stream = receiver(side)
    assert events_for(side, [stream[k : k + 1] for k in range(len(stream))]) == EXPECTED[side]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), side=st.sampled_from(["responder", "initiator"]))
def test_any_chunking_same_events(data: st.DataObject, side: str) -> None:
    _, stream = receiver(side)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    as_views = data.draw(st.booleans())
    fed: list[Any] = [memoryview(c) if as_views else c for c in chunks]
    assert events_for(side, fed) == EXPECTED[side]


@settings(max_examples=30, deadline=None)
@given(data=st.data(), side=st.sampled_from(["responder", "initiator"]))
def test_trailing_partial_packet_is_need_data(data: st.DataObject, side: str) -> None:
    s, stream = receiver(side)
    extra = STREAMS[side][1]
    cut = data.draw(st.integers(1, len(extra) - 1))
    split = data.draw(st.integers(0, len(stream)))
    s.receive_data(stream[:split])
    first = s.next_events()
    s.receive_data(stream[split:] + extra[:cut])
    events, error = s.take_events()
    assert error is None
    assert norm(first + events) == EXPECTED[side][0]
    assert s.next_event() is NEED_DATA


# --- disconnect conditions ------------------------------------------------------------


def test_no_garbage_terminator_within_4095_bytes() -> None:
    i = initiator(garbage=bytes(MAX_GARBAGE_LEN))
    key_and_garbage = i.data_to_send()
    r = responder()
    r.feed(key_and_garbage)
    i.feed(r.data_to_send())
    rest = i.data_to_send()  # terminator + version packet
    assert norm(r.feed(rest)) == [("VersionPacket", b"")]  # 4095 bytes of garbage is fine

    # One more byte of garbage: no terminator in the 4095 + 16 bytes after the key.
    r = responder()
    r.receive_data(key_and_garbage + b"\0" + rest[:15])
    assert [type(e) for e in r.next_events()] == [HandshakeComplete]  # 4110 bytes: wait
    r.receive_data(rest[15:16])
    with pytest.raises(V2Error) as exc:
        r.next_events()
    assert exc.value.reason is V2ErrorReason.NO_GARBAGE_TERMINATOR
    assert exc.value.offset == 64 + 4111
    with pytest.raises(V2Error):
        r.next_events()


def test_bad_tag() -> None:
    i, r = initiator(), responder()
    first = i.data_to_send()
    r.feed(first)
    i.feed(r.data_to_send())
    rest = i.data_to_send()
    r.feed(rest)
    good = bytes(i.encrypt_message("ping", b"1"))
    bad = bytearray(i.encrypt_message("ping", b"2"))
    bad[5] ^= 0x04  # a ciphertext bit, not the length
    after = bytes(i.encrypt_message("ping", b"3"))
    r.receive_data(good + bytes(bad) + after)
    # events before the failure come first, the error on the next call
    assert norm(r.next_events()) == [("V2Message", "ping", b"1")]
    with pytest.raises(V2Error) as exc:
        r.next_events()
    assert exc.value.reason is V2ErrorReason.BAD_TAG
    assert exc.value.offset == len(first) + len(rest) + len(good)  # where the packet starts
    with pytest.raises(V2Error):
        r.next_event()
    r.receive_data(b"more")  # ignored after the failure
    with pytest.raises(V2Error):
        r.next_events()

    i, r = initiator(), responder()
    handshake(i, r)
    bad = bytearray(i.encrypt_message("ping", b"2"))
    bad[-1] ^= 0x80  # the tag
    events, error = r.take_events()
    assert events == [] and error is None
    r.receive_data(bytes(bad))
    events, error = r.take_events()
    assert events == [] and error is not None and error.reason is V2ErrorReason.BAD_TAG


def test_tampered_garbage_fails_the_first_packet() -> None:
    i, r = initiator(garbage=b"some garbage"), responder()
    first = bytearray(i.data_to_send())
    r.feed(bytes(first))
    i.feed(r.data_to_send())
    r2 = responder()
    first[64] ^= 1  # garbage is only authenticated as AAD of the first packet
    r2.feed(bytes(first))
    r2.receive_data(i.data_to_send())
    with pytest.raises(V2Error) as exc:
        r2.next_events()
    assert exc.value.reason is V2ErrorReason.BAD_TAG


def test_oversize_length_fails_on_its_three_bytes() -> None:
    i, r = initiator(), responder()
    handshake(i, r)
    # Exactly Core's limit (1 + 12 + 4,000,000) is accepted, even as a short id (payload
    # of 4,000,012 bytes).
    at_limit = i.encrypt_contents(b"\x02" + bytes(MAX_CONTENTS_LEN - 1))
    assert MAX_CONTENTS_LEN == 4_000_013
    (ev,) = r.feed(at_limit)
    assert isinstance(ev, V2Message) and ev.msgtype == "block"
    assert len(ev.payload) == 4_000_012
    over = i.encrypt_contents(bytes(MAX_CONTENTS_LEN + 1))
    r.receive_data(over[:3])
    with pytest.raises(V2Error) as exc:
        r.next_events()
    assert exc.value.reason is V2ErrorReason.OVERSIZE
    assert str(MAX_CONTENTS_LEN + 1) in str(exc.value)


def test_cut_short_is_not_an_error() -> None:
    i, r = initiator(), responder()
    handshake(i, r)
    packet = bytes(i.encrypt_message("ping", b"12345678"))
    for k in range(len(packet)):
        r.receive_data(packet[k : k + 1])
        events, error = r.take_events()
        assert error is None
        last = k == len(packet) - 1
        assert norm(events) == ([("V2Message", "ping", b"12345678")] if last else [])
    r.receive_data(packet[:0])
    assert r.next_event() is NEED_DATA
