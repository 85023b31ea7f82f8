"""The direct payload-to-JSON renderers (Python and native) agree with the typed classes,
value for value and on which payloads they reject, and why: the same error at the same
payload offset."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgcap.capture.records import Record, read_records
from msgcap.parser.fastjson import FAST_BODIES, NATIVE, fast_body, native_body, python_body
from msgcap.parser.messages import MESSAGES, AddrV2, decode_message
from msgcap.parser.structures import ADDRV2_LENGTHS, AddressV2, Net
from msgcap.parser.wire import DecodeError, display_hash, wire_hash
from tests.conftest import BATCH_ARGUMENTS, MUTATIONS, PAIR_A, mutated, packed_plan
from tests.vectors import VECTORS

_fastjson: Any
try:
    from msgcap.parser import _fastjson
except ImportError:
    _fastjson = None


def rejection(e: DecodeError) -> tuple[str, str, int, str]:
    """What a renderer reports about a payload it rejects; all three must say the same."""
    return ("error", e.msgtype, e.offset, e.reason)


def typed(msgtype: str, payload: bytes, reverse: bool) -> Any:
    try:
        msg = decode_message(msgtype, payload)
    except DecodeError as e:
        return rejection(e)
    return msg.json(display_hash if reverse else wire_hash)


def fast(msgtype: str, payload: bytes, reverse: bool) -> Any:
    """The Python renderer's body; the native one's too, which must be the same."""
    try:
        body = python_body(msgtype, payload, reverse)
    except DecodeError as e:
        body = rejection(e)
    if NATIVE:
        try:
            native = json.loads(native_body(msgtype, payload, reverse))
        except DecodeError as e:
            native = rejection(e)
        assert native == body
    return body


def _real_payloads() -> dict[str, list[bytes]]:
    """A few payloads of each fast-path type: from Core's own capture (one per distinct
    size, the three largest), then the frozen vector (the only one for the types the
    session did not send, such as blocktxn and notfound)."""
    by_size: dict[str, dict[int, bytes]] = {t: {} for t in FAST_BODIES}
    for path in sorted(PAIR_A.glob("msgs_*.dat")):
        with path.open("rb") as f:
            for rec in read_records(f):
                if isinstance(rec, Record):
                    name = rec.raw_msgtype.split(b"\0", 1)[0].decode("ascii", "replace")
                    if name in by_size:
                        by_size[name].setdefault(len(rec.payload), rec.payload)
    return {
        t: [sizes[n] for n in sorted(sizes, reverse=True)[:3]] + [bytes.fromhex(VECTORS[t])]
        for t, sizes in by_size.items()
    }


REAL = _real_payloads()


def _native_built() -> bool:
    try:
        importlib.import_module("msgcap.parser._fastjson")
    except ImportError:
        return False
    return True


def test_native_renderer_is_built_where_required() -> None:
    """Built where required (CI); in use exactly when built and not turned off with
    MSGCAP_PURE_PYTHON, and then the renderer the parser calls (fast_body) is the native
    one; skipped (visibly) only where it is genuinely not built and not required."""
    built = _native_built()
    pure = bool(os.environ.get("MSGCAP_PURE_PYTHON"))
    if os.environ.get("MSGCAP_REQUIRE_NATIVE"):
        assert built, "parser/_fastjson.c was not compiled"
    assert NATIVE == (built and not pure), (built, pure)
    inv = bytes.fromhex(VECTORS["inv"])
    body = fast_body("inv", inv, False)  # what `msgcap parse` renders with
    if NATIVE:
        assert isinstance(body, orjson.Fragment)  # JSON text from parser/_fastjson.c
        assert json.loads(orjson.dumps(body)) == python_body("inv", inv, False)
    else:
        assert isinstance(body, dict)  # the Python renderer's
    if not built:
        pytest.skip("parser/_fastjson.c not compiled (no C compiler at install); not required")


@pytest.mark.parametrize("msgtype", sorted(FAST_BODIES))
@pytest.mark.parametrize("reverse", [False, True])
def test_vectors_agree(msgtype: str, reverse: bool) -> None:
    payload = bytes.fromhex(VECTORS[msgtype])
    assert fast(msgtype, payload, reverse) == typed(msgtype, payload, reverse) != "error"


@settings(max_examples=1500, deadline=None)
@given(msgtype=st.sampled_from(sorted(FAST_BODIES)), reverse=st.booleans(), **MUTATIONS)
def test_mutated_payloads_agree(
    msgtype: str, flips: list[tuple[int, int]], cut: int, extra: bytes, reverse: bool
) -> None:
    data = mutated(bytes.fromhex(VECTORS[msgtype]), flips, cut, extra)
    assert fast(msgtype, data, reverse) == typed(msgtype, data, reverse)


@settings(max_examples=500, deadline=None)
@given(msgtype=st.sampled_from(sorted(FAST_BODIES)), data=st.binary(max_size=200))
def test_random_payloads_agree(msgtype: str, data: bytes) -> None:
    assert fast(msgtype, data, False) == typed(msgtype, data, False)


def test_real_payloads_cover_the_bulk_types() -> None:
    from_capture = {t for t, ps in REAL.items() if len(ps) > 1}
    assert from_capture >= {"block", "cmpctblock", "getdata", "headers", "inv", "tx"}


@pytest.mark.parametrize("msgtype", sorted(FAST_BODIES))
def test_truncated_real_payloads_fail_alike(msgtype: str) -> None:
    """Every cut of real payloads (and one trailing byte): the typed codec, the Python
    renderer and the native one reject it with the same reason at the same offset."""
    renderers = {"Python": python_body} | ({"native": native_body} if NATIVE else {})
    for payload in REAL[msgtype]:
        cuts = [payload[:cut] for cut in range(len(payload))] + [payload + b"\0"]
        for data in cuts:
            want = typed(msgtype, data, False)
            assert want[:2] == ("error", msgtype), (len(data), want)
            for name, render in renderers.items():
                try:
                    render(msgtype, data, False)
                except DecodeError as e:
                    assert rejection(e) == want, len(data)
                else:
                    raise AssertionError(f"{name} renderer accepted {len(data)} bytes: {want}")


# --- the native renderer of every type (whole runs of records use it) --------------------

ALL_TYPES = sorted(MESSAGES)

_ADDRV2 = [
    AddressV2(1_700_000_000, 0x409, Net.IPV4, bytes([203, 0, 113, 7]), 8333),
    AddressV2(5, 2**64 - 1, Net.IPV6, bytes.fromhex("20010db8000000000000000000000001"), 1),
    AddressV2(6, 0, Net.IPV6, bytes.fromhex("00000000000000000000ffff7f000001"), 0),
    AddressV2(7, 1, Net.CJDNS, bytes.fromhex("fc000000000000000000000000000001"), 65535),
]
EXTRA: list[tuple[str, bytes]] = [
    ("addrv2", AddrV2(tuple(_ADDRV2)).encode()),
    ("addrv2", AddrV2(()).encode()),
    ("addr", b"\x00"),
    ("version", bytes.fromhex(VECTORS["version"])[:-1]),  # no relay byte
]


def native(msgtype: str, payload: bytes, reverse: bool) -> Any:
    """The native renderer's body (parsed), its rejection, or None when it leaves the
    payload to Python."""
    assert _fastjson is not None
    try:
        text = _fastjson.render(msgtype, payload, reverse)
    except ValueError as e:
        reason, offset = e.args
        return ("error", msgtype, offset, reason)
    return None if text is None else json.loads(text)


def native_agrees(msgtype: str, payload: bytes, reverse: bool) -> bool:
    """The native renderer gives what the typed classes give, or leaves it to Python;
    True if it rendered it (or rejected it) itself."""
    got = native(msgtype, payload, reverse)
    if got is None:
        return False
    assert got == typed(msgtype, payload, reverse), (msgtype, payload.hex())
    return True


needs_native = pytest.mark.skipif(_fastjson is None, reason="parser/_fastjson.c not compiled")


@needs_native
@pytest.mark.parametrize("reverse", [False, True])
def test_native_renders_every_type(reverse: bool) -> None:
    vectors = [(t, bytes.fromhex(VECTORS[t])) for t in ALL_TYPES] + EXTRA
    rendered = {t for t, payload in vectors if native_agrees(t, payload, reverse)}
    # addrv2's vector holds TorV3 and I2P addresses: their names are Python's to write
    assert rendered == set(ALL_TYPES), set(ALL_TYPES) - rendered


@needs_native
def test_native_leaves_unusual_text_to_python() -> None:
    version = bytes.fromhex(VECTORS["version"])
    ua = b"/Satoshi:30.0.0/"
    assert ua in version
    for odd in (b'/"quoted"/', b"/back\\slash/", b"/tab\t/", "/é/".encode(), b"/\xff/"):
        payload = version.replace(b"\x10" + ua, bytes([len(odd)]) + odd)
        assert native("version", payload, False) is None
        typed("version", payload, False)  # Python renders it, or words why not


@needs_native
@settings(max_examples=3000, deadline=None)
@given(msgtype=st.sampled_from(ALL_TYPES), reverse=st.booleans(), **MUTATIONS)
def test_native_mutated_payloads_agree(
    msgtype: str, flips: list[tuple[int, int]], cut: int, extra: bytes, reverse: bool
) -> None:
    payload = bytes.fromhex(VECTORS[msgtype]) or b"\0"
    native_agrees(msgtype, mutated(payload, flips, cut, extra), reverse)


@needs_native
@settings(max_examples=1500, deadline=None)
@given(msgtype=st.sampled_from(ALL_TYPES), data=st.binary(max_size=200))
def test_native_random_payloads_agree(msgtype: str, data: bytes) -> None:
    native_agrees(msgtype, data, False)


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    addrs=st.lists(
        st.builds(
            AddressV2,
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**64 - 1),
            st.sampled_from([Net.IPV4, Net.IPV6, Net.CJDNS]),
            st.just(b""),
            st.integers(0, 65535),
        ),
        max_size=5,
    ),
    raw=st.lists(st.binary(min_size=16, max_size=16), min_size=5, max_size=5),
)
def test_native_ip_addresses_agree(addrs: list[AddressV2], raw: list[bytes]) -> None:
    """IPv6 text is inet_ntop's, in both renderers (compressed zeros, IPv4-mapped)."""
    full = [
        AddressV2(a.time, a.services, a.net, r[: ADDRV2_LENGTHS[a.net]], a.port)
        for a, r in zip(addrs, raw, strict=False)
    ]
    assert native_agrees("addrv2", AddrV2(tuple(full)).encode(), False)


@needs_native
@settings(max_examples=1000, deadline=None)
@given(
    run=st.integers(-1, 4),
    used=st.integers(-1, 20),
    limit=st.integers(-1, 100),
    first=st.booleans(),
    **BATCH_ARGUMENTS,
)
def test_batch_functions_take_any_arguments_safely(
    chunks: list[bytes], plan: list[int], run: int, pos: int, used: int, limit: int, first: bool
) -> None:
    """Arguments that do not describe whole records raise ValueError; nothing else
    happens (run under AddressSanitizer too: see the report of issue 11). The capture
    module's plan and tally: tests/test_records.py."""
    packed = packed_plan(plan)
    out = bytearray(b"x" * 10)
    looks = [(b"{", b"}")] * len(chunks)
    opts = (b",", b"", False, 0, 2**64 - 1, None)
    try:
        _fastjson.render_batch(out, used, limit, chunks, packed, run, pos, looks, opts, first)
    except ValueError:
        pass
