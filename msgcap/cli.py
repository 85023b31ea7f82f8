"""The ``msgcap`` command: one entry point for every subcommand.

Exit status: 0 on success, 2 on bad usage or config (with a one-line reason), 1 otherwise.
Whatever goes wrong ends in one line ``msgcap: error: ...`` on stderr, never a traceback
(see :func:`main`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import os
import select
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from msgcap.capture.errors import (
    ConfigError,
    MsgcapError,
    UsageError,
    describe_exception,
    describe_os_error,
)
from msgcap.capture.report import Warnings
from msgcap.parser.cli import add_parse_args, add_selection_args, run_parse, run_stats
from msgcap.parser.dataset import add_export_parquet_args, add_sql_args, run_export_parquet, run_sql
from msgcap.proxy.config import (
    DEFAULT_CONFIG,
    SCALAR_KEYS,
    Config,
    config_from_dict,
    load_toml,
)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad usage: the one error line (no usage text before it), exit status 2."""
        self.exit(_error(message, 2))


def _number(text: str) -> float:
    """A float option that is a number (``nan`` is not)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def _seconds(text: str) -> float:
    """A finite number of seconds above 0."""
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _mark(text: str) -> int:
    """A 32-bit packet mark, decimal or 0x-hex."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (decimal or 0x...)") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 32-bit mark")
    return value


def add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config (default: the built-in one)")
    g = p.add_argument_group("config keys (override the file)")
    g.add_argument("--network", help="main, testnet3, testnet4, signet or regtest")
    g.add_argument("--magic", help="custom network magic, 8 hex digits in wire order")
    g.add_argument("--capture-dir", help="where capture folders go")
    g.add_argument("--layout", choices=("core", "session"))
    g.add_argument("--v2", choices=("decrypt", "downgrade", "passthrough"), help="BIP324 policy")
    g.add_argument("--on-capture-error", choices=("continue", "stop"))
    g.add_argument("--event-log", help="JSON lines event log (default: CAPTURE_DIR/events.jsonl)")
    g.add_argument("--live", action="store_true", default=None, help="print every message")
    g.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")  # fmt: skip
    g.add_argument(
        "--route",
        action="append",
        metavar="LISTEN=PEER[@NAME]",
        help="outbound route: the node dials LISTEN, we dial PEER (replaces the file's routes); "
        "@NAME captures it as node NAME's, under CAPTURE_DIR/NAME/",
    )
    g.add_argument(
        "--inbound",
        action="append",
        metavar="LISTEN=NODE[@NAME]",
        help="inbound route: peers dial LISTEN, we dial NODE",
    )
    g.add_argument(
        "--socks5",
        action="append",
        metavar="LISTEN[@NAME]",
        help="SOCKS5 listener, repeatable (replaces the file's; 'off' for none); @NAME as above",
    )
    g.add_argument(
        "--transparent",
        action="append",
        metavar="LISTEN[@NAME]",
        help="transparent route, repeatable (replaces the file's): connections the kernel "
        "redirected to LISTEN go to their original destination; no bitcoind flag needed "
        "(rules: msgcap transparent-rules)",
    )
    g.add_argument("--transparent-node", metavar="ADDRESS",
                   help="the node's address, when msgcap runs outside the node's "
                   "network namespace")  # fmt: skip
    g.add_argument("--transparent-mark", type=_mark, metavar="MARK",
                   help="SO_MARK of the transparent route's upstream sockets (default 0x6d63; "
                   "0 for none)")  # fmt: skip
    g.add_argument("--socks5-username")
    g.add_argument("--socks5-password")
    g.add_argument("--socks5-allow", action="append", metavar="HOST:PORT-GLOB")
    for name in (
        "max-connections",
        "capture-bytes-per-peer",
        "capture-bytes-total",
        "frame-buffer-bytes",
    ):
        g.add_argument(f"--{name}", type=int)
    for name in ("handshake-timeout", "idle-timeout"):
        g.add_argument(f"--{name}", type=_number)


def proxy_config(args: argparse.Namespace) -> Config:
    try:
        return _checked(_proxy_config(args))
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a value the config checks let through
        raise ConfigError(f"bad config: {' '.join(str(e).split())}") from None


def _checked(config: Config) -> Config:
    """What the config checks let through but cannot work: a timeout that is not a
    number (TOML has ``nan``)."""
    for key in ("handshake_timeout", "idle_timeout"):
        value = getattr(config.limits, key, None)
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"limits.{key}: not a number")
    return config


def _load_config(path: Path) -> dict[str, Any]:
    try:
        return load_toml(path)
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _proxy_config(args: argparse.Namespace) -> Config:
    data: dict[str, Any] = _load_config(args.config) if args.config else dict(DEFAULT_CONFIG)
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key in SCALAR_KEYS:
        value = getattr(args, key)
        if value is not None:
            data[key] = value
    if args.network is not None and args.magic is None:
        data.pop("magic", None)
    if args.transparent and not args.config:
        # `--transparent` alone: only the transparent route, not the built-in default's
        # forward route and SOCKS5 listener (unless given as flags).
        data.pop("route", None)
        data.pop("socks5", None)
    if args.transparent:
        data["transparent"] = []
        for spec in args.transparent:
            listen, name = _node_suffix(spec)
            data["transparent"].append({"listen": listen, **name})
    for flag, key in (("transparent_node", "node"), ("transparent_mark", "mark")):
        value = getattr(args, flag)
        if value is not None:
            tables = data.get("transparent")
            if not tables:
                raise ConfigError(f"--{flag.replace('_', '-')} needs a transparent route")
            for table in tables if isinstance(tables, list) else [tables]:
                table[key] = value
    if args.route or args.inbound:
        routes = []
        for spec, key in [(s, "peer") for s in args.route or []] + [
            (s, "node") for s in args.inbound or []
        ]:
            spec, name = _node_suffix(spec)
            listen, sep, target = spec.partition("=")
            if not sep:
                raise ConfigError(f"route {spec!r}: expected LISTEN=HOST:PORT")
            routes.append({"listen": listen, key: target, **name})
        data["route"] = routes
    if args.socks5 == ["off"]:
        data.pop("socks5", None)
    elif args.socks5 is not None:
        tables = data.get("socks5", [])
        base = dict(tables[0] if isinstance(tables, list) and tables else tables or {})
        base.pop("node_name", None)
        data["socks5"] = []
        for spec in args.socks5:
            listen, name = _node_suffix(spec)
            data["socks5"].append({**base, "listen": listen, **name})
    for flag, key in (
        ("socks5_username", "username"),
        ("socks5_password", "password"),
        ("socks5_allow", "allow"),
    ):
        value = getattr(args, flag)
        if value is not None:
            if not data.get("socks5"):
                raise ConfigError(f"--{flag.replace('_', '-')} needs a SOCKS5 listener")
            tables = data["socks5"]
            for table in tables if isinstance(tables, list) else [tables]:
                table[key] = value
    limits = dict(data.get("limits", {}))
    for key in (
        "max_connections",
        "capture_bytes_per_peer",
        "capture_bytes_total",
        "frame_buffer_bytes",
        "handshake_timeout",
        "idle_timeout",
    ):
        value = getattr(args, key)
        if value is not None:
            limits[key] = value
    if limits:
        data["limits"] = limits
    return config_from_dict(data)


def _node_suffix(spec: str) -> tuple[str, dict[str, str]]:
    """``SPEC@NAME`` to ``(SPEC, {"node_name": NAME})``; no ``@``: ``(SPEC, {})``."""
    spec, sep, name = spec.partition("@")
    return spec, ({"node_name": name} if sep else {})


def run_proxy(args: argparse.Namespace) -> int:
    try:
        config = proxy_config(args)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s msgcap %(levelname)s %(message)s")
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    from msgcap.proxy.server import tune_allocator

    tune_allocator()
    try:  # a StartupError (a MsgcapError) goes to main() like any other
        return int(runner(_serve(config)))
    except OSError as e:
        return _error(str(e), 1)


async def _serve(config: Config) -> int:
    from msgcap.proxy.server import Proxy

    proxy = Proxy(config)
    stop = proxy.handle_signals()
    await proxy.start()
    text = describe(config, proxy.addresses)
    if proxy.metrics_address is not None:
        host, port = proxy.metrics_address
        text = text.replace("\n  Ctrl-C", f"\n  metrics: http://{host}:{port}/metrics\n  Ctrl-C")
    print(text, flush=True)
    with _RunFailures() as failures:
        await proxy.run_until(stop)
    if failures.count:
        more = f"{failures.count} errors, the first: " if failures.count > 1 else ""
        raise MsgcapError(f"while running: {more}{failures.first}")
    return 0


class _RunFailures(logging.Handler):
    """Errors while the proxy runs that would otherwise only be logged: exceptions asyncio
    hands to the loop (a connection task that raised, a callback that failed; logged here
    in one line) and errors msgcap logs (a capture job that failed, an event log that
    cannot be written). The proxy keeps running; at the end they make its exit status 1."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.first = ""
        self._log = logging.getLogger("msgcap")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.count == 1:
            self.first = " ".join(record.getMessage().split())

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, Exception):
            self._log.error("%s: %s", context.get("message", "asyncio"), describe_exception(error))
        else:
            loop.default_exception_handler(context)

    def __enter__(self) -> _RunFailures:
        self._log.addHandler(self)
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._loop_exception)
        return self

    def __exit__(self, *exc: object) -> None:
        self._log.removeHandler(self)
        if self._loop is not None:
            self._loop.set_exception_handler(self._previous)


def describe(config: Config, addresses: list[tuple[str, int]]) -> str:
    lines = [
        f"msgcap proxy on {config.network}: captures in {config.capture_dir}/, "
        f"events in {config.event_log_path}"
    ]
    net = "" if config.network == "main" else f"-{config.network} "
    by_node: dict[str | None, list[str]] = {}
    for route, (host, port) in zip(config.routes, addresses, strict=False):
        if route.peer is not None:
            line = (f"outbound route {host}:{port} -> {route.peer}: "
                    f"bitcoind {net}-connect={host}:{port}  (or -addnode=)")  # fmt: skip
        else:
            line = f"inbound route {host}:{port} -> node {route.node}: peers dial {host}:{port}"
        by_node.setdefault(route.node_name, []).append(line)
    for socks, (host, port) in zip(config.socks5, addresses[len(config.routes) :], strict=False):
        by_node.setdefault(socks.node_name, []).append(
            f"SOCKS5 {host}:{port}: bitcoind {net}-proxy={host}:{port} captures every "
            "outbound peer it reaches through the proxy (Core dials loopback and "
            "private addresses directly: name them, e.g. -connect=localhost:18444)"
        )
    first = len(config.routes) + len(config.socks5)
    for tp, (host, port) in zip(config.transparent, addresses[first:], strict=False):
        at = f"the node {tp.node}'s traffic" if tp.node else "the node's P2P traffic"
        by_node.setdefault(tp.node_name, []).append(
            f"transparent {host}:{port}: no bitcoind flag; redirect {at} here "
            f"(msgcap transparent-rules --listen-port {port} --node-port PORT "
            f"| nft -f -), upstream mark 0x{tp.mark:x}"
        )
    for name, node_lines in by_node.items():
        if name is None:
            lines += [f"  {line}" for line in node_lines]
            continue
        lines.append(f"  node {name} (captures in {config.capture_dir / name}/):")
        lines += [f"    {line}" for line in node_lines]
    lines.append("  Ctrl-C or SIGTERM stops it cleanly.")
    return "\n".join(lines)


def add_replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="a capture folder or files")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="HOST:PORT", action="append",
                       help="dial a live node and play to it; two or more: play the same "
                       "recording into each and report how the nodes differ")  # fmt: skip
    where.add_argument("--listen", metavar="HOST:PORT",
                       help="wait for clients (v1 or v2), play to each")  # fmt: skip
    p.add_argument("--connections", type=int, default=1, metavar="N",
                   help="with --listen: serve N connections (default 1); one closed before "
                   "it sent its version, like a probe, does not count")  # fmt: skip
    p.add_argument("--diff", action="store_true",
                   help="with --listen and --connections N: report how the N clients "
                   "differ (implied by two or more --to)")  # fmt: skip
    p.add_argument("--network", default="regtest", help="network (or 8 hex digits of magic)")
    p.add_argument("--play", choices=("peer", "node"),
                   help="side to play (default: peer with --to, node with --listen)")  # fmt: skip
    p.add_argument("--transport", choices=("v1", "v2"), default="v1",
                   help="with --to: v1 or BIP324 (v2); --listen takes either")  # fmt: skip
    p.add_argument("--fast", action="store_true",
                   help="send every recorded message at once, answers too, unasked")  # fmt: skip
    p.add_argument("--verbatim", action="store_true", help="send the recorded version as is")
    p.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds to wait for the live side (its handshake, a pong, its next "
                   "request; an unanswerable request ends the replay this long after)")  # fmt: skip
    p.add_argument("--strict", action="store_true",
                   help="exit 1 on substantive divergence")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (one line per connection)")  # fmt: skip


def run_replay(args: argparse.Namespace) -> int:
    import orjson

    from msgcap.capture.framing import parse_magic
    from msgcap.proxy.config import HostPort
    from msgcap.proxy.replay import replay_listen, replay_to
    from msgcap.proxy.replay_plan import ReplayError, load_conversation

    flag, wheres = ("--to", args.to) if args.to else ("--listen", [args.listen])
    targets = []
    for where in wheres:
        try:
            targets.append(HostPort.parse(where, flag))
        except ConfigError as e:
            raise UsageError(str(e)) from None
        except ValueError as e:  # a port HostPort let through (non-ASCII digits)
            raise UsageError(f"{flag}: {where!r} is not HOST:PORT") from e
    target = targets[0]
    try:
        magic = parse_magic(args.network)
        steps = load_conversation(args.paths)
    except (ValueError, ReplayError) as e:
        raise UsageError(str(e)) from None
    if args.connections < 1 or (args.to and args.connections != 1):
        raise UsageError("--connections takes a number from 1, and only with --listen")
    if args.to and len(targets) > 1:
        return _run_diff(args, steps, targets, _replay_options(args, magic))
    if args.diff and (args.to or args.connections < 2):
        raise UsageError("--diff compares --listen --connections N (N from 2) clients; "
                         "two or more --to compare by themselves")  # fmt: skip
    options = _replay_options(args, magic)
    if args.diff:
        return _run_diff(args, steps, targets, options)
    with _replay_failures(f"connect to {target}" if args.to else f"listen on {target}"):
        if args.to:
            reports = [asyncio.run(replay_to(steps, target.host, target.port,
                                             play=args.play or "peer", transport=args.transport,
                                             **options))]  # fmt: skip
        else:
            listening = replay_listen(steps, target.host, target.port, play=args.play or "node",
                                      connections=args.connections, **options)  # fmt: skip
            reports = asyncio.run(listening)
    texts = []  # all of them first: a failure while writing one prints none
    for i, report in enumerate(reports, 1):
        if args.json:
            texts.append(orjson.dumps(report.to_json()).decode())
        else:
            heading = f"connection {i} of {len(reports)}:\n" if len(reports) > 1 else ""
            texts.append(("\n" if i > 1 else "") + heading + report.summary())
    print("\n".join(texts))
    if len(reports) < args.connections:
        raise MsgcapError(f"{len(reports)} of {args.connections} connections arrived")
    # An error in a report (no handshake, no transport, a stream the live side broke)
    # means the replay was not carried out: that fails the command, --strict or not.
    errors = [(i, r.error) for i, r in enumerate(reports, 1) if r.error]
    if errors:
        i, error = errors[0]
        where = f"connection {i} of {len(reports)}: " if len(reports) > 1 else ""
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MsgcapError(f"{where}{error}{more}")
    return 1 if args.strict and any(r.diverged for r in reports) else 0


@contextlib.contextmanager
def _replay_failures(doing: str) -> Iterator[None]:
    """A replay run's errors as msgcap's: a capture that cannot be replayed is bad usage;
    an ``OSError`` without an errno is ours (no client connected in time); any other
    says what could not be done (``doing``: ``connect to HOST:PORT``). ``ReplayFailed``,
    a failure of the replayer itself, goes on to :func:`main`."""
    from msgcap.proxy.replay_plan import ReplayError

    try:
        yield
    except ReplayError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        if e.errno is None:
            raise MsgcapError(str(e) or type(e).__name__) from e
        raise MsgcapError(f"cannot {doing}: {describe_os_error(e)}") from e


def _replay_options(args: argparse.Namespace, magic: bytes) -> dict[str, Any]:
    return {"magic": magic, "fast": args.fast, "verbatim": args.verbatim,
            "timeout": args.timeout}  # fmt: skip


def _run_diff(args: argparse.Namespace, steps: Any, targets: list[Any],
              options: dict[str, Any]) -> int:  # fmt: skip
    """Differential replay: the same recording into each node (``--to`` several times, or
    ``--listen --connections N --diff``), then how the nodes differ. Exit 1 on a
    substantive difference (``--strict`` or not) and when no node could be played to."""
    import orjson

    from msgcap.proxy.diff import compare, replay_many
    from msgcap.proxy.replay import replay_listen

    addresses = ", ".join(map(str, targets))
    doing = f"connect to one of {addresses}" if args.to else f"listen on {addresses}"
    with _replay_failures(doing):
        if args.to:
            labels = [str(t) for t in targets]
            replaying = replay_many(steps, [(t.host, t.port) for t in targets],
                                    play=args.play or "peer", transport=args.transport,
                                    **options)  # fmt: skip
            reports = asyncio.run(replaying)
        else:
            (target,) = targets
            listening = replay_listen(steps, target.host, target.port, play=args.play or "node",
                                      connections=args.connections, transcript=True,
                                      **options)  # fmt: skip
            reports = asyncio.run(listening)
            labels = [f"client {i}" for i in range(1, len(reports) + 1)]
    if len(reports) < 2:
        raise MsgcapError(f"{len(reports)} of {args.connections} connections arrived: "
                          "nothing to compare")  # fmt: skip
    result = compare(labels, reports)
    print(orjson.dumps(result.to_json()).decode() if args.json else result.summary())
    if all(r.error for r in reports):
        raise MsgcapError(f"no node could be played to: {reports[0].error}")
    return 1 if result.diverged else 0


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="capture files or folders")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--fuzz", metavar="DIR", help="one v1 wire message per file, SHA-1 named")
    kind.add_argument("--pcap", metavar="OUT", help="a pcap with one TCP connection per peer")
    kind.add_argument("--functional-test", metavar="OUT.py",
                      help="a test for Bitcoin Core's functional test framework that "
                      "plays the recorded peer to a fresh node (data in OUT.json beside "
                      "it)")  # fmt: skip
    add_export_parquet_args(p, kind)
    p.add_argument("--payloads", action="store_true",
                   help="with --fuzz: bare payloads in one folder per type")  # fmt: skip
    p.add_argument("--network", default="regtest", help="network (or 8 hex digits of magic)")


def run_export(args: argparse.Namespace) -> int:
    from msgcap.capture.export import export_fuzz, export_pcap
    from msgcap.capture.framing import parse_magic

    if args.parquet:
        return run_export_parquet(args)
    if args.functional_test:
        return _run_export_functional_test(args)
    try:
        magic = parse_magic(args.network)
    except ValueError as e:
        raise UsageError(str(e)) from None
    paths = [Path(p) for p in args.paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"{missing[0]}: no such file or folder")
    damage = Warnings()
    if args.fuzz:
        out = Path(args.fuzz)
        if out.exists() and not out.is_dir():
            raise UsageError(f"{out}: not a folder")
        result = export_fuzz(paths, out, magic, payloads=args.payloads, on_damage=damage.damage)
        print(f"{result.messages} messages, {result.distinct} distinct, "
              f"{result.written} new files in {args.fuzz}")  # fmt: skip
    else:
        _check_pcap_names(paths)
        n = export_pcap(paths, Path(args.pcap), magic, on_damage=damage.damage)
        print(f"{n} messages written to {args.pcap}")
    return damage.exit_status


def _run_export_functional_test(args: argparse.Namespace) -> int:
    from msgcap.parser.functional_plan import ExportError
    from msgcap.parser.functional_test import export_functional_test

    out = Path(args.functional_test)
    if out.suffix != ".py":
        raise UsageError(f"--functional-test {out}: give a file name ending in .py")
    if not out.parent.is_dir():
        raise UsageError(f"--functional-test {out}: no such folder {out.parent}")
    damage = Warnings()
    try:
        test, data, plan = export_functional_test(args.paths, out, on_damage=damage.damage)
    except ExportError as e:
        raise UsageError(str(e)) from None
    print(f"{test}: plays the recorded peer ({len(plan.script)} messages unasked, "
          f"{len(plan.expected)} requests answered); data in {data}")  # fmt: skip
    return damage.exit_status


def _check_pcap_names(paths: list[Path]) -> None:
    """A capture folder named ``HOST_PORT`` gives the pcap its peer's port: one out of
    range is bad input, not a stand-in."""
    from msgcap.capture.export import capture_folders
    from msgcap.capture.layout import CapturePath

    for folder in capture_folders(paths):
        _, port = CapturePath.of_folder(folder).peer_host_port or ("", 0)
        if port > 65535:
            raise UsageError(f"{folder}: port {port} in the folder name is out of range")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="one peer's capture folder (msgs_recv/sent.dat)")
    p.add_argument("b", metavar="B", help="another capture of the same session")
    p.add_argument("--mirror", action="store_true",
                   help="A and B are the two ends of one connection: compare A's recv "
                   "with B's sent, and A's sent with B's recv")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_compare(args: argparse.Namespace) -> int:
    import orjson

    from msgcap.capture.compare import compare_folders
    from msgcap.capture.layout import RECV_FILE, SENT_FILE

    folders = [Path(args.a), Path(args.b)]
    for folder in folders:
        if not (folder / RECV_FILE).is_file() and not (folder / SENT_FILE).is_file():
            raise UsageError(f"{folder}: not a capture folder (no {RECV_FILE} or {SENT_FILE})")
        _check_readable([folder / RECV_FILE, folder / SENT_FILE])
    results = compare_folders(folders[0], folders[1], mirror=args.mirror)
    if args.json:
        print(orjson.dumps([r.to_json() for r in results], option=orjson.OPT_INDENT_2).decode())
    else:
        print("\n".join(r.summary() for r in results))
    return 0 if all(r.identical for r in results) else 1


def add_transparent_rules_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen-port", type=int, required=True,
                   help="the transparent listener's port (msgcap proxy --transparent)")  # fmt: skip
    p.add_argument("--node-port", type=int, required=True, help="the node's P2P port")
    p.add_argument("--peer-port", type=int, action="append",
                   help="a port the node's peers listen on, repeatable "
                   "(default: --node-port)")  # fmt: skip
    p.add_argument("--mark", type=_mark, default=None,
                   help="the proxy's upstream mark (default 0x6d63; as "
                   "--transparent-mark)")  # fmt: skip
    p.add_argument("--node", metavar="ADDRESS",
                   help="the node's address: rules for a namespace its traffic passes "
                   "through (a router), not the node's own")  # fmt: skip
    p.add_argument("--netns", metavar="NAME",
                   help="print a shell command applying the rules in network "
                   "namespace NAME")  # fmt: skip


def run_transparent_rules(args: argparse.Namespace) -> int:
    import ipaddress

    from msgcap.proxy.config import DEFAULT_MARK
    from msgcap.proxy.transparent import nft_rules

    ports = [args.listen_port, args.node_port, *(args.peer_port or ())]
    if any(not 1 <= p <= 65535 for p in ports):
        raise UsageError("ports are 1-65535")
    if args.node is not None:
        try:
            ipaddress.ip_address(args.node)
        except ValueError:
            raise UsageError(f"--node: {args.node!r} is not an IP address") from None
    print(nft_rules(node_port=args.node_port, listen_port=args.listen_port,
                    mark=DEFAULT_MARK if args.mark is None else args.mark,
                    peer_ports=args.peer_port or (), node=args.node, netns=args.netns),
          end="")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    top = _ArgumentParser(
        prog="msgcap",
        description="Capture, decode and replay Bitcoin P2P traffic in Bitcoin Core's "
        "-capturemessages format.",
    )
    sub = top.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    commands = [
        ("proxy", "run the capturing proxy", add_proxy_args, run_proxy),
        ("parse", "decode capture files to JSON (Core's parser, faster)", add_parse_args,
         run_parse),
        ("stats", "messages and bytes per peer, direction and type", add_selection_args,
         run_stats),
        ("replay", "play one side of a capture against live software", add_replay_args,
         run_replay),
        ("export", "export captures as a fuzzing corpus, a pcap or a Parquet dataset",
         add_export_args, run_export),
        ("sql", "SQL (DuckDB) over a dataset written by export --parquet", add_sql_args,
         run_sql),
        ("compare", "two captures of one session, message by message", add_compare_args,
         run_compare),
        ("transparent-rules", "print nftables rules for a transparent route",
         add_transparent_rules_args, run_transparent_rules),
    ]  # fmt: skip
    for name, help_text, add_args, run in commands:
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit status.

    Every failure ends in one line ``msgcap: error: REASON`` on stderr, never a
    traceback: msgcap's own errors with their exit status (2 for bad usage or config), an
    ``OSError`` as its file and reason (exit status 1), anything else as ``unexpected``
    with its type and where it was raised (exit status 1). Standard output is flushed
    here, so a full disk or a closed pipe at the very end is caught too; a reader that
    went away (``| head``) ends the command quietly, as Unix tools do.
    """
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        _check_args(args)
        status = int(args.run(args))
    except KeyboardInterrupt:
        _stdout_failure()
        return 130
    except SystemExit:  # argparse: --help, or bad usage (its one line is out already)
        # (argparse ignores the errors of its own writes: ask the file itself)
        failure = _stdout_failure() or _stdout_broken()
        if failure is not None and not isinstance(failure, BrokenPipeError):
            _silence_stdout()
            return _error(describe_os_error(failure, "standard output"), 1)
        raise
    except Exception as e:
        return _failed(e, args)
    failure = _stdout_failure()
    if failure is None or isinstance(failure, BrokenPipeError):
        return status
    return _error(describe_os_error(failure, "standard output"), 1)


def _check_args(args: argparse.Namespace) -> None:
    """Checks every subcommand shares: a time range that is not empty, and input paths
    named on the command line that can be read (one that does not exist is left to the
    command, which says so)."""
    since, until = getattr(args, "since", None), getattr(args, "until", None)
    if since is not None and until is not None and since > until:
        raise UsageError("--since is after --until: the time range is empty")
    _check_readable(getattr(args, "paths", None) or ())


def _check_readable(paths: Any) -> None:
    """Each path exists and can be read (a file) or looked into (a folder); one that does
    not exist is left to the caller, which says so in its own words."""
    for path in paths:
        try:
            mode = os.stat(path).st_mode
            if stat.S_ISREG(mode):
                with open(path, "rb"):
                    pass
            elif stat.S_ISDIR(mode):
                with os.scandir(path):
                    pass
        except FileNotFoundError:
            continue
        except OSError as e:
            raise UsageError(describe_os_error(e, path)) from None


_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE})
"""Errors that only writing gives: without a file name, they concern the output."""


def _failed(e: Exception, args: argparse.Namespace | None) -> int:
    """The one line for an exception that ended a command; its exit status."""
    status = e.exit_status if isinstance(e, MsgcapError) else 1
    if isinstance(e, OSError) and e.filename is None and e.errno in _WRITE_ERRORS:
        # Writing failed, and the error does not say where: the output file if the
        # command has one (unless standard output is what refuses writes), else stdout.
        output = _output_of(args)
        broken = _stdout_broken()
        if isinstance(e, BrokenPipeError) and broken is not None:
            _silence_stdout()
            return 0  # the reader went away (`| head`): not an error of ours
        if output is None or broken is not None:
            _silence_stdout()
            return _error(describe_os_error(e, "standard output"), status)
        reason = describe_os_error(e, output)
    elif isinstance(e, OSError):
        reason = describe_os_error(e)
    elif isinstance(e, MsgcapError):
        reason = " ".join(str(e).split()) or type(e).__name__
    else:
        reason = f"unexpected {describe_exception(e)}"
    _stdout_failure()
    return _error(reason, status)


def _output_of(args: argparse.Namespace | None) -> str | None:
    """The output file or folder the command writes, if it has one."""
    for key in ("output", "pcap", "fuzz", "parquet", "functional_test"):
        value = getattr(args, key, None)
        if isinstance(value, str | os.PathLike):
            return os.fspath(value)
    return None


def _error(reason: str, status: int) -> int:
    """Print the one line every failure ends in, ``msgcap: error: REASON`` (the only place
    it is written); the exit status, passed through."""
    try:
        print(f"msgcap: error: {reason}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr is gone too: the exit status is all that is left
    return status


def _stdout_failure() -> OSError | None:
    """Flush standard output; if that fails, silence it (see :func:`_silence_stdout`) and
    return the error."""
    stream = sys.stdout
    if stream is None:
        return None
    try:
        stream.flush()
        return None
    except OSError as e:
        _silence_stdout()
        return e
    except ValueError:  # closed
        return None


def _stdout_broken() -> OSError | None:
    """Why standard output refuses writes now, if it does: a pipe whose reader went away
    (``BrokenPipeError``), or a device such as /dev/full (a full disk shows only when
    written to)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: not a file
        return None
    try:
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poll.poll(0)):
            return BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        os.write(fd, b"")
    except OSError as e:
        return e
    return None


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's own flush at exit
    cannot fail again and print a traceback (``Exception ignored ...``)."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
