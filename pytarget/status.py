"""What `pytarget status` shows: the running target's state as a JSON-ready document
(`collect`, on the target's side of the control socket) and as tables (`render`, on the
command line's side).

The document holds the gateways (docs/guides/scale-out.md), targets and their LUNs (size,
allocated bytes, owner gateway and asymmetric access state, reservations), sessions
(initiator, ISID, portal, negotiated digests and lengths) and copy operations in progress with
their progress and throughput.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .copy.manager import CopyOperation, CopyService

if TYPE_CHECKING:
    from .config import Config
    from .iscsi.session import Session
    from .iscsi.target import TargetRegistry
    from .scsi.device import LogicalUnit


class _Located(Protocol):
    @property
    def path(self) -> Path: ...


class _Served(Protocol):
    @property
    def url(self) -> str: ...


class Running(Protocol):
    """What `collect` reads from the running server."""

    @property
    def registry(self) -> TargetRegistry: ...

    @property
    def config(self) -> Config: ...

    @property
    def logins(self) -> Mapping[Session, float]: ...

    @property
    def started(self) -> float: ...

    @property
    def control(self) -> _Located | None: ...

    @property
    def metrics(self) -> _Served | None: ...


def _address(address: Sequence[Any]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _reservation(lu: LogicalUnit) -> dict[str, Any] | None:
    """The LU's SPC-2 reservation and persistent reservation state, or None when it has none."""
    state = lu.pr.state
    spc2 = lu.reservation
    if spc2 is None and not state.registrations and state.type is None:
        return None
    holder = None
    if state.type is not None:
        holder = "all registrants" if state.holder is None else state.holder.port.text
    return {
        "spc2_holder": f"{spc2[0]},i,0x{spc2[1].hex()}" if spc2 is not None else None,
        "type": state.type.name if state.type is not None else None,
        "holder": holder,
        "generation": state.generation,
        "aptpl": state.aptpl,
        "registrations": [{"key": f"0x{reg.key:016x}", "initiator": reg.port.text,
                           "all_target_ports": reg.all_tg_pt}
                          for reg in state.registrations],
    }


def _access(lu: LogicalUnit) -> dict[str, Any]:
    """The LU's owner gateway and its asymmetric access state here and in every group."""
    alua = lu.alua
    owner = alua.groups.find(alua.owner)
    doc: dict[str, Any] = {"owner": owner.name or None,
                           "alua_state": alua.local_state.name.lower(),
                           "alua_states": alua.summary()}
    if lu.ownership is not None:
        doc["ownership"] = lu.ownership.describe()
    return doc


def _gateways(config: Config) -> list[dict[str, Any]]:
    return [{"name": g.name, "id": g.id, "portals": [_address(p) for p in g.portals],
             "local": g.name == config.gateway} for g in config.gateways]


def _copy(lu: LogicalUnit, op: CopyOperation, now: float) -> dict[str, Any]:
    done = op.moved(lu.block_size)
    elapsed = max(now - op.created, 1e-6)
    return {
        "operation": op.name,
        "list_id": op.list_id,
        "initiator": op.initiator,
        "target": op.target,
        "lun": lu.lun,
        "status": op.status.name.lower(),
        "bytes_done": done,
        "bytes_total": op.total_bytes,
        "percent": round(100.0 * done / op.total_bytes, 1) if op.total_bytes else None,
        "elapsed_seconds": round(elapsed, 3),
        "bytes_per_second": int(done / elapsed),
    }


def collect(server: Running) -> dict[str, Any]:
    """Everything `pytarget status` shows, from the live objects."""
    now = time.monotonic()
    registry = server.registry
    targets = []
    reservations = []
    copies = []
    for node in registry.targets.values():
        luns = []
        for lun, lu in sorted(node.luns.items()):
            backstore = lu.backstore
            allocated = None
            if backstore is not None and not backstore.closed:
                with contextlib.suppress(OSError):
                    allocated = backstore.allocated_bytes()
            luns.append({
                "lun": lun,
                "path": backstore.location if backstore is not None else None,
                "size_bytes": lu.nblocks * lu.block_size,
                "block_size": lu.block_size,
                "allocated_bytes": allocated,
                "readonly": lu.readonly,
                "thin": lu.thin,
                **_access(lu),
                "sanitize": lu.sanitize.describe(),
                "checkpoints": [{"name": cp.name, "exact": lu.checkpoints.exact(cp.name)}
                                for cp in lu.checkpoints.checkpoints],
            })
            pr = _reservation(lu)
            if pr is not None:
                reservations.append({"target": node.name, "lun": lun, **pr})
            service = lu.copy_service
            if isinstance(service, CopyService):
                copies += [_copy(lu, op, now) for op in service.running.values()]
        targets.append({
            "name": node.name,
            "alias": node.alias,
            "luns": luns,
            "sessions": sum(1 for s in registry.sessions.values() if s.target is node),
        })
    sessions = []
    for session in sorted(registry.sessions.values(), key=lambda s: s.tsih):
        p = session.params
        entry: dict[str, Any] = {
            "tsih": session.tsih,
            "type": p.session_type,
            "initiator": p.initiator_name,
            "isid": session.isid.hex(),
            "target": session.target.name if session.target is not None else None,
            "logged_in_seconds": round(now - server.logins.get(session, now), 1),
            "max_burst_length": p.max_burst_length,
            "first_burst_length": p.first_burst_length,
            "immediate_data": p.immediate_data,
            "initial_r2t": p.initial_r2t,
            "max_outstanding_r2t": p.max_outstanding_r2t,
            "connections": [],
        }
        for driver in session.connections:
            conn = driver.conn  # type: ignore[attr-defined]
            cp = conn.params
            entry["connections"].append({
                "cid": driver.cid,
                "portal": _address(conn.local_address),
                "peer": _address(conn.peer_address),
                "header_digest": "CRC32C" if cp.header_digest else "None",
                "data_digest": "CRC32C" if cp.data_digest else "None",
                "initiator_max_recv_data_segment_length":
                    cp.initiator_max_recv_data_segment_length,
                "target_max_recv_data_segment_length": cp.target_max_recv_data_segment_length,
                "commands_in_flight": len(driver.inflight),  # type: ignore[attr-defined]
            })
        sessions.append(entry)
    copies.sort(key=lambda c: (c["target"], c["lun"], c["list_id"]))
    qos = []
    for node in registry.targets.values():
        gate = next((lu.qos for lu in node.luns.values() if lu.qos is not None), None)
        if gate is not None:
            qos += [{"target": node.name, **policy} for policy in gate.snapshot()]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": round(now - server.started, 1),
        "config": server.config.file,
        "portals": [_address(p) for p in registry.portals],
        "gateway": server.config.gateway,
        "gateways": _gateways(server.config),
        "control_socket": str(server.control.path) if server.control is not None else None,
        "metrics": server.metrics.url if server.metrics is not None else None,
        "targets": targets,
        "sessions": sessions,
        "reservations": reservations,
        "copies": copies,
        "qos": qos,
    }


# ---------------------------------------------------------------- rendering
def size_text(n: int | None) -> str:
    """Bytes in binary units, as the configuration writes them (1.5GiB, 512MiB, 4KiB)."""
    if n is None:
        return "-"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n}B"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    text_rows = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip()
              for r in text_rows]
    return ["  " + line for line in lines]


_ALUA_TEXT = {"active_optimized": "active/optimized",
              "active_non_optimized": "active/non-optimized"}


def _alua_text(state: str) -> str:
    return _ALUA_TEXT.get(state, state)


def _access_by_gateway(doc: dict[str, Any], names: list[str]) -> list[str]:
    """Each LUN's access state in every gateway's group, with the seconds since this gateway
    last saw that gateway's heartbeat change (LUNs whose owner follows liveness)."""
    rows = []
    for t in doc["targets"]:
        for lun in t["luns"]:
            ownership = lun.get("ownership") or {}
            beats = ownership.get("heartbeats") or {}
            cells = []
            for name in names:
                cell = _alua_text(lun.get("alua_states", {}).get(name, "-"))
                if beats.get(name) is not None:
                    cell += f" ({beats[name]:.1f} s)"
                elif ownership:
                    cell += " (not seen)"
                cells.append(cell)
            epoch = ownership.get("epoch") if ownership else None
            rows.append((t["name"], lun["lun"], lun["owner"], epoch, *cells))
    return ["", "Access by gateway (heartbeat last seen):"] + _table(
        ("TARGET", "LUN", "OWNER", "EPOCH", *(n.upper() for n in names)), rows)


def render(doc: dict[str, Any]) -> str:
    """The status document as tables for a terminal."""
    out = [f"pytarget {doc['version']} (pid {doc['pid']}, up {doc['uptime_seconds']:.0f} s), "
           f"config {doc['config']}",
           f"portals: {', '.join(doc['portals']) or '-'}"
           + (f"; metrics: {doc['metrics']}" if doc.get("metrics") else "")]
    gateways = doc.get("gateways") or []
    if gateways:
        out += ["", f"Gateways (this is {doc['gateway']}):"]
        out += _table(("GATEWAY", "TPG", "PORTALS", ""),
                      [(g["name"], g["id"], ", ".join(g["portals"]),
                        "(this one)" if g["local"] else "") for g in gateways])
    rows: list[tuple[Any, ...]] = []
    for t in doc["targets"]:
        if not t["luns"]:
            rows.append((t["name"], "-", "-", "-", "-", "-", "-", t["sessions"])
                        + (("-", "-") if gateways else ()))
        for lun in t["luns"]:
            sanitize = lun.get("sanitize") or {}
            state = sanitize.get("state")
            flags = ",".join(f for f, on in (
                ("ro", lun["readonly"]), ("thin", lun["thin"]),
                (f"sanitizing {100 * sanitize.get('progress', 0):.0f}%", state == "running"),
                ("sanitize-failed", state == "failed"),
                (f"checkpoints:{len(lun.get('checkpoints', ()))}", lun.get("checkpoints")),
                ("checkpoint-inconsistent",
                 any(not cp["exact"] for cp in lun.get("checkpoints", ())))) if on) or "-"
            row: tuple[Any, ...] = (t["name"], lun["lun"], size_text(lun["size_bytes"]),
                                    size_text(lun["allocated_bytes"]), lun["block_size"],
                                    flags, lun["path"], t["sessions"])
            if gateways:
                row += (lun["owner"], _alua_text(lun["alua_state"]))
            rows.append(row)
    out += ["", "Targets and LUNs:"]
    out += _table(("TARGET", "LUN", "SIZE", "ALLOCATED", "BLOCK", "FLAGS", "PATH", "SESSIONS")
                  + (("OWNER", "ALUA (HERE)") if gateways else ()), rows)
    if gateways:
        out += _access_by_gateway(doc, [g["name"] for g in gateways])
    workers = doc.get("workers")  # `workers: N`: the pid of each worker process
    if workers:
        out += ["", f"Workers: {len(workers)} (pids {', '.join(str(p) for p in workers)})"]
    rows = []
    for s in doc["sessions"]:
        for c in s["connections"] or [{}]:
            digests = f"{c.get('header_digest', '-')}/{c.get('data_digest', '-')}"
            lengths = (f"{c.get('initiator_max_recv_data_segment_length', '-')}/"
                       f"{c.get('target_max_recv_data_segment_length', '-')}/"
                       f"{s['max_burst_length']}/{s['first_burst_length']}")
            rows.append((s["tsih"], s["initiator"], s["isid"], s["target"] or "(discovery)",
                         c.get("portal"), c.get("peer"), digests, lengths,
                         c.get("commands_in_flight")) + ((s["worker"],) if workers else ()))
    out += ["", "Sessions:" if rows else "Sessions: none"]
    if rows:
        out += _table(("TSIH", "INITIATOR", "ISID", "TARGET", "PORTAL", "PEER",
                       "DIGESTS(H/D)", "MRDSL(I/T)/BURST/FIRST", "IN-FLIGHT")
                      + (("WORKER",) if workers else ()), rows)
    rows = []
    for r in doc["reservations"]:
        rows.append((r["target"], r["lun"], r["type"] or ("SPC-2 RESERVE" if r["spc2_holder"]
                                                          else "-"),
                     r["holder"] or r["spc2_holder"], len(r["registrations"]),
                     "yes" if r["aptpl"] else "no"))
    out += ["", "Reservations:" if rows else "Reservations: none"]
    if rows:
        out += _table(("TARGET", "LUN", "TYPE", "HOLDER", "REGISTRATIONS", "APTPL"), rows)
    rows = []
    for c in doc["copies"]:
        percent = f"{c['percent']:.1f}%" if c["percent"] is not None else "-"
        rows.append((c["target"], c["lun"], c["operation"], c["list_id"], c["initiator"],
                     percent, f"{size_text(c['bytes_done'])}/{size_text(c['bytes_total'])}",
                     f"{size_text(c['bytes_per_second'])}/s", f"{c['elapsed_seconds']:.1f}s"))
    out += ["", "Copy operations in progress:" if rows else "Copy operations in progress: none"]
    if rows:
        out += _table(("TARGET", "LUN", "OPERATION", "LIST ID", "INITIATOR", "DONE", "BYTES",
                       "RATE", "ELAPSED"), rows)
    out += _qos_lines(doc.get("qos", []))
    return "\n".join(out) + "\n"


def _qos_lines(policies: list[dict[str, Any]]) -> list[str]:
    """QoS policies (docs/qos.md) with their flows and current rates."""
    def limits(values: dict[str, Any]) -> str:
        return " ".join(f"{k}={size_text(int(v)) + '/s' if k.endswith('bps') else f'{v:g}'}"
                        for k, v in values.items()) or "-"

    rows: list[tuple[Any, ...]] = []
    for p in policies:
        if not p["flows"]:
            rows.append((p["target"], p["policy"], limits(p["limits"]), "-", "-", "-", "-", "-",
                         "-"))
        for f in p["flows"]:
            rows.append((p["target"], p["policy"], limits(p["limits"]), f["flow"],
                         f"{f['iops']:g}", f"{size_text(f['read_bps'])}/s",
                         f"{size_text(f['write_bps'])}/s", f["queued"],
                         f"{f['throttled']}/{f['commands']}"))
    out = ["", "QoS policies and flows:" if rows else "QoS policies: none"]
    if rows:
        out += _table(("TARGET", "POLICY", "LIMITS", "FLOW", "IOPS", "READ", "WRITE", "QUEUED",
                       "THROTTLED/ALL"), rows)
    return out
