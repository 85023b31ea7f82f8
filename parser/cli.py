"""``msgcap parse`` and ``msgcap stats``.

``parse`` prints the JSON array Core's message-capture-parser.py prints, streamed in time
order with bounded memory; ``--jsonl`` gives one object per line. Damaged files produce
one warning each, naming the file and byte offset, and everything readable is output.
Exit status: 0 when all input was valid, 1 when anything was skipped or undecodable,
2 for bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import gc
import os
import shutil
import sys
import time
from collections import Counter
from typing import IO

from msgcap.capture import report
from msgcap.capture.conversation import CaptureFile, Item, expand_paths, merged_batches
from msgcap.capture.errors import UsageError
from msgcap.capture.framing import HEADER_SIZE, MsgType
from msgcap.capture.records import RecordFilter
from msgcap.parser.render import BatchRenderer, Problem

_MAX_WARNINGS_PER_KIND = 10


def parse_time(text: str) -> int:
    """Microseconds since the epoch from an integer or an ISO 8601 time (UTC if naive)."""
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither microseconds since the epoch nor an ISO 8601 time"
        ) from e
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1_000_000)


def _split_list(values: list[str] | None) -> set[str] | None:
    if not values:
        return None
    return {v.strip() for value in values for v in value.split(",") if v.strip()}


def add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="FILE", help="capture files or folders of them")
    p.add_argument("--type", action="append", metavar="T[,T...]", help="only these types")
    p.add_argument("--direction", choices=("recv", "sent"), help="only this direction")
    p.add_argument(
        "--peer", action="append", metavar="NAME", help="only these peer folders (glob patterns)"
    )
    p.add_argument("--since", type=parse_time, metavar="TIME", help="µs since epoch or ISO time")
    p.add_argument("--until", type=parse_time, metavar="TIME", help="µs since epoch or ISO time")


def add_parse_args(p: argparse.ArgumentParser) -> None:
    add_selection_args(p)
    p.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per line")
    p.add_argument(
        "--display-hashes", action="store_true", help="hashes in RPC byte order, not wire order"
    )
    p.add_argument(
        "--with-peer", action="store_true", help='add "peer" (the capture folder) to each message'
    )
    p.add_argument("-n", "--no-progress-bar", action="store_true", help="never show progress")


class Warnings(report.Warnings):
    """``parse`` and ``stats``: at most a few warnings per kind and file, then a count;
    invalid input (a problem with a message as recorded) counts as damage does."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream, per_kind=_MAX_WARNINGS_PER_KIND)

    def problem(self, item: Item, p: Problem) -> None:
        if not p.valid_input:
            self.failed += 1
        self.emit(item.source.path, p.kind, f"offset {item.record.offset}: {p.detail}")


def select_files(args: argparse.Namespace, files: list[CaptureFile]) -> list[CaptureFile]:
    """The files that pass the peer and direction filters."""
    patterns = _split_list(args.peer)
    if patterns is not None:
        files = [f for f in files if any(fnmatch.fnmatchcase(f.peer, p) for p in patterns)]
    if args.direction is not None:
        files = [f for f in files if f.direction.value == args.direction]
    return files


def record_filter(args: argparse.Namespace) -> RecordFilter:
    """The time window and message types to take."""
    types = _split_list(args.type)
    wanted = None if types is None else {t.encode("utf-8", "surrogateescape") for t in types}
    return RecordFilter(args.since, args.until, None if wanted is None else frozenset(wanted))


class Progress:
    """A one-line progress bar on a terminal, by bytes of input consumed."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self._next = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self._next:
            self._next = now + 0.1
            self.draw()

    def draw(self) -> None:
        cols = shutil.get_terminal_size().columns
        width = max(cols - 10, 10)
        frac = min(self.done / self.total, 1.0)
        filled = int(width * frac)
        self.stream.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {frac * 100:3.0f}%")
        self.stream.flush()

    def finish(self) -> None:
        self.done = self.total
        self.draw()
        self.stream.write("\n")
        self.stream.flush()


def run_parse(args: argparse.Namespace) -> int:
    files = expand_paths(args.paths)
    warn = Warnings(sys.stderr)
    out: IO[bytes]
    if args.output:
        try:
            out = open(args.output, "wb")
        except OSError as e:
            raise UsageError(f"cannot write {args.output}: {e.strerror}") from e
    else:
        out = sys.stdout.buffer
    progress = None
    if args.output and not args.no_progress_bar and sys.stderr.isatty():
        progress = Progress(sum(os.path.getsize(f.path) for f in files), sys.stderr)
    renderer = BatchRenderer(
        out,
        jsonl=args.jsonl,
        display_hashes=args.display_hashes,
        with_peer=args.with_peer,
        selection=record_filter(args),
        on_problem=warn.problem,
    )
    # Records the native renderer leaves to Python build many short-lived, acyclic
    # containers: the cycle collector would only rescan them, so it is paused.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if not args.jsonl:
            out.write(b"[")
        for batch in merged_batches(select_files(args, files), warn.damage):
            renderer.render(batch)
            if progress is not None:
                progress.advance(batch.size)
        renderer.flush()
        if not args.jsonl:
            out.write(b"]\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        if gc_was_enabled:
            gc.enable()
        if args.output:
            out.close()
    if progress is not None:
        progress.finish()
    warn.summary()
    return warn.exit_status


def run_stats(args: argparse.Namespace) -> int:
    files = expand_paths(args.paths)
    warn = Warnings(sys.stderr)
    counts: Counter[tuple[str, str, str]] = Counter()
    sizes: Counter[tuple[str, str, str]] = Counter()
    selection = record_filter(args)
    for batch in merged_batches(select_files(args, files), warn.damage):
        for source, by_name in zip(batch.sources, batch.tally(selection), strict=True):
            peer = source.peer if source.node is None else f"{source.node}/{source.peer}"
            for name, (n, size) in by_name.items():
                key = (peer, source.direction.value, MsgType.of(name).label)
                counts[key] += n
                sizes[key] += size
    rows: list[tuple[str, ...]] = [("peer", "direction", "msgtype", "messages", "bytes")]
    totals: Counter[tuple[str, str]] = Counter()
    total_sizes: Counter[tuple[str, str]] = Counter()
    for key in sorted(counts, key=lambda k: (k[0], k[1], -sizes[k], k[2])):
        rows.append((*key, str(counts[key]), str(sizes[key])))
        totals[key[:2]] += counts[key]
        total_sizes[key[:2]] += sizes[key]
    for pd in sorted(totals):
        rows.append((*pd, "(all)", str(totals[pd]), str(total_sizes[pd])))
    rows.append(("(all)", "", "", str(sum(counts.values())), str(sum(sizes.values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        left = "  ".join(c.ljust(w) for c, w in zip(r[:3], widths[:3], strict=True))
        right = "  ".join(c.rjust(w) for c, w in zip(r[3:], widths[3:], strict=True))
        print(f"{left}  {right}")
    print(f"(bytes are payload bytes; each message adds a {HEADER_SIZE}-byte header on the wire)")
    warn.summary()
    return 1 if warn.damaged else 0
