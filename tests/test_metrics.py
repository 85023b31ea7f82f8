"""Prometheus metrics, scraped from a proxy while it relays, against its capture."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from msgcap.capture.conversation import folder_conversation
from msgcap.capture.framing import encode_frame
from tests.conftest import (
    MAGIC,
    Upstream,
    echo,
    logged,
    read_all,
    route_to,
    running_proxy,
    wait_until_async,
)


def scrape(host: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_what_is_captured(tmp_path: Path) -> None:
    frames = [("version", b"\x01" * 100), ("ping", b"12345678"), ("inv", bytes(37)),
              ("xyzzy", b"not a known type"), ("ping", b"87654321")]  # fmt: skip
    bad = bytearray(encode_frame(MAGIC, "tx", b"abc"))
    bad[20] ^= 1  # a bad checksum: an anomaly, not a message
    async with (
        Upstream(echo) as up,
        running_proxy(tmp_path, metrics="127.0.0.1:0", route=route_to(up.port)) as px,
    ):
        assert px.metrics_address is not None
        r, w = await asyncio.open_connection("127.0.0.1", px.addresses[0][1])
        data = b"".join(encode_frame(MAGIC, t, p) for t, p in frames) + bytes(bad)
        w.write(data)
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(len(data)), 10) == data
        await wait_until_async(logged(tmp_path / "cap", "bad_checksum", 2), 10)
        during = await asyncio.to_thread(scrape, *px.metrics_address)
        assert during[("msgcap_open_connections", ())] == 1
        w.write_eof()
        await read_all(r)
        w.close()
        await wait_until_async(logged(tmp_path / "cap", "close"), 10)
        after = await asyncio.to_thread(scrape, *px.metrics_address)
    captured: Counter[tuple[str, str]] = Counter()
    for item in folder_conversation(tmp_path / "cap" / f"127.0.0.1_{up.port}"):
        label = item.record.msgtype.label
        captured[(item.direction.value, "other" if label == "xyzzy" else label)] += 1
    counted = {
        (dict(labels)["direction"], dict(labels)["msgtype"]): value
        for (name, labels), value in during.items()
        if name == "msgcap_messages_total"
    }
    assert counted == captured  # both directions: the echo came back through the proxy
    assert counted[("sent", "other")] == 1 and counted[("recv", "ping")] == 2
    assert during[("msgcap_anomalies_total", (("kind", "bad_checksum"),))] == 2
    assert after[("msgcap_open_connections", ())] == 0
    assert after[("msgcap_capture_bytes", ())] > 0
    payload_bytes = sum(len(p) for _, p in frames) * 2
    total = sum(v for (name, _), v in after.items() if name == "msgcap_message_bytes_total")
    assert total == payload_bytes
