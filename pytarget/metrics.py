"""The metrics endpoint: the running target's counters in the Prometheus text exposition format
(version 0.0.4), served over HTTP at `/metrics` on the configured `metrics` address.

Everything is read at scrape time from the counters the layers keep anyway
(`LogicalUnit.stats_commands`, `stats_miscompares`, `stats_copy_bytes`, the copy manager's
operation counts, the session registry), so serving metrics adds nothing to the command path
beyond `LogicalUnit._account`'s row update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Protocol

from . import __version__
from .core import stats
from .core.table import Opcode

if TYPE_CHECKING:
    from .copy.manager import CopyManager
    from .iscsi.target import TargetRegistry


class Measured(Protocol):
    """What `render` reads from the running server."""

    @property
    def registry(self) -> TargetRegistry: ...

    @property
    def copy_manager(self) -> CopyManager: ...

    @property
    def drivers(self) -> Sized: ...

    @property
    def reloads(self) -> Mapping[str, int]: ...

log = logging.getLogger("pytarget.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Histogram bounds exported: every other power of two from 16 us to 16.8 s.
EXPORTED_BUCKETS = tuple(range(4, stats.TOP_BUCKET, 2))
MAX_HEADER_BYTES = 16384
HEADER_TIMEOUT = 10.0


def opcode_name(code: int) -> str:
    try:
        return Opcode(code).name
    except ValueError:
        return f"0x{code:02X}"


def _escape(value: object) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels(labels: dict[str, object]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[tuple[str, dict[str, object], float]] = []

    def add(self, value: float, labels: dict[str, object] | None = None,
            suffix: str = "") -> None:
        self.samples.append((suffix, labels or {}, value))

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for suffix, labels, value in self.samples:
            yield f"{self.name}{suffix}{_labels(labels)} {_number(value)}"


def render(server: Measured) -> str:
    """The exposition text for everything `server` runs now."""
    families: dict[str, _Family] = {}

    def family(name: str, kind: str, help_text: str) -> _Family:
        fam = families.get(name)
        if fam is None:
            fam = families[name] = _Family(name, kind, help_text)
        return fam

    family("pytarget_info", "gauge", "The running pytarget.").add(1, {"version": __version__})
    family("pytarget_reloads_total", "counter",
           "Configuration reloads, by outcome (applied or refused).")
    for outcome in ("applied", "refused"):
        families["pytarget_reloads_total"].add(server.reloads.get(outcome, 0),
                                               {"outcome": outcome})
    family("pytarget_connections", "gauge", "Open iSCSI connections.").add(len(server.drivers))
    sessions = family("pytarget_sessions", "gauge", "Logged-in iSCSI sessions, by target and type.")
    counts: dict[tuple[str, str], int] = {}
    for session in server.registry.sessions.values():
        key = (session.target.name if session.target else "", session.params.session_type)
        counts[key] = counts.get(key, 0) + 1
    for node in server.registry.targets.values():
        counts.setdefault((node.name, "Normal"), 0)
    for (target, kind), n in sorted(counts.items()):
        sessions.add(n, {"target": target, "type": kind})

    size = family("pytarget_lun_size_bytes", "gauge", "Capacity of a LUN.")
    allocated = family("pytarget_lun_allocated_bytes", "gauge",
                       "Bytes a LUN's backing store uses: the host file system's blocks of its "
                       "file, or the RBD objects of its image.")
    commands = family("pytarget_scsi_commands_total", "counter",
                      "SCSI commands completed, by LUN and operation code.")
    failed = family("pytarget_scsi_commands_failed_total", "counter",
                    "SCSI commands that ended with a status other than GOOD.")
    data = family("pytarget_scsi_data_bytes_total", "counter",
                  "Data transferred by SCSI commands; direction in: to the initiator "
                  "(Data-In), out: from the initiator (Data-Out).")
    latency = family("pytarget_scsi_command_duration_seconds", "histogram",
                     "Time from the start of a command's execution to its status.")
    miscompares = family("pytarget_caw_miscompares_total", "counter",
                         "COMPARE AND WRITE commands that ended in MISCOMPARE (failed ATS).")
    copy_bytes = family("pytarget_copy_bytes_total", "counter",
                        "Bytes copied into a LUN by third-party copy, by data path: reflink "
                        "(FICLONERANGE), copy_range (copy_file_range, RADOS copy-from between "
                        "RBD images), buffered (read and "
                        "write), hole (unallocated source ranges), zero (the block device "
                        "zero ROD token, by WRITE SAME).")
    copy_chunks = family("pytarget_copy_chunks_total", "counter",
                         "Copy chunks that used each data path (a chunk may use several).")
    for node in server.registry.targets.values():
        for lun, lu in sorted(node.luns.items()):
            where: dict[str, object] = {"target": node.name, "lun": lun}
            size.add(lu.nblocks * lu.block_size, where)
            if lu.backstore is not None and not lu.backstore.closed:
                with contextlib.suppress(OSError):
                    allocated.add(lu.backstore.allocated_bytes(), where)
            miscompares.add(lu.stats_miscompares, where)
            for path, n in sorted(lu.stats_copy_bytes.items()):
                copy_bytes.add(n, {**where, "path": path})
            for path, n in sorted(lu.stats_copy_paths.items()):
                copy_chunks.add(n, {**where, "path": path})
            for code, row in sorted(lu.stats_commands.items()):
                op = {**where, "opcode": opcode_name(code)}
                commands.add(row[stats.COMMANDS], op)
                failed.add(row[stats.NOT_GOOD], op)
                data.add(row[stats.DATA_IN], {**op, "direction": "in"})
                data.add(row[stats.DATA_OUT], {**op, "direction": "out"})
                cumulative = 0
                buckets = row[stats.FIRST_BUCKET:]
                last = 0
                for b in EXPORTED_BUCKETS:
                    cumulative += sum(buckets[last:b + 1])
                    last = b + 1
                    latency.add(cumulative,
                                {**op, "le": _number(stats.bucket_bound_seconds(b))}, "_bucket")
                latency.add(row[stats.COMMANDS], {**op, "le": "+Inf"}, "_bucket")
                latency.add(row[stats.LATENCY_NS] / 1e9, op, "_sum")
                latency.add(row[stats.COMMANDS], op, "_count")

    _qos_families(server, family)

    manager = server.copy_manager
    ops = family("pytarget_copy_operations_total", "counter",
                 "Copy operations (EXTENDED COPY, POPULATE TOKEN, WRITE USING TOKEN) that "
                 "ended, by outcome.")
    for (name, outcome), n in sorted(manager.stats_operations.items()):
        ops.add(n, {"operation": name, "outcome": outcome})
    moved = family("pytarget_copy_operation_bytes_total", "counter",
                   "Bytes moved by copy operations that ended, by operation.")
    for name, n in sorted(manager.stats_bytes.items()):
        moved.add(n, {"operation": name})
    family("pytarget_copy_operations_active", "gauge", "Copy operations in progress.").add(
        sum(s.active_count for s in manager.services))
    return "".join(line + "\n" for fam in families.values() for line in fam.lines())


def _qos_families(server: Measured, family: Callable[[str, str, str], _Family]) -> None:
    """Storage QoS (docs/qos.md): per flow of each policy, commands held and time held, and the
    current rates."""
    throttled = family("pytarget_qos_throttled_commands_total", "counter",
                       "Commands a QoS policy held before they started, by policy and flow.")
    commands = family("pytarget_qos_commands_total", "counter",
                      "Commands a QoS policy applied to, by policy and flow.")
    queued = family("pytarget_qos_queued_seconds_total", "counter",
                    "Time commands spent held by a QoS policy, by policy and flow.")
    waiting = family("pytarget_qos_queued_commands", "gauge",
                     "Commands held by a QoS policy now, by policy and flow.")
    iops = family("pytarget_qos_flow_iops", "gauge",
                  "Normalized IOs per second of a flow over the last second.")
    rate = family("pytarget_qos_flow_bytes_per_second", "gauge",
                  "Bytes per second of a flow over the last second, by direction (in: reads).")
    for node in server.registry.targets.values():
        gate = next((lu.qos for lu in node.luns.values() if lu.qos is not None), None)
        if gate is None:
            continue
        for policy in gate.snapshot():
            for flow in policy["flows"]:
                where = {"target": node.name, "policy": policy["policy"], "flow": flow["flow"]}
                throttled.add(flow["throttled"], where)
                commands.add(flow["commands"], where)
                queued.add(float(flow["queued_seconds"]), where)
                waiting.add(flow["queued"], where)
                iops.add(float(flow["iops"]), where)
                rate.add(flow["read_bps"], {**where, "direction": "in"})
                rate.add(flow["write_bps"], {**where, "direction": "out"})


class MetricsServer:
    """A minimal HTTP/1.1 server: GET /metrics answers `render()`, anything else 404/405."""

    def __init__(self, host: str, port: int, render_text: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self.render_text = render_text
        self.server: asyncio.base_events.Server | None = None
        self.address: tuple[str, int] = (host, port)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port,
                                                 reuse_address=True, limit=MAX_HEADER_BYTES)
        self.address = self.server.sockets[0].getsockname()[:2]
        log.info("metrics on %s", self.url)

    @property
    def url(self) -> str:
        host = self.address[0]
        return f"http://[{host}]:{self.address[1]}/metrics" if ":" in host \
            else f"http://{host}:{self.address[1]}/metrics"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            target = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", "only GET\n"
            elif target != "/metrics":
                status, body = "404 Not Found", "metrics are at /metrics\n"
            else:
                status, body = "200 OK", self.render_text()
            payload = body.encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                         .encode() + (payload if method != "HEAD" else b""))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
