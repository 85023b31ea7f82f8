"""What a command that reads captures tells its user on stderr, and the exit status.

A command reads on past what it cannot use (DESIGN §10): a damaged stretch of a capture
file, an undecodable payload, an invalid message. Each is a line ``msgcap: warning:
FILE: offset N: REASON`` on stderr, and the command ends with exit status 1 once
everything readable was done. :class:`Warnings` is that one report for every command
(parse, stats, export, the dataset export); an error that stops a command is not a
warning but a :class:`~msgcap.capture.errors.MsgcapError`.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from msgcap.capture.conversation import CaptureFile
    from msgcap.capture.records import Damage


class Warnings:
    """Warnings on ``stream`` (standard error by default) and the exit status they lead to.

    With ``per_kind``, at most that many lines are printed per file and kind of warning;
    :meth:`summary` then says how many more there were. :meth:`damage` is a
    :data:`~msgcap.capture.conversation.DamageReport`.
    """

    def __init__(self, stream: IO[str] | None = None, per_kind: int | None = None) -> None:
        self.stream = stream
        self.per_kind = per_kind
        self.damaged = 0
        """Damaged stretches of capture files skipped."""
        self.failed = 0
        """Other things left undone (invalid input, undecodable payloads)."""
        self._counts: Counter[tuple[str, str]] = Counter()

    def warn(self, text: str) -> None:
        print(f"msgcap: warning: {text}", file=self.stream or sys.stderr)

    def note(self, text: str) -> None:
        print(f"msgcap: note: {text}", file=self.stream or sys.stderr)

    def emit(self, path: str | os.PathLike[str], kind: str, text: str) -> None:
        """``FILE: text``, unless ``per_kind`` lines of this file and kind were printed."""
        key = (os.fspath(path), kind)
        self._counts[key] += 1
        if self.per_kind is None or self._counts[key] <= self.per_kind:
            self.warn(f"{key[0]}: {text}")

    def damage(self, source: CaptureFile, d: Damage) -> None:
        self.damaged += 1
        self.emit(
            source.path, "damage", f"offset {d.offset}: {d.reason} ({d.skipped} bytes skipped)"
        )

    def summary(self) -> None:
        """How many lines ``per_kind`` held back, per file and kind."""
        if self.per_kind is None:
            return
        for (path, kind), n in self._counts.items():
            if n > self.per_kind:
                self.warn(f"{path}: {n - self.per_kind} more like the above ({kind})")

    @property
    def exit_status(self) -> int:
        return 1 if self.damaged or self.failed else 0
