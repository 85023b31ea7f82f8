"""The direct payload-to-JSON renderers (Python and native) agree with the typed classes,
value for value and on which payloads they reject."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parser.fastjson import FAST_BODIES, NATIVE, native_body, python_body
from parser.messages import decode_message
from parser.wire import DecodeError, display_hash, wire_hash
from tests.vectors import VECTORS


def typed(msgtype: str, payload: bytes, reverse: bool) -> Any:
    try:
        msg = decode_message(msgtype, payload)
    except DecodeError:
        return "error"
    return msg.json(display_hash if reverse else wire_hash)


def fast(msgtype: str, payload: bytes, reverse: bool) -> Any:
    """The Python renderer's body; the native one's too, which must be the same."""
    try:
        body = python_body(msgtype, payload, reverse)
    except DecodeError:
        body = "error"
    if NATIVE:
        try:
            native = json.loads(native_body(msgtype, payload, reverse))
        except DecodeError:
            native = "error"
        assert native == body
    return body


def test_native_renderer_is_built_where_required() -> None:
    if os.environ.get("MSGCAP_REQUIRE_NATIVE"):
        assert NATIVE, "parser/_fastjson.c was not compiled"


@pytest.mark.parametrize("msgtype", sorted(FAST_BODIES))
@pytest.mark.parametrize("reverse", [False, True])
def test_vectors_agree(msgtype: str, reverse: bool) -> None:
    payload = bytes.fromhex(VECTORS[msgtype])
    assert fast(msgtype, payload, reverse) == typed(msgtype, payload, reverse) != "error"


@settings(max_examples=1500, deadline=None)
@given(
    msgtype=st.sampled_from(sorted(FAST_BODIES)),
    flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 100_000),
    extra=st.binary(max_size=3),
    reverse=st.booleans(),
)
def test_mutated_payloads_agree(
    msgtype: str, flips: list[tuple[int, int]], cut: int, extra: bytes, reverse: bool
) -> None:
    payload = bytearray.fromhex(VECTORS[msgtype])
    for pos, value in flips:
        payload[pos % len(payload)] = value
    data = bytes(payload[: cut % (len(payload) + 1)]) + extra
    assert fast(msgtype, data, reverse) == typed(msgtype, data, reverse)


@settings(max_examples=500, deadline=None)
@given(msgtype=st.sampled_from(sorted(FAST_BODIES)), data=st.binary(max_size=200))
def test_random_payloads_agree(msgtype: str, data: bytes) -> None:
    assert fast(msgtype, data, False) == typed(msgtype, data, False)
