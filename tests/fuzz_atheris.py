"""Coverage-guided fuzzing of msgcap's parsers with atheris (libFuzzer for Python).

    python tests/fuzz_atheris.py TARGET -max_total_time=SECONDS

Targets: framing, records, messages, render, hostnames. Each raises only the documented
errors (StreamError from the frame decoder, DecodeError from message decoders) and
nothing else; anything else is a crash libFuzzer reports with the input that caused it.
"""

from __future__ import annotations

import io
import sys

import atheris

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

with atheris.instrument_imports():
    from msgcap.capture.framing import NEED_DATA, FrameDecoder, MsgType, Network, StreamError
    from msgcap.capture.records import Damage, Direction, Record, encode_record, read_records
    from msgcap.parser.messages import MESSAGES, decode_message
    from msgcap.parser.render import render
    from msgcap.parser.wire import DecodeError, wire_hash
    from msgcap.proxy.socks5 import host_name_problem

TYPES = sorted(MESSAGES)
MAGIC = Network.REGTEST.magic


def framing(data: bytes) -> None:
    if not data:
        return
    step = data[0] % 64 + 1
    dec = FrameDecoder(MAGIC, max_length=10_000)
    try:
        for i in range(1, len(data), step):
            dec.receive_data(data[i : i + step])
            while dec.next_event() is not NEED_DATA:
                pass
    except StreamError:
        pass


def records(data: bytes) -> None:
    total = 0
    for item in read_records(io.BytesIO(data)):
        if isinstance(item, Record):
            total += 24 + len(item.payload)
        else:
            assert isinstance(item, Damage)
            total += item.skipped
    assert total == len(data)


def messages(data: bytes) -> None:
    if not data:
        return
    msgtype = TYPES[data[0] % len(TYPES)]
    payload = data[1:]
    try:
        msg = decode_message(msgtype, payload)
    except DecodeError:
        return
    assert msg.encode() == payload
    msg.json(wire_hash)


def render_target(data: bytes) -> None:
    if len(data) < 12:
        return
    raw_type = data[:12]
    if data[0] % 2:  # often a known type, to reach the decoders
        raw_type = TYPES[data[1] % len(TYPES)].encode().ljust(12, b"\0")
    rec = Record(0, raw_type, data[12:], 0)
    render(rec, Direction.RECV)
    render(rec, Direction.SENT, display_hashes=True)
    encode_record(0, MsgType.of(raw_type), data[12:])


def hostnames(data: bytes) -> None:
    host_name_problem(data.decode("latin-1"))


TARGETS = {
    "framing": framing,
    "records": records,
    "messages": messages,
    "render": render_target,
    "hostnames": hostnames,
}

if __name__ == "__main__":
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
