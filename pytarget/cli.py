"""Command line: `pytarget serve [--config FILE] [--portal HOST:PORT]...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from .config import ConfigError, load, parse_portal


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytarget", description="A userspace iSCSI target.")
    parser.add_argument("--version", action="version", version=f"pytarget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the target")
    serve.add_argument("--config", "-c", help="YAML configuration (default: luns/default.yaml)")
    serve.add_argument("--portal", "-p", action="append", default=[], metavar="HOST:PORT",
                       help="listen here instead of the configured portals (repeatable)")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))
    serve.add_argument("--nop-interval", type=float, default=30.0, metavar="SECONDS",
                       help="ping idle connections with NOP-In after this long (0: never)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args)
    return 2


def serve(args: argparse.Namespace) -> int:
    from .server import Server

    try:
        config = load(args.config)
        portals = [parse_portal(p) for p in args.portal] or None
    except ConfigError as exc:
        print(f"pytarget: configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pytarget: --portal: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        server = Server(config, portals, nop_interval=args.nop_interval)
        await server.run_forever()

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"pytarget: {exc}", file=sys.stderr)
        return 1
    return 0
