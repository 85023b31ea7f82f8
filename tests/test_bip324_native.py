"""The native per-read BIP324 step (``Pipe`` of msgcap.capture._capture, from
capture/_v2.c) against BIP324's official vectors and against the Python path (V2Session
receiving, V2Session sending) on random streams."""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
import random
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from msgcap.capture.bip324 import V2Session
from msgcap.capture.bip324_cipher import PacketCipher, derive_keys, ecdh_secret
from msgcap.capture.bip324_events import (
    V2_SHORT_IDS,
    UnknownShortId,
    V2Error,
    V2ErrorReason,
    V2Message,
)
from msgcap.capture.bip324_pipe import native_pipe, pipe_dropped, pipe_error
from msgcap.capture.records import record_header
from tests.conftest import (
    EchoPeer,
    Upstream,
    captured_messages,
    read_events,
    route_to,
    running_proxy,
    v2_client,
    wait_until_async,
)

TIMEOUT = 10.0
"""Seconds for each read of the scripted BIP324 ends, and for the event awaited."""

try:  # the step itself, also where MSGCAP_PURE_PYTHON keeps msgcap from loading it
    from msgcap.capture._capture import Pipe
except ImportError:
    Pipe = None  # type: ignore[assignment,misc]
if Pipe is None and os.environ.get("MSGCAP_REQUIRE_NATIVE_CAPTURE"):
    raise RuntimeError(
        "msgcap.capture._capture (with capture/_v2.c) is not built, "
        "and MSGCAP_REQUIRE_NATIVE_CAPTURE is set"
    )
pytestmark = pytest.mark.skipif(Pipe is None, reason="msgcap.capture._capture not built")

DATA = Path(__file__).parent / "data" / "bip324"
MAINNET = bytes.fromhex("f9beb4d9")
REGTEST = bytes.fromhex("fabfb5da")


def rows() -> list[dict[str, str]]:
    with open(DATA / "packet_encoding_test_vectors.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("row", range(7))
def test_packet_encoding_vector(row: int) -> None:
    """Native seal (send ciphers) gives the vector's packet at its index; native open
    (receive ciphers) gives the contents back."""
    assert Pipe is not None
    v = rows()[row]
    idx, initiating = int(v["in_idx"]), v["in_initiating"] == "1"
    contents = bytes.fromhex(v["in_contents"]) * int(v["in_multiply"])
    aad, ignore = bytes.fromhex(v["in_aad"]), v["in_ignore"] == "1"
    priv, ours = bytes.fromhex(v["in_priv_ours"]), bytes.fromhex(v["in_ellswift_ours"])
    theirs = bytes.fromhex(v["in_ellswift_theirs"])
    keys = derive_keys(ecdh_secret(priv, ours, theirs, initiating), MAINNET)
    send_keys = (
        (keys.initiator_l, keys.initiator_p) if initiating else (keys.responder_l, keys.responder_p)
    )
    cipher = PacketCipher(*send_keys)
    cipher.skip(idx)
    state = cipher.state()
    pipe = Pipe(state, state)
    packet = pipe.seal(contents, aad, ignore)
    if v["out_ciphertext"]:
        assert packet == bytes.fromhex(v["out_ciphertext"])
    else:
        assert packet.endswith(bytes.fromhex(v["out_ciphertext_endswith"]))
    assert pipe.open(packet, aad) == (ignore, contents)
    with pytest.raises(ValueError):  # the receive cipher moved on: the same packet fails
        pipe.open(packet, aad)


def test_seal_and_open_across_rekeys() -> None:
    assert Pipe is not None
    enc, dec = PacketCipher(b"\x01" * 32, b"\x02" * 32), PacketCipher(b"\x01" * 32, b"\x02" * 32)
    pipe = Pipe(enc.state(), enc.state())
    rng = random.Random(3)
    for k in range(700):
        contents = rng.randbytes(rng.choice((0, 1, 5, 300, 70_000)) if k % 50 == 0 else k % 7)
        packet = enc.encrypt_contents(contents, ignore=k % 3 == 0)
        assert pipe.seal(contents, b"", k % 3 == 0) == packet
        assert pipe.open(packet) == (k % 3 == 0, contents)
        assert dec.decrypt_length(packet[:3]) == len(contents)
        assert dec.decrypt(packet[3:]) == (k % 3 == 0, contents)
    recv, send = pipe.state()
    assert recv == send and recv[2] == recv[4] == 3 and recv[3] == recv[5] == 700 - 3 * 224


# --- native against the Python path ---------------------------------------------------


def sessions(seed: int) -> tuple[V2Session, V2Session, V2Session, V2Session]:
    """client -> proxy responder; proxy initiator -> sink; handshakes done, all keys
    deterministic in ``seed``."""

    def key(n: int) -> bytes:
        return (seed * 8 + n + 1).to_bytes(32, "big")

    client = V2Session(True, REGTEST, privkey=key(0), auxrand=key(1), garbage=b"g" * (seed % 9))
    responder = V2Session(False, REGTEST, privkey=key(2), auxrand=key(3), garbage=b"r")
    initiator = V2Session(True, REGTEST, privkey=key(4), auxrand=key(5), garbage=b"")
    sink = V2Session(False, REGTEST, privkey=key(6), auxrand=key(7), garbage=b"s" * 3)
    for a, b in ((client, responder), (initiator, sink)):
        for _ in range(3):
            b.feed(a.data_to_send())
            a.feed(b.data_to_send())
        assert a.peer_version_received and b.peer_version_received
    return client, responder, initiator, sink


Packet = tuple[str, int, int]  # kind, type or id, payload size

kinds = st.one_of(
    st.tuples(st.just("msg"), st.sampled_from(sorted(V2_SHORT_IDS)), st.integers(0, 300)),
    st.tuples(
        st.just("long"), st.sampled_from(["foo", "", "sendaddrv2", "ping"]), st.integers(0, 50)
    ),
    st.tuples(st.just("decoy"), st.just(0), st.integers(0, 40)),
    st.tuples(st.just("sid"), st.integers(29, 255), st.integers(0, 10)),
    st.tuples(st.just("raw"), st.just(0), st.integers(0, 16)),
)


def encode(client: V2Session, packets: list[Packet], rng: random.Random) -> list[bytes]:
    out = []
    for kind, what, size in packets:
        payload = rng.randbytes(size)
        if kind == "msg":
            assert isinstance(what, str)
            out.append(client.encrypt_message(what, payload))
        elif kind == "long":
            assert isinstance(what, str)
            out.append(client.encrypt_contents(b"\0" + what.encode().ljust(12, b"\0") + payload))
        elif kind == "decoy":
            out.append(client.encrypt_decoy(size))
        elif kind == "sid":
            assert isinstance(what, int)
            out.append(client.encrypt_contents(bytes((what,)) + payload))
        else:  # contents too short for a type, or an invalid long type
            out.append(client.encrypt_contents(b"\0" + rng.randbytes(size)))
    return out


def python_path(
    responder: V2Session, initiator: V2Session, chunks: list[bytes]
) -> tuple[list[bytes], list[bytes], list[str], V2Error | None]:
    """What proxy/v2.py's Python path makes of the chunks: per chunk, records (stamped
    1000 * chunk + i) and packets; the dropped packets; the error."""
    records, outs, dropped = [], [], []
    for n, chunk in enumerate(chunks):
        responder.receive_data(chunk)
        events, error = responder.take_events()
        messages: list[tuple[str, bytes | memoryview]] = []
        for ev in events:
            if isinstance(ev, V2Message):
                messages.append((ev.msgtype, ev.payload))
            elif isinstance(ev, UnknownShortId) and ev.core_delivers:
                messages.append(("", ev.payload))
            elif isinstance(ev, UnknownShortId):
                dropped.append(f"unknown short id {ev.id}")
            else:
                dropped.append(f"invalid message type {getattr(ev, 'raw', b'')!r}")
        records.append(
            b"".join(
                record_header(1000 * n + i, t, len(p)) + bytes(p)
                for i, (t, p) in enumerate(messages)
            )
        )
        outs.append(bytes(initiator.encrypt_messages(messages)) if messages else b"")
        if error is not None:
            return records, outs, dropped, error
    return records, outs, dropped, None


def native_path(
    responder: V2Session, initiator: V2Session, chunks: list[bytes]
) -> tuple[list[bytes], list[bytes], list[str], V2Error | None, int]:
    pipe = native_pipe(responder, initiator, Pipe)
    assert pipe is not None
    records, outs, dropped = [], [], []
    for n, chunk in enumerate(chunks):
        _, rec, out, drops, error = pipe.feed(chunk, 1000 * n)
        records.append(rec)
        outs.append(out)
        dropped += [d for _, d in pipe_dropped(drops or [])]
        if error is not None:
            return records, outs, dropped, pipe_error(error), pipe.decoys
    return records, outs, dropped, None, pipe.decoys


def cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    lead=st.integers(0, 460),
    packets=st.lists(kinds, max_size=60),
    cuts=st.lists(st.integers(0, 10**9), max_size=12),
    handover=st.binary(max_size=0) | st.just(b"x"),
    tamper=st.none() | st.integers(0, 10**9),
)
def test_native_equals_python(
    seed: int, lead: int, packets: list[Packet], cuts: list[int], handover: bytes,
    tamper: int | None,
) -> None:  # fmt: skip
    """Random packet streams (messages, long types, decoys, unknown ids, invalid types),
    random read boundaries, rekeys at random places (``lead`` decoys first), a packet
    split across the handover from the Python handshake to the pipe, and maybe one
    flipped byte: the native step gives the same records, packets, drops and error."""
    rng = random.Random(seed)
    all_packets: list[Packet] = [("decoy", 0, 0)] * lead + packets
    sets = [sessions(seed), sessions(seed)]
    encoded = [encode(s[0], all_packets, random.Random(seed)) for s in sets]
    assert encoded[0] == encoded[1]
    stream = bytearray(b"".join(encoded[0]))
    if tamper is not None and stream:
        stream[tamper % len(stream)] ^= 1 << rng.randrange(8)
    chunks = cut(bytes(stream), cuts)
    decoys_before = 0
    if handover and chunks and chunks[0]:  # part of the first packet reached the handshake
        k = rng.randrange(1, min(len(chunks[0]), len(encoded[0][0])) + 1)
        for s in sets:
            s[1].receive_data(chunks[0][:k])
            events, error = s[1].take_events()  # what the handshake loop would have taken
            assume(not events and error is None)
        chunks = [chunks[0][k:], *chunks[1:]]
        # A whole decoy may have been taken by the handshake: the relay counts it as
        # the session's, before the pipe took over (MessageFlow.go_native).
        decoys_before = sets[1][1].decoys_received
    py = python_path(sets[0][1], sets[0][2], chunks)
    native = native_path(sets[1][1], sets[1][2], chunks)
    assert native[0] == py[0]
    assert native[1] == py[1]
    assert native[2] == py[2]
    if py[3] is None:
        assert native[3] is None
        assert decoys_before + native[4] == sets[0][1].decoys_received
    else:
        assert native[3] is not None
        assert (native[3].reason, str(native[3]), native[3].offset) == (
            py[3].reason, str(py[3]), py[3].offset)  # fmt: skip
    # The sink decrypts the native packets into the messages sent.
    sink = sets[1][3]
    got = sink.feed(b"".join(native[1]))
    assert all(isinstance(e, V2Message) for e in got)


def test_oversize_and_incomplete() -> None:
    client, responder, initiator, _ = sessions(7)
    pipe = native_pipe(responder, initiator, Pipe)
    assert pipe is not None
    big = client.encrypt_message("block", bytes(4_000_000))
    for i in range(0, len(big) - 1, 65536):
        count, *_ = pipe.feed(big[i : min(i + 65536, len(big) - 1)], 0)
        assert count == 0
        assert pipe.incomplete == len(big)
    count, records, _, dropped, error = pipe.feed(big[-1:], 5)
    assert count == 1 and error is None and dropped is None
    assert records == record_header(5, "block", 4_000_000) + bytes(4_000_000)
    assert pipe.incomplete == 0
    # A 4,000,013-byte contents is the largest; one more is fatal on its length bytes.
    longest = client.encrypt_contents(b"\0" + b"foo".ljust(12, b"\0") + bytes(4_000_000))
    assert pipe.feed(longest, 9)[0] == 1
    over = client.encrypt_contents(b"\0" + b"foo".ljust(12, b"\0") + bytes(4_000_001))
    count, _, _, _, error = pipe.feed(over[:3], 10)
    assert count == 0 and error is not None
    assert pipe_error(error).reason is V2ErrorReason.OVERSIZE
    assert pipe.feed(b"more", 11) == (0, b"", b"", None, None)


# --- through the proxy, after the handshake (the native path) --------------------------


@pytest.mark.parametrize("case", ["bad tag", "oversize packet", "decoys"])
async def test_relay_after_the_handshake(tmp_path: Path, case: str) -> None:
    """Once a message has crossed (both legs set up, the native step in charge), a read
    holding a good packet and then a bad tag, an oversize length or a flood of decoys:
    the good message is captured and forwarded, then the stream ends (or the decoys are
    reported) as on the Python path."""
    peer = EchoPeer(TIMEOUT)
    cap = tmp_path / "cap"
    async with (
        Upstream(peer) as up,
        running_proxy(tmp_path, v2="decrypt", route=route_to(up.port)) as proxy,
    ):
        client = await v2_client(proxy.addresses[0][1], TIMEOUT)
        client.send("ping", b"first")
        assert await client.receive(1) == [("ping", b"first")]
        s = client.session
        good = s.encrypt_message("ping", b"second")
        if case == "bad tag":
            bad = bytearray(s.encrypt_message("ping", b"third"))
            bad[-1] ^= 1
            client.w.write(good + bytes(bad))
            event = "v2_error"
        elif case == "oversize packet":
            client.w.write(good + s.encrypt_contents(bytes(4_000_014))[:3])
            event = "v2_error"
        else:
            client.w.write(good + b"".join(s.encrypt_decoy(10) for _ in range(1000)))
            event = "v2_decoys"

        def seen() -> bool:
            return any(e["event"] == event and (event != "v2_error" or case in e.get("reason", ""))
                       for e in read_events(cap))  # fmt: skip

        with contextlib.suppress(TimeoutError):
            await wait_until_async(lambda: seen() and len(peer.ends[0].got) >= 2, TIMEOUT, event)
        assert seen(), read_events(cap)
        assert peer.ends[0].got == [("ping", b"first"), ("ping", b"second")]
        if case == "decoys":  # the connection goes on
            client.send("ping", b"after")
            assert (await client.receive(3))[-1] == ("ping", b"after")
        client.w.close()
    sent = [m for m in captured_messages(tmp_path, up.port) if m[0] == "sent"]
    assert sent[:2] == [("sent", "ping", b"first"), ("sent", "ping", b"second")]
