"""Two captures of one session, message by message (timestamps aside).

The check a capture must pass: run a node through the proxy with Core's own
``-capturemessages`` on, and the proxy's folder for a peer and Core's folder for the same
peer must hold the same messages, in the same order, in the same direction. With
``mirror`` the two folders are the two ends of one connection (node A's capture of B
and node B's capture of A), so A's ``recv`` is compared with B's ``sent`` and the other
way round.

Both files of a pair are streamed side by side: memory stays bounded by two records.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from msgcap.capture.conversation import CaptureFile, file_records
from msgcap.capture.records import Damage, Direction


@dataclass(frozen=True, slots=True)
class Message:
    """A record as the comparison sees it: its position, type and payload."""

    index: int
    msgtype: str
    payload: bytes

    def describe(self) -> str:
        digest = hashlib.sha256(self.payload).hexdigest()[:16]
        return f"#{self.index} {self.msgtype} ({len(self.payload)} bytes, sha256 {digest}…)"


@dataclass(slots=True)
class PairResult:
    """The comparison of one file of A with one file of B."""

    a_file: Path
    b_file: Path
    a_count: int = 0
    b_count: int = 0
    matched: int = 0
    """Messages equal from the start, before the first difference."""
    first_a: Message | None = None
    """A's message where they first differ (None: A ended there)."""
    first_b: Message | None = None
    differs: bool = False
    type_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(in A, in B) for each type whose counts differ."""
    damage: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differs and not self.damage

    def summary(self) -> str:
        head = f"{self.a_file} ({self.a_count}) vs {self.b_file} ({self.b_count}): "
        if self.identical:
            return head + "identical (types and payloads, in order)"
        lines = [head + f"the first {self.matched} agree"]
        if self.differs:
            a = self.first_a.describe() if self.first_a else "(A ends)"
            b = self.first_b.describe() if self.first_b else "(B ends)"
            lines.append(f"  first difference: A {a} / B {b}")
        for msgtype, (in_a, in_b) in sorted(self.type_counts.items()):
            lines.append(f"  {msgtype}: {in_a} in A, {in_b} in B")
        lines += [f"  damage: {d}" for d in self.damage]
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        def msg(m: Message | None) -> dict[str, object] | None:
            if m is None:
                return None
            return {"index": m.index, "msgtype": m.msgtype, "size": len(m.payload),
                    "sha256": hashlib.sha256(m.payload).hexdigest()}  # fmt: skip

        return {
            "a": str(self.a_file),
            "b": str(self.b_file),
            "identical": self.identical,
            "a_count": self.a_count,
            "b_count": self.b_count,
            "matched": self.matched,
            "first_difference": {"a": msg(self.first_a), "b": msg(self.first_b)}
            if self.differs
            else None,
            "type_counts": {t: {"a": a, "b": b} for t, (a, b) in sorted(self.type_counts.items())},
            "damage": self.damage,
        }


def _messages(path: Path, damage: list[str]) -> Iterator[Message]:
    """The file's records in time order; a missing file has none; damage is noted."""
    if not path.exists():
        return

    def noted(source: CaptureFile, d: Damage) -> None:
        damage.append(f"{source.path} at byte {d.offset}: {d.reason}")

    for i, item in enumerate(file_records(CaptureFile.at(path), noted)):
        rec = item.record
        yield Message(i, rec.msgtype.label, rec.payload)


def compare_files(a_file: Path, b_file: Path) -> PairResult:
    result = PairResult(a_file, b_file)
    counts: dict[str, Counter[str]] = {"a": Counter(), "b": Counter()}
    a_iter = _messages(a_file, result.damage)
    b_iter = _messages(b_file, result.damage)
    while True:
        a = next(a_iter, None)
        b = next(b_iter, None)
        if a is None and b is None:
            break
        if a is not None:
            result.a_count += 1
            counts["a"][a.msgtype] += 1
        if b is not None:
            result.b_count += 1
            counts["b"][b.msgtype] += 1
        same = a is not None and b is not None and (a.msgtype, a.payload) == (b.msgtype, b.payload)
        if same and not result.differs:
            result.matched += 1
        elif not result.differs:
            result.differs, result.first_a, result.first_b = True, a, b
    for msgtype in counts["a"].keys() | counts["b"].keys():
        in_a, in_b = counts["a"][msgtype], counts["b"][msgtype]
        if in_a != in_b:
            result.type_counts[msgtype] = (in_a, in_b)
    return result


def compare_folders(a: Path, b: Path, mirror: bool = False) -> list[PairResult]:
    """Compare the recv and sent files of two capture folders (see the module doc)."""
    pairs = []
    for direction in (Direction.RECV, Direction.SENT):
        other = direction.opposite if mirror else direction
        pairs.append(compare_files(a / direction.file_name, b / other.file_name))
    return pairs
