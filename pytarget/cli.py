"""Command line: `pytarget serve`, and the operator's commands around a running target:
`status` and `reload` (over the control socket), `lun create|remove|resize` and
`target create|remove` (which edit the configuration file, then ask a running target to
reload it), and `snapshot create|list|delete|expose|unexpose|clone|rollback` (over the control
socket, and editing the configuration for what becomes a LUN)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import gc
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__, logs
from .config import (
    DEFAULT_CONFIG,
    IQN_RE,
    MAX_LUN,
    Config,
    ConfigError,
    load,
    parse,
    parse_portal,
    parse_size,
)

EXIT_CONFIG = 2


class CliError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help=f"YAML configuration (default: {DEFAULT_CONFIG})")


def _gateway_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", "-g", metavar="NAME",
                        help="which of the configuration's gateways this is (over its "
                             "`gateway:` key; docs/guides/scale-out.md)")


def _socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH",
                        help="the control socket (default: from the configuration)")


def _reload_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-reload", action="store_true",
                        help="only edit the file; do not ask a running target to reload it")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytarget", description="A userspace iSCSI target.")
    parser.add_argument("--version", action="version", version=f"pytarget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the target")
    _config_option(serve)
    _gateway_option(serve)
    serve.add_argument("--portal", "-p", action="append", default=[], metavar="HOST:PORT",
                       help="listen here instead of the configured portals (repeatable)")
    serve.add_argument("--log-level", default="info", choices=logs.LEVELS)
    serve.add_argument("--log-format", default="text", choices=logs.FORMATS,
                       help="text for people, json (one object per line) for log collectors")
    serve.add_argument("--nop-interval", type=float, default=None, metavar="SECONDS",
                       help="ping idle connections with NOP-In after this long (0: never; "
                            "default: limits.nop_interval, 30)")
    serve.add_argument("--nop-timeout", type=float, default=None, metavar="SECONDS",
                       help="drop a connection whose NOP-In is not answered within this "
                            "(default: limits.nop_timeout, 30)")
    serve.add_argument("--login-timeout", type=float, default=None, metavar="SECONDS",
                       help="drop a connection whose login takes longer "
                            "(default: limits.login_timeout, 15)")

    status = sub.add_parser("status", help="show the running target's targets, LUNs, "
                                           "sessions, reservations and copies")
    _config_option(status)
    _gateway_option(status)
    _socket_option(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    reload = sub.add_parser("reload", help="make the running target re-read its "
                                           "configuration (as SIGHUP does)")
    _config_option(reload)
    _gateway_option(reload)
    _socket_option(reload)

    lun = sub.add_parser("lun", help="add, remove or grow LUNs in the configuration")
    lun_sub = lun.add_subparsers(dest="action", required=True)
    create = lun_sub.add_parser("create", help="add a LUN backed by PATH")
    create.add_argument("path", metavar="PATH", help="backing file (created sparse when missing)")
    create.add_argument("--size", help="size, e.g. 10GiB (needed when PATH does not exist)")
    create.add_argument("--block-size", type=int, choices=(512, 4096), default=512)
    create.add_argument("--target", metavar="IQN", help="the target (default: the only one)")
    create.add_argument("--id", type=int, metavar="N", help="LUN number (default: lowest free)")
    create.add_argument("--readonly", action="store_true")
    create.add_argument("--thick", action="store_true",
                        help="fully provisioned: no UNMAP (default: thin)")
    create.add_argument("--serial", help="unit serial number (default: derived)")
    _config_option(create)
    _reload_option(create)
    remove = lun_sub.add_parser("remove", help="remove a LUN (its backing file is kept)")
    remove.add_argument("id", type=int, metavar="N")
    remove.add_argument("--target", metavar="IQN")
    _config_option(remove)
    _reload_option(remove)
    resize = lun_sub.add_parser("resize", help="grow a LUN (its backing file grows at the "
                                               "reload; LUNs never shrink)")
    resize.add_argument("id", type=int, metavar="N")
    resize.add_argument("--size", required=True)
    resize.add_argument("--target", metavar="IQN")
    _config_option(resize)
    _reload_option(resize)

    _snapshot_parser(sub)

    target = sub.add_parser("target", help="add or remove targets in the configuration")
    target_sub = target.add_subparsers(dest="action", required=True)
    tcreate = target_sub.add_parser("create", help="add a target (no LUNs yet)")
    tcreate.add_argument("name", metavar="IQN")
    tcreate.add_argument("--alias")
    tcreate.add_argument("--portal", action="append", default=[], metavar="HOST:PORT",
                         help="portals of a new configuration file (default 0.0.0.0:3260)")
    _config_option(tcreate)
    _reload_option(tcreate)
    tremove = target_sub.add_parser("remove", help="remove a target and its LUNs from the "
                                                   "configuration (backing files are kept)")
    tremove.add_argument("name", metavar="IQN")
    _config_option(tremove)
    _reload_option(tremove)
    _checkpoint_parser(sub)
    return parser


def _snapshot_parser(sub: Any) -> None:
    refs = "[TARGET-IQN/]LUN@SNAPSHOT"
    snap = sub.add_parser("snapshot", help="take, list, expose, clone, roll back to and delete "
                                           "snapshots of LUNs (docs/snapshots.md)")
    snap_sub = snap.add_subparsers(dest="action", required=True)

    def common(parser: argparse.ArgumentParser, edits: bool = False) -> None:
        parser.add_argument("--target", metavar="IQN",
                            help="the target of LUNs given by number (default: the only one)")
        _config_option(parser)
        _gateway_option(parser)
        _socket_option(parser)
        if edits:
            _reload_option(parser)

    create = snap_sub.add_parser("create", help="snapshot one LUN, or several at one instant "
                                                "(no write to any lands between them)")
    create.add_argument("name", metavar="NAME")
    create.add_argument("luns", nargs="+", metavar="LUN", help="N or TARGET-IQN/N")
    common(create)
    listing = snap_sub.add_parser("list", help="the snapshots of every LUN, or of those named")
    listing.add_argument("luns", nargs="*", metavar="LUN", help="N or TARGET-IQN/N")
    listing.add_argument("--json", action="store_true")
    common(listing)
    delete = snap_sub.add_parser("delete", help="delete a snapshot (unexpose it first)")
    delete.add_argument("ref", metavar=refs)
    common(delete)
    expose = snap_sub.add_parser("expose", help="show a snapshot read-only as a LUN of a "
                                                "target (--lun) or as an NBD export (--nbd)")
    expose.add_argument("ref", metavar=refs)
    how = expose.add_mutually_exclusive_group(required=True)
    how.add_argument("--lun", type=int, metavar="N", help="as LUN N of --to (or the LUN's "
                                                          "own target)")
    how.add_argument("--nbd", action="store_true",
                     help="as the NBD export TARGET-IQN/LUN-ID@SNAPSHOT")
    expose.add_argument("--to", metavar="IQN", help="the target that shows it (--lun)")
    common(expose, edits=True)
    unexpose = snap_sub.add_parser("unexpose", help="stop showing a snapshot (every LUN that "
                                                    "shows it, or the NBD export)")
    unexpose.add_argument("ref", metavar=refs)
    unexpose.add_argument("--nbd", action="store_true", help="the NBD export")
    common(unexpose, edits=True)
    clone = snap_sub.add_parser("clone", help="a new writable LUN with a snapshot's contents")
    clone.add_argument("ref", metavar=refs)
    where = clone.add_mutually_exclusive_group(required=True)
    where.add_argument("--path", help="the clone's backing file (file LUNs)")
    where.add_argument("--image", help="the clone's RBD image (RBD LUNs)")
    clone.add_argument("--pool", help="the clone image's pool (default: the LUN's)")
    clone.add_argument("--id", type=int, metavar="N", help="its LUN number (default: lowest "
                                                           "free)")
    clone.add_argument("--to", metavar="IQN", help="its target (default: the LUN's)")
    common(clone, edits=True)
    rollback = snap_sub.add_parser("rollback", help="make a LUN's contents a snapshot's again "
                                                    "(what was written since is lost)")
    rollback.add_argument("ref", metavar=refs)
    common(rollback)


def _checkpoint_parser(sub: Any) -> None:
    checkpoint = sub.add_parser("checkpoint", help="create, list or delete a LUN's checkpoints "
                                                   "(changed-block tracking, docs/cbt.md)")
    cp_sub = checkpoint.add_subparsers(dest="action", required=True)
    for action, text in (("create", "start tracking what changes from now on, as NAME"),
                         ("delete", "forget a checkpoint (later ones keep their answers)")):
        cmd = cp_sub.add_parser(action, help=text)
        cmd.add_argument("lun", type=int, metavar="LUN")
        cmd.add_argument("name", metavar="NAME")
        cmd.add_argument("--target", metavar="IQN", help="the target (default: the only one)")
        _config_option(cmd)
        _gateway_option(cmd)
        _socket_option(cmd)
    listing = cp_sub.add_parser("list", help="the checkpoints of a LUN (or of every LUN)")
    listing.add_argument("lun", type=int, nargs="?", metavar="LUN")
    listing.add_argument("--target", metavar="IQN")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    _config_option(listing)
    _gateway_option(listing)
    _socket_option(listing)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        logs.setup(args.log_level, args.log_format)
        return serve(args)
    handlers = {"status": status, "reload": reload, "lun": lun, "target": target,
                "snapshot": snapshot, "checkpoint": checkpoint}
    try:
        return handlers[args.command](args)
    except CliError as exc:
        print(f"pytarget {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"pytarget {args.command}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def tune_allocator() -> None:
    """Keep large buffers in glibc's heap instead of fresh mmap()s.

    Every 64 KiB-1 MiB Data-In/Data-Out buffer would otherwise be a new mapping whose pages
    fault in and are zeroed by the kernel, then unmapped when freed: measured here, 1 MiB
    reads cost half the CPU with this (docs/performance.md).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# Container objects allocated between two young-generation collections (CPython's default is
# 700). Each collection walks the young objects still alive, whatever the threshold: every
# command allocates about ten (tasks, coroutines, headers), so at the default the collector ran
# every ~70 commands and took a tenth of the loop's time at 4 KiB QD32 (docs/performance.md).
GC_YOUNG_THRESHOLD = 10_000


def tune_collector() -> None:
    """Collect garbage cycles less often, and never walk what start-up built: the modules,
    configuration and tables are moved out of the collector's generations (`gc.freeze`).
    Commands free their objects by reference counting; cycles (an exception and its
    traceback) are still collected, a few thousand commands later."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def serve(args: argparse.Namespace) -> int:
    from .assembly import check_backstores
    from .config import local_gateway
    from .server import Server

    tune_allocator()

    try:
        config = load(args.config, args.gateway)
        local_gateway(config)
        check_backstores(config)
        portals = [parse_portal(p) for p in args.portal] or None
    except ConfigError as exc:
        print(f"pytarget: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"pytarget: --portal: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    if config.workers > 1:
        return serve_workers(args, config, portals)

    from .transport import PollingSelector

    poller = PollingSelector(config.poll_window())

    async def run() -> None:
        timers = {name: value for name in ("nop_interval", "nop_timeout", "login_timeout")
                  if (value := getattr(args, name)) is not None}
        server = Server(config, portals, args.config, **timers)
        server.use_poller(poller)
        tune_collector()
        await server.run_forever()

    try:
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(poller)) as runner:
            runner.run(run())
    except ConfigError as exc:  # known only once a medium is reached (an RBD image)
        print(f"pytarget: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"pytarget: {exc}", file=sys.stderr)
        return 1
    return 0


def serve_workers(args: argparse.Namespace, config: Config,
                  portals: list[tuple[str, int]] | None) -> int:
    """`workers: N`: the parent process and its forked workers (pytarget/workers.py)."""
    from .workers import Supervisor

    timers = {name: value for name in ("nop_interval", "nop_timeout", "login_timeout")
              if (value := getattr(args, name)) is not None}
    supervisor = Supervisor(config, portals, args.config, **timers)
    try:
        code = supervisor.spawn()
    except OSError as exc:
        print(f"pytarget: {exc}", file=sys.stderr)
        return 1
    if code is not None:  # a worker, after its life: nothing of the parent's to run
        logging.shutdown()
        os._exit(code)
    try:
        with asyncio.Runner() as runner:
            return runner.run(supervisor.run())
    except OSError as exc:
        print(f"pytarget: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- control socket
# A snapshot without reflink copies the LUN's data, a rollback or clone too: allow for hours.
SNAPSHOT_TIMEOUT = 4 * 3600.0


def _control(args: argparse.Namespace, command: str, timeout: float = 120.0,
             **arguments: Any) -> Any:
    from .control import ControlError, request

    path = Path(args.socket) if args.socket else _socket_of(args.config, args.gateway)
    try:
        return request(path, command, timeout, **arguments)
    except ControlError as exc:
        raise CliError(str(exc)) from None


def _socket_of(config_file: str | None, gateway: str | None = None) -> Path:
    """The control socket of the target (or the gateway `gateway`) serving `config_file`, even
    when the file has been edited into a state that does not load (the target then refuses the
    reload and says why)."""
    import yaml

    from .control import socket_path

    try:
        return socket_path(load(config_file, gateway))
    except ConfigError:
        path = Path(config_file) if config_file else DEFAULT_CONFIG
        try:
            raw = (yaml.safe_load(path.read_text()) or {}).get("control_socket")
        except (OSError, yaml.YAMLError, AttributeError):
            raw = None
        base = path.resolve().parent
        if isinstance(raw, str) and raw:
            return Path(raw) if Path(raw).is_absolute() else base / raw
        return base / (f"{path.stem}.{gateway}.sock" if gateway else f"{path.stem}.sock")


def status(args: argparse.Namespace) -> int:
    from .status import render

    doc = _control(args, "status")
    print(json.dumps(doc, indent=2) if args.json else render(doc), end="\n" if args.json else "")
    return 0


def reload(args: argparse.Namespace) -> int:
    result = _control(args, "reload")
    changes = result.get("changes", [])
    for change in changes:
        print(change)
    if not changes:
        print("no changes")
    return 0


def checkpoint(args: argparse.Namespace) -> int:
    """`pytarget checkpoint create|list|delete`: over the control socket."""
    import time

    arguments: dict[str, Any] = {"lun": args.lun, "target": args.target}
    if args.action != "list":
        arguments["name"] = args.name
    result = _control(args, f"checkpoint_{args.action}", **arguments)
    if args.action != "list":
        print(f"checkpoint {args.name} {args.action}d on LUN {args.lun}")
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for entry in result:
        print(f"{entry['target']} LUN {entry['lun']}:")
        if not entry["checkpoints"]:
            print("  no checkpoints")
        for cp in entry["checkpoints"]:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cp["created"]))
            print(f"  {cp['name']:<24} {created}  {cp['state']:<12} "
                  f"{_size_text(cp['changed_bytes'])} changed "
                  f"({_size_text(cp['granularity'])} granules)")
    return 0


def _size_text(n: int) -> str:
    from .status import size_text

    return size_text(n)


# ---------------------------------------------------------------- configuration edits
def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else DEFAULT_CONFIG


def _read_config_text(path: Path, create_default: bool) -> str:
    """The file's text; the built-in default's text when the default file does not exist yet."""
    if path.exists():
        try:
            return path.read_text()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if create_default and path == DEFAULT_CONFIG:
        return resources.files("pytarget").joinpath("default.yaml").read_text()
    raise CliError(f"{path} does not exist (create it with `pytarget target create IQN "
                   f"--config {path}`)", EXIT_CONFIG)


def _pick_target(config: Config, name: str | None) -> str:
    if name is not None:
        for tc in config.targets:
            if tc.name.lower() == name.lower():
                return tc.name
        raise CliError(f"{config.file} has no target {name}", EXIT_CONFIG)
    if len(config.targets) != 1:
        raise CliError(f"{config.file} has {len(config.targets)} targets: name one with "
                       "--target IQN", EXIT_CONFIG)
    return config.targets[0].name


def _commit(path: Path, old_text: str | None, result: Any, summary: str,
            no_reload: bool) -> int:
    """Check the edited text as `serve` would, write it, and have a running target reload."""
    from .confedit import write_atomically
    from .control import ControlError, request, socket_path

    base = path.resolve().parent
    try:
        config = parse(result.text, str(path), base)
    except ConfigError as exc:
        raise CliError(f"the edited configuration would not load, nothing written: {exc}",
                       EXIT_CONFIG) from None
    if result.text == old_text:
        print("nothing to change")
        return 0
    write_atomically(path, result.text)
    print(f"{summary} in {path}")
    if result.rewritten:
        print(f"note: {path} was rewritten whole: its comments and layout were not kept")
    if no_reload:
        return 0
    # With gateways, every gateway running on this machine from this file reloads.
    configs = [dataclasses.replace(config, gateway=g.name) for g in config.gateways] or [config]
    running = [sock for sock in map(socket_path, configs) if sock.exists()]
    answers = []
    for sock in running:
        try:
            answers.append(request(sock, "reload"))
        except ControlError as exc:
            if "not running" in str(exc):
                continue
            raise CliError(
                f"the file is written, but the running target did not apply it: {exc}") from None
    if not answers:
        print("no running target uses this configuration; it applies at the next start")
    for answer in answers:
        for change in answer.get("changes", []):
            print(f"running target: {change}")
    return 0


def _config_relative(path_text: str, base: Path) -> str:
    """PATH as given on the command line (relative to the current directory), as the
    configuration writes it (relative to the configuration's directory when inside it)."""
    path = Path(path_text).expanduser()
    absolute = path if path.is_absolute() else Path.cwd() / path
    absolute = Path(os.path.normpath(absolute))
    try:
        return absolute.relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(absolute)


def lun(args: argparse.Namespace) -> int:
    from . import confedit
    from .status import size_text

    path = _config_path(args)
    text = _read_config_text(path, create_default=args.action == "create")
    config = parse(text, str(path), path.resolve().parent)
    target_name = _pick_target(config, args.target)
    tc = next(t for t in config.targets if t.name == target_name)
    try:
        if args.action == "create":
            entry, summary = _new_lun(args, config, tc)
            result = confedit.add_lun(text, target_name, entry)
        elif args.action == "remove":
            if all(lc.id != args.id for lc in tc.luns):
                raise CliError(f"target {target_name} has no LUN {args.id}", EXIT_CONFIG)
            result = confedit.remove_lun(text, target_name, args.id)
            summary = f"removed LUN {args.id} from {target_name} (its backing file is kept)"
        else:
            lc = next((lc for lc in tc.luns if lc.id == args.id), None)
            if lc is None:
                raise CliError(f"target {target_name} has no LUN {args.id}", EXIT_CONFIG)
            size = _size(args.size)
            current = lc.path.stat().st_size if lc.path and lc.path.is_file() else None
            if current is not None and size < current:
                raise CliError(f"{lc.location} holds {size_text(current)}: LUNs never shrink",
                               EXIT_CONFIG)
            result = confedit.set_lun_size(text, target_name, args.id, args.size)
            summary = f"LUN {args.id} of {target_name} set to {size_text(size)}"
    except confedit.EditError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    return _commit(path, text if path.exists() else None, result, summary, args.no_reload)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise CliError(f"--size: {exc}", EXIT_CONFIG) from None


def _new_lun(args: argparse.Namespace, config: Config, tc: Any) -> tuple[dict[str, Any], str]:
    from .status import size_text

    used = {lc.id for lc in tc.luns}
    lun_id = args.id if args.id is not None else next(i for i in range(MAX_LUN + 1)
                                                      if i not in used)
    if lun_id in used:
        raise CliError(f"target {tc.name} already has LUN {lun_id}", EXIT_CONFIG)
    if not 0 <= lun_id <= MAX_LUN:
        raise CliError(f"--id must be 0..{MAX_LUN}", EXIT_CONFIG)
    entry: dict[str, Any] = {"id": lun_id, "path": _config_relative(args.path, config.base)}
    backing = Path(entry["path"]) if Path(entry["path"]).is_absolute() \
        else config.base / entry["path"]
    if args.size is not None:
        size = _size(args.size)
        if backing.is_file() and backing.stat().st_size != size:
            raise CliError(f"{backing} exists with {size_text(backing.stat().st_size)}; omit "
                           "--size to use it as it is (pytarget never resizes a file it did "
                           "not create)", EXIT_CONFIG)
        entry["size"] = args.size
    elif not backing.exists():
        raise CliError(f"{backing} does not exist: give --size to create it", EXIT_CONFIG)
    if args.block_size != 512:
        entry["block_size"] = args.block_size
    if args.readonly:
        entry["readonly"] = True
    if args.thick:
        entry["thin"] = False
    if args.serial:
        entry["serial"] = args.serial
    what = size_text(_size(args.size)) if args.size else "existing file"
    return entry, f"added LUN {lun_id} ({entry['path']}, {what}) to {tc.name}"


def target(args: argparse.Namespace) -> int:
    from . import confedit
    from .confedit import EditResult

    path = _config_path(args)
    exists = path.exists()
    if args.action == "create":
        if not IQN_RE.match(args.name):
            raise CliError(f"{args.name} is not an iSCSI name (iqn.YYYY-MM.reversed.domain"
                           "[:id])", EXIT_CONFIG)
        entry: dict[str, Any] = {"name": args.name}
        if args.alias:
            entry["alias"] = args.alias
        entry["luns"] = []
        if not exists and path != DEFAULT_CONFIG:
            portals = args.portal or ["0.0.0.0:3260"]
            for p in portals:
                try:
                    parse_portal(p)
                except ValueError as exc:
                    raise CliError(f"--portal: {exc}", EXIT_CONFIG) from None
            body = yaml_dump({"portals": portals, "targets": [entry]})
            result = EditResult(f"# pytarget configuration (see `pytarget serve --help`)\n"
                                f"{body}", False)
            text = None
        else:
            text = _read_config_text(path, create_default=True)
            config = parse(text, str(path), path.resolve().parent)
            if any(t.name.lower() == args.name.lower() for t in config.targets):
                raise CliError(f"{path} already has target {args.name}", EXIT_CONFIG)
            result = confedit.add_target(text, entry)
        summary = f"added target {args.name}"
    else:
        text = _read_config_text(path, create_default=False)
        config = parse(text, str(path), path.resolve().parent)
        name = _pick_target(config, args.name)
        if len(config.targets) == 1:
            raise CliError(f"{name} is the only target: a configuration needs one",
                           EXIT_CONFIG)
        try:
            result = confedit.remove_target(text, name)
        except confedit.EditError as exc:
            raise CliError(str(exc), EXIT_CONFIG) from None
        summary = f"removed target {name} (backing files are kept)"
    return _commit(path, text if exists else None, result, summary, args.no_reload)


def yaml_dump(doc: Any) -> str:
    import yaml

    text: str = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=100)
    return text


# ---------------------------------------------------------------- snapshots
def _lun_ref(text: str, config: Config, target: str | None) -> tuple[str, int]:
    """`N` (of --target or the only target) or `TARGET-IQN/N`."""
    name, _, number = text.rpartition("/")
    if not number.isdigit():
        raise CliError(f"{text!r} is not a LUN (N or TARGET-IQN/N)", EXIT_CONFIG)
    return _pick_target(config, name or target), int(number)


def _snapshot_ref(text: str, config: Config, target: str | None) -> tuple[str, int, str]:
    from .config import parse_snapshot_ref

    try:
        ref = parse_snapshot_ref(text, "")
    except ValueError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    return _pick_target(config, ref.target or target), ref.lun, ref.name


def snapshot(args: argparse.Namespace) -> int:
    path = _config_path(args)
    text = _read_config_text(path, create_default=False)
    config = parse(text, str(path), path.resolve().parent)
    action = args.action
    if action == "create":
        from .config import check_snapshot_name

        try:
            check_snapshot_name(args.name)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_CONFIG) from None
        members = [dict(zip(("target", "lun"), _lun_ref(r, config, args.target), strict=True))
                   for r in args.luns]
        result = _control(args, "snapshot_create", SNAPSHOT_TIMEOUT, name=args.name,
                          members=members)
        for s in result["snapshots"]:
            print(f"snapshot {s['target']}/{s['lun']}@{s['name']} taken ({s['method']})")
        print(f"writes held back {result['held_ms']:.1f} ms")
        return 0
    if action == "list":
        rows: list[dict[str, Any]] = []
        if args.luns:
            for r in args.luns:
                tname, number = _lun_ref(r, config, args.target)
                rows += _control(args, "snapshot_list", target=tname, lun=number)
        else:
            rows = _control(args, "snapshot_list")
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(_snapshot_table(rows), end="")
        return 0
    target_name, lun_id, name = _snapshot_ref(args.ref, config, args.target)
    ref: dict[str, Any] = {"target": target_name, "lun": lun_id, "name": name}
    full = f"{target_name}/{lun_id}@{name}"
    if action == "delete":
        _control(args, "snapshot_delete", **ref)
        print(f"snapshot {full} deleted")
        return 0
    if action == "rollback":
        result = _control(args, "snapshot_rollback", SNAPSHOT_TIMEOUT, **ref)
        print(f"LUN {lun_id} of {target_name} rolled back to {name}"
              + (" (its capacity changed)" if result["capacity_changed"] else ""))
        return 0
    if action == "expose" and args.nbd:
        result = _control(args, "snapshot_expose_nbd", **ref)
        print(f"snapshot {full} exported over NBD as {result['export']}")
        return 0
    if action == "unexpose" and args.nbd:
        result = _control(args, "snapshot_unexpose_nbd", **ref)
        print(f"NBD export {result['export']} removed")
        return 0
    if action == "expose":
        return _expose(args, path, text, config, target_name, lun_id, name)
    if action == "unexpose":
        return _unexpose(args, path, text, config, target_name, lun_id, name)
    return _clone(args, path, text, config, target_name, lun_id, name)


def _snapshot_table(rows: list[dict[str, Any]]) -> str:
    from .status import size_text

    if not rows:
        return "no snapshots\n"
    lines = [("SNAPSHOT", "CREATED", "SIZE", "HOW", "HELD", "SHOWN AS")]
    for r in rows:
        shown = [*r["shown_as"], *(["nbd"] if r["nbd"] else [])]
        lines.append((r["export"], r["created"], size_text(r["size"]), r["method"],
                      f"{r['held_ms']:.1f}ms", ", ".join(shown) or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                   + "\n" for line in lines)


def _snapshot_exists(config: Config, target_name: str, lun_id: int, name: str) -> None:
    """CliError unless the LUN has snapshot `name` on its medium."""
    from .assembly import backstore_kind, snapshot_params

    tc = next(t for t in config.targets if t.name == target_name)
    lc = next((c for c in tc.luns if c.id == lun_id), None)
    if lc is None or lc.snapshot is not None:
        raise CliError(f"target {target_name} has no LUN {lun_id} with snapshots", EXIT_CONFIG)
    kind = backstore_kind(config, tc, lc)
    try:
        found = kind.exists(snapshot_params(kind, lc, name))
    except OSError as exc:
        raise CliError(f"{lc.location}: {exc.strerror or exc}") from None
    if not found:
        raise CliError(f"LUN {lun_id} of {target_name} has no snapshot {name} (see `pytarget "
                       "snapshot list`)", EXIT_CONFIG)


def _expose(args: argparse.Namespace, path: Path, text: str, config: Config, target_name: str,
            lun_id: int, name: str) -> int:
    from . import confedit

    _snapshot_exists(config, target_name, lun_id, name)
    to = _pick_target(config, args.to or target_name)
    tc = next(t for t in config.targets if t.name == to)
    if any(lc.id == args.lun for lc in tc.luns):
        raise CliError(f"target {to} already has LUN {args.lun}", EXIT_CONFIG)
    if not 0 <= args.lun <= MAX_LUN:
        raise CliError(f"--lun must be 0..{MAX_LUN}", EXIT_CONFIG)
    ref = f"{lun_id}@{name}" if to == target_name else f"{target_name}/{lun_id}@{name}"
    try:
        result = confedit.add_lun(text, to, {"id": args.lun, "snapshot": ref})
    except confedit.EditError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    return _commit(path, text, result, f"snapshot {target_name}/{lun_id}@{name} shown "
                   f"read-only as LUN {args.lun} of {to}", args.no_reload)


def _unexpose(args: argparse.Namespace, path: Path, text: str, config: Config,
              target_name: str, lun_id: int, name: str) -> int:
    from . import confedit

    shown = [(tc.name, lc.id) for tc in config.targets for lc in tc.luns
             if lc.snapshot is not None and lc.snapshot.target == target_name
             and lc.snapshot.lun == lun_id and lc.snapshot.name == name]
    if not shown:
        raise CliError(f"no LUN shows snapshot {target_name}/{lun_id}@{name}", EXIT_CONFIG)
    result = None
    edited = text
    try:
        for tname, number in shown:
            result = confedit.remove_lun(edited, tname, number)
            edited = result.text
    except confedit.EditError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    luns = ", ".join(f"LUN {n} of {t}" for t, n in shown)
    return _commit(path, text, result, f"removed {luns} (snapshot {target_name}/{lun_id}@{name} "
                   "is kept)", args.no_reload)


def _clone(args: argparse.Namespace, path: Path, text: str, config: Config, target_name: str,
           lun_id: int, name: str) -> int:
    from . import confedit

    to = _pick_target(config, args.to or target_name)
    tc = next(t for t in config.targets if t.name == to)
    used = {lc.id for lc in tc.luns}
    new_id = args.id if args.id is not None else next(i for i in range(MAX_LUN + 1)
                                                      if i not in used)
    if new_id in used or not 0 <= new_id <= MAX_LUN:
        raise CliError(f"target {to} already has LUN {new_id}" if new_id in used
                       else f"--id must be 0..{MAX_LUN}", EXIT_CONFIG)
    ref: dict[str, Any] = {"target": target_name, "lun": lun_id, "name": name}
    if args.path is not None:
        absolute = Path(os.path.normpath(Path.cwd() / Path(args.path).expanduser()))
        result = _control(args, "snapshot_clone", SNAPSHOT_TIMEOUT, **ref,
                          file=str(absolute))
        entry: dict[str, Any] = {"id": new_id, "path": _config_relative(args.path, config.base)}
    else:
        result = _control(args, "snapshot_clone", SNAPSHOT_TIMEOUT, **ref, image=args.image,
                          pool=args.pool)
        params = result["params"]
        entry = {"id": new_id, "backstore": "rbd", "pool": params["pool"],
                 "image": params["image"]}
        entry.update((k, params[k]) for k in ("conf", "keyring", "client_id") if k in params)
    source = next(c for t in config.targets if t.name == target_name for c in t.luns
                  if c.id == lun_id)
    if source.block_size != 512:
        entry["block_size"] = source.block_size
    if not source.thin:
        entry["thin"] = False
    try:
        edit = confedit.add_lun(text, to, entry)
    except confedit.EditError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    where = entry.get("path") or f"{entry.get('pool')}/{entry.get('image')}"
    return _commit(path, text, edit, f"added LUN {new_id} of {to}: a clone of "
                   f"{target_name}/{lun_id}@{name} in {where}", args.no_reload)
