"""The ``msgcap`` command: one entry point for every subcommand.

Exit status: 0 on success, 2 on bad usage or config (with a one-line reason), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from parser.cli import add_parse_args, add_selection_args, run_parse, run_stats
from parser.sources import UsageError


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"msgcap: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    top = _ArgumentParser(
        prog="msgcap",
        description="Capture, decode and replay Bitcoin P2P traffic in Bitcoin Core's "
        "-capturemessages format.",
    )
    sub = top.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    p = sub.add_parser("parse", help="decode capture files to JSON (Core's parser, faster)")
    add_parse_args(p)
    p.set_defaults(run=run_parse)
    s = sub.add_parser("stats", help="messages and bytes per peer, direction and type")
    add_selection_args(s)
    s.set_defaults(run=run_stats)
    return top


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except UsageError as e:
        print(f"msgcap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
