"""Captures as fuzzing corpora and as pcap files.

- :func:`export_fuzz`: one file per captured message, a complete v1 wire message
  (magic, header with checksum, payload), named by the SHA-1 of its bytes (libFuzzer's
  convention, so duplicates collapse). With ``payloads=True``, the bare payloads instead,
  in one folder per message type, for Core's ``*_deserialize`` targets.
- :func:`export_pcap`: one synthetic TCP connection per capture folder, with a
  three-way handshake, correct sequence and acknowledgement numbers, messages split into
  segments and the recorded timestamps, for Wireshark's Bitcoin dissector.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from msgcap.capture.conversation import DamageReport, conversation, folder_conversation, warn_damage
from msgcap.capture.framing import encode_raw_frame
from msgcap.capture.layout import CapturePath
from msgcap.capture.records import Direction, Record


@dataclass(frozen=True, slots=True)
class FuzzExport:
    messages: int
    written: int
    """New files (the others were already there: same bytes, same name)."""
    distinct: int


def export_fuzz(
    paths: Iterable[Path],
    out: Path,
    magic: bytes,
    *,
    payloads: bool = False,
    on_damage: DamageReport = warn_damage,
) -> FuzzExport:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    messages = written = 0
    for item in conversation(paths, on_damage):
        rec = item.record
        messages += 1
        if payloads:
            name = rec.msgtype.label
            if not re.fullmatch(r"[a-z0-9]+", name):
                continue
            data = rec.payload
            folder = out / name
        else:
            data = encode_raw_frame(magic, rec.raw_msgtype, rec.payload)
            folder = out
        digest = hashlib.sha1(data).hexdigest()
        key = f"{folder.name}/{digest}" if payloads else digest
        if key in seen:
            continue
        seen.add(key)
        folder.mkdir(exist_ok=True)
        target = folder / digest
        if not target.exists():
            target.write_bytes(data)
            written += 1
    return FuzzExport(messages, written, len(seen))


# --- pcap ------------------------------------------------------------------------------

_PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)  # Ethernet
_ETHER = bytes.fromhex("0200000000020200000000010800")
_MSS = 1460
SYN, FIN, ACK, PSH = 0x02, 0x01, 0x10, 0x08


def _ip_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(slots=True)
class _Endpoint:
    ip: bytes
    port: int
    seq: int


class _Conversation:
    def __init__(self, out: BinaryIO, a: _Endpoint, b: _Endpoint) -> None:
        self.out = out
        self.ends = (a, b)

    def packet(self, when_us: int, sender: int, flags: int, data: bytes = b"") -> None:
        src, dst = self.ends[sender], self.ends[1 - sender]
        ack = dst.seq if flags & ACK else 0
        tcp = struct.pack(
            "!HHIIBBHHH", src.port, dst.port, src.seq, ack, 5 << 4, flags, 65535, 0, 0
        )
        pseudo = src.ip + dst.ip + struct.pack("!BBH", 0, 6, len(tcp) + len(data))
        tcp = tcp[:16] + struct.pack("!H", _ip_checksum(pseudo + tcp + data)) + tcp[18:]
        total = 20 + len(tcp) + len(data)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, src.ip, dst.ip)
        ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
        frame = _ETHER + ip + tcp + data
        when_us = min(max(when_us, 0), 0xFFFFFFFF * 1_000_000)  # pcap has 32-bit seconds
        self.out.write(struct.pack("<IIII", when_us // 1_000_000, when_us % 1_000_000,
                                   len(frame), len(frame)))  # fmt: skip
        self.out.write(frame)
        src.seq = (src.seq + len(data) + (1 if flags & (SYN | FIN) else 0)) & 0xFFFFFFFF


def _peer_endpoint(folder: Path, index: int) -> tuple[bytes, int]:
    """The peer's IPv4 address and port from its folder name, or a stand-in."""
    host, port = CapturePath.of_folder(folder).peer_host_port or ("", 8333)
    try:
        return ipaddress.IPv4Address(host).packed, port
    except ValueError:
        return ipaddress.IPv4Address(f"10.0.1.{index % 250 + 1}").packed, port


def _folder_messages(folder: Path, on_damage: DamageReport) -> list[tuple[int, int, Record]]:
    """(time, side, record): side 0 is the node (sent), 1 the peer (recv)."""
    return [
        (item.record.time, int(item.direction is Direction.RECV), item.record)
        for item in folder_conversation(folder, on_damage)
    ]


def capture_folders(paths: Iterable[Path]) -> list[Path]:
    folders: set[Path] = set()
    for p in paths:
        if p.is_dir():
            folders.update(f.parent for f in p.rglob("*.dat"))
        else:
            folders.add(p.parent)
    return sorted(folders)


def export_pcap(
    paths: Iterable[Path], out: Path, magic: bytes, on_damage: DamageReport = warn_damage
) -> int:
    """Write a pcap with one TCP connection per capture folder; returns the message count."""
    count = 0
    with open(out, "wb") as f:
        f.write(_PCAP_HEADER)
        for i, folder in enumerate(capture_folders(paths)):
            messages = _folder_messages(folder, on_damage)
            if not messages:
                continue
            peer_ip, peer_port = _peer_endpoint(folder, i)
            node = _Endpoint(bytes([10, 0, 0, 1]), 40000 + i % 20000, 1_000_000 * (i + 1))
            peer = _Endpoint(peer_ip, peer_port, 2_000_000 * (i + 1))
            conv = _Conversation(f, node, peer)
            # The side that sent the first version dialed the connection.
            first_version = next((s for _, s, r in messages if r.msgtype.name == b"version"), 0)
            client = first_version
            t0 = messages[0][0] - 3
            conv.packet(t0, client, SYN)
            conv.packet(t0 + 1, 1 - client, SYN | ACK)
            conv.packet(t0 + 2, client, ACK)
            for when, side, rec in messages:
                data = encode_raw_frame(magic, rec.raw_msgtype, rec.payload)
                for k in range(0, len(data), _MSS):
                    conv.packet(when, side, ACK | PSH, data[k : k + _MSS])
                count += 1
            end = messages[-1][0] + 1
            conv.packet(end, client, FIN | ACK)
            conv.packet(end + 1, 1 - client, FIN | ACK)
            conv.packet(end + 2, client, ACK)
    return count
