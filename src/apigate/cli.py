"""Command line: `apigate run | validate | routes | status | check | demo | --version`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from apigate import __version__
from apigate.buildinfo import build_name

# (apigate.config and the server are imported where used: with pydantic they take most of a
# second, during which a SIGHUP used to kill `apigate run`, see _defer_sighup)


def _install_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _defer_sighup() -> list[int]:
    """Keep a SIGHUP that comes while `run` imports and starts: its default action ends the
    process, and a deploy's reload sent as the process starts killed it (the docs audit: any
    time in the first ~0.7 s). The gateway takes the list over once its own handlers are in
    place (serve: a reload once it has started)."""
    early: list[int] = []

    def keep(signum: int, _frame: Any) -> None:
        early.append(signum)

    signal.signal(signal.SIGHUP, keep)
    return early


def cmd_run(args: argparse.Namespace) -> int:
    early_signals = _defer_sighup()  # first: before the imports below
    from apigate.config.errors import ConfigError, invalid_report
    from apigate.observability.logs import parse_log_levels, setup_logging
    from apigate.server import serve
    from apigate.worker import WorkerRole

    try:
        level, levels = parse_log_levels(args.log_level)
    except ValueError as exc:
        print(f"apigate: --log-level: {exc}", file=sys.stderr)
        return 2
    role = WorkerRole.from_arg(args.worker_role) if args.worker_role else None
    if role is not None:
        role.die_with_supervisor()
    setup_logging(
        level, levels, json_format=not args.plain_logs, worker=role.index if role else None
    )
    if role is None and args.workers > 1:
        from apigate.supervisor import run_supervisor

        return run_supervisor(args.config, args.workers, _worker_options(args), early_signals)
    _install_loop_policy()
    try:
        asyncio.run(serve(args.config, watch=args.watch, early_signals=early_signals, worker=role))
    except ConfigError as exc:
        print(invalid_report(args.config, exc), file=sys.stderr)  # (as validate says it)
        return 2
    except OSError as exc:
        print(f"apigate: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _worker_options(args: argparse.Namespace) -> list[str]:
    """The options of `run` each worker is started with (the supervisor adds its role)."""
    options = ["--log-level", args.log_level]
    if args.watch:
        options.append("--watch")  # (each worker watches the files and reloads itself)
    if args.plain_logs:
        options.append("--plain-logs")
    return options


def _workers(text: str) -> int:
    from apigate.worker_rules import parse_workers

    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_validate(args: argparse.Namespace) -> int:
    from apigate.config.errors import ConfigError, invalid_report
    from apigate.store.config_store import served_config

    try:
        config, stored = served_config(args.config)
        _compile(config)
    except ConfigError as exc:
        print(invalid_report(args.config, exc), file=sys.stderr)
        return 2
    except OSError as exc:  # the store file cannot be read: the config cannot be judged
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    counts = f"{len(config.routes)} routes, {len(config.services)} services"
    print(f"{args.config}: ok ({counts}{'; ' + stored if stored else ''})")
    return 0


def _compile(config: object) -> object:
    """Compile a snapshot without listening, so plugin configs and TLS files are checked."""
    from apigate.config.schema import GatewayConfig
    from apigate.runtime import dry_compile

    assert isinstance(config, GatewayConfig)

    async def build() -> object:
        return dry_compile(config, asyncio.get_running_loop())

    return asyncio.run(build())


def cmd_routes(args: argparse.Namespace) -> int:
    from apigate.config.errors import ConfigError, invalid_report
    from apigate.ops import format_table
    from apigate.runtime import Runtime
    from apigate.store.config_store import served_config

    try:
        runtime = _compile(served_config(args.config)[0])
    except ConfigError as exc:
        print(invalid_report(args.config, exc), file=sys.stderr)
        return 2
    except OSError as exc:  # the store file cannot be read: the config cannot be judged
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    assert isinstance(runtime, Runtime)
    table = runtime.matcher.table()
    for entry in table:
        compiled = runtime.routes.get(str(entry["name"]))
        # (the table's own rows hold no service: the matcher knows routes only)
        entry["service"] = compiled.service.name if compiled and compiled.service else None
        # the plugins a request on the route meets, global ones included, in the order they run
        entry["plugins"] = [p.name for p in compiled.chain.plugins] if compiled else []
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return 0
    columns = ["route", "host", "methods", "path", "kind", "headers", "service", "plugins"]
    rows = []
    for entry in table:
        keys = ("name", "host", "methods", "path", "kind", "headers")
        service = str(entry["service"] or "(aggregate)")
        plugins = ",".join(entry["plugins"]) or "-"  # type: ignore[arg-type]
        rows.append([str(entry[key] or "-") for key in keys] + [service, plugins])
    print(format_table(columns, rows))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from apigate.demo import run_demo

    _install_loop_policy()
    return asyncio.run(run_demo(requests=args.requests))


def cmd_status(args: argparse.Namespace) -> int:
    from apigate.ops import cmd_status as status

    return status(args.admin, args.token)


def cmd_check(args: argparse.Namespace) -> int:
    from apigate.ops import cmd_check as check

    return check(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apigate", description="A fast API gateway.")
    parser.add_argument(
        "--version", action="version", version=f"apigate {__version__}, {build_name()}"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument(
        "--watch", action="store_true", help="reload when the file or one it includes changes"
    )
    run.add_argument(
        "--log-level",
        default="info",
        help="a level, optionally per component: info,apigate.registry=debug,apigate.proxy=warning",
    )
    run.add_argument("--plain-logs", action="store_true", help="human-readable logs, not JSON")
    run.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="worker processes on the proxy port (SO_REUSEPORT), or 'auto' (one per CPU); "
        "more than 1 needs store: redis://",
    )
    # set by the supervisor of --workers N for each worker it starts (apigate.worker)
    run.add_argument("--worker-role", help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a config file and exit")
    validate.add_argument("-c", "--config", required=True)
    validate.set_defaults(func=cmd_validate)

    routes = sub.add_parser("routes", help="print the compiled route table")
    routes.add_argument("-c", "--config", required=True)
    routes.add_argument("--json", action="store_true")
    routes.set_defaults(func=cmd_routes)

    status = sub.add_parser("status", help="services, instances and routes of a running gateway")
    status.add_argument(
        "--admin", help="admin API URL (default: $APIGATE_ADMIN_URL or http://127.0.0.1:8001)"
    )
    status.add_argument("--token", help="admin token (default: $APIGATE_ADMIN_TOKEN)")
    status.set_defaults(func=cmd_status)

    check = sub.add_parser("check", help="validate a config and probe every static target once")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="start a gateway and three services and show them work")
    demo.add_argument("--requests", type=int, default=30)
    demo.set_defaults(func=cmd_demo)
    return parser


# 128 + SIGPIPE (13): the status a shell reports for a tool that signal ended (`yes | head`),
# so `set -o pipefail` and PIPESTATUS tell "the reader left" from a real failure (1, 2).
# The signal itself stays ignored (Python's default): `run` writes to sockets that close.
EXIT_BROKEN_PIPE = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a reader that stopped early (`apigate status | head`) ends it quietly."""
    try:
        try:
            args = build_parser().parse_args(argv)
            code: int = args.func(args)
        finally:  # (also after --help) the last buffered lines meet a closed pipe here
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    return code


def _discard_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it again at exit, and on the closed pipe
    that would print "Exception ignored ... BrokenPipeError"."""
    with contextlib.suppress(OSError, ValueError):  # a stdout with no file (a test's capture)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
