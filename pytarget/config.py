"""The YAML configuration (luns/*.yaml) as validated dataclasses.

`load` checks the whole file before anything is created: unknown keys, bad sizes, duplicate LUN
ids and unusable paths are reported as one `ConfigError` naming the file and the key.
`assembly.prepare_backing_files` then creates missing backing files; it never resizes or
truncates an existing one.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .core.qos import (
    ANY_INITIATOR,
    BY_INITIATOR,
    BY_NEXUS,
    DEFAULT_BURST,
    NORMALIZE,
    InitiatorPolicy,
    Limits,
    LunPolicy,
    TargetPolicy,
)
from .iscsi.auth import MAX_NAME, MAX_SECRET, MIN_SECRET, ChapCredentials, ChapSecret
from .iscsi.bounds import Bounds

DEFAULT_CONFIG = Path("luns/default.yaml")
IQN_RE = re.compile(r"^(iqn\.\d{4}-\d{2}\.[^\s,]+|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16,32})$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
MAX_LUN = 16383


class ConfigError(Exception):
    def __init__(self, file: str, key: str, message: str) -> None:
        super().__init__(f"{file}: {key}: {message}")
        self.file = file
        self.key = key


@dataclass(frozen=True)
class ReservationsConfig:
    """Where a LUN's reservation state is shared with the other gateways serving it
    (docs/scale-out-consistency.md): one RADOS object in `pool`."""

    store: str
    pool: str
    object: str | None = None  # None: derived from the LUN's NAA identifier
    conf: Path = Path("/etc/ceph/ceph.conf")
    keyring: Path | None = None
    client_id: str = "admin"


@dataclass
class LunConfig:
    id: int
    path: Path | None  # the backing file (backstore: file); None for other kinds
    size: int | None = None
    block_size: int = 512
    readonly: bool = False
    thin: bool = True
    removable: bool = False
    serial: str | None = None
    backstore: str = "file"  # the kind of backing store (backstore.KINDS)
    reservations: ReservationsConfig | None = None  # None: this process's own (APTPL file)
    owner: str | None = None  # the gateway that owns the LUN (None: spread, `lun_owner`)
    rbd: dict[str, Any] = field(default_factory=dict)  # backstore: rbd: pool, image, ...
    sanitize_rate: int = 0  # bytes per second of a SANITIZE OVERWRITE; 0: unlimited
    atomic_write_size: int | None = None  # the WRITE ATOMIC(16) length; None: the default
    # `snapshot:`: this LUN is a read-only view of another LUN's snapshot; it then has that
    # LUN's backstore, path or image, block size and provisioning (docs/snapshots.md).
    snapshot: SnapshotSource | None = None
    checkpoint_granularity: int = 64 << 10  # bytes per bit of its checkpoints' dirty bitmaps

    @property
    def location(self) -> str:
        """Where the data lives, for messages: the file, or pool/image."""
        if self.path is not None:
            where = str(self.path)
        else:
            where = f"{self.rbd.get('pool')}/{self.rbd.get('image')}"
        return where if self.snapshot is None else f"{where}@{self.snapshot.name}"


@dataclass(frozen=True)
class SnapshotSource:
    """The snapshot a `snapshot:` LUN shows: snapshot `name` of LUN `lun` of target `target`."""

    target: str
    lun: int
    name: str

    def __str__(self) -> str:
        return f"{self.target}/{self.lun}@{self.name}"


SNAPSHOT_REF_RE = re.compile(r"^(?:(?P<target>[^/@]+)/)?(?P<lun>[0-9]+)@(?P<name>[^/@]+)$")
SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,62}$")  # backstore.SNAPSHOT_NAME


def parse_snapshot_ref(text: str, default_target: str | None) -> SnapshotSource:
    """`[TARGET-IQN/]LUN@SNAPSHOT` (the NBD export name of a snapshot); ValueError saying what
    is wrong. Without a target, `default_target` (ValueError when that is None too)."""
    match = SNAPSHOT_REF_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not [TARGET-IQN/]LUN@SNAPSHOT")
    target = match["target"] or default_target
    if target is None:
        raise ValueError(f"{text!r}: name the target (TARGET-IQN/LUN@SNAPSHOT)")
    lun = int(match["lun"])
    if lun > MAX_LUN:
        raise ValueError(f"{text!r}: LUN {lun} is not 0..{MAX_LUN}")
    check_snapshot_name(match["name"])
    return SnapshotSource(target, lun, match["name"])


def check_snapshot_name(name: str) -> None:
    if not SNAPSHOT_NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a snapshot name (1-63 of A-Z a-z 0-9 _ . + -, not "
                         "starting with . + or -)")


# backstore: rbd: the LUN's keys and their types (pool and image are required).
RBD_KEYS: dict[str, type] = {"pool": str, "image": str, "conf": str, "keyring": str,
                             "client_id": str, "object_size": int}


@dataclass
class GatewayConfig:
    """One gateway: a pytarget process serving the targets as a target port group of its
    own (docs/guides/scale-out.md)."""

    name: str
    id: int  # TARGET PORT GROUP, iSCSI TPGT and relative target port identifier
    portals: list[tuple[str, int]]
    metrics: tuple[str, int] | None = None


@dataclass
class FailoverConfig:
    """`failover:`: how gateways over a shared RBD image follow each other's liveness
    (cluster/ownership.py, docs/guides/scale-out.md)."""

    timeout: float = 8.0  # seconds without a heartbeat before a gateway is dead
    heartbeat: float = 1.0  # seconds between heartbeats


@dataclass
class AclConfig:
    initiator: str
    luns: list[int] | None = None  # None: every LUN of the target


@dataclass
class TargetConfig:
    name: str
    alias: str = ""
    luns: list[LunConfig] = field(default_factory=list)
    auth: ChapCredentials | None = None
    acl: list[AclConfig] | None = None  # None: any initiator, every LUN
    max_sessions: int = 0  # 0: only the global limit
    qos: TargetPolicy = field(default_factory=TargetPolicy)  # docs/qos.md


@dataclass
class Config:
    file: str
    base: Path
    portals: list[tuple[str, int]]
    targets: list[TargetConfig]
    # VPD 85h network services (SPC-4 7.8.9): (SERVICE TYPE, URL)
    management_addresses: list[tuple[int, str]] = field(default_factory=list)
    control_socket: Path | None = None  # None: the default next to the configuration
    control_group: str | None = None  # the socket is 0660 with this group, else 0600
    metrics: tuple[str, int] | None = None  # Prometheus endpoint address
    discovery_auth: ChapCredentials | None = None
    limits: Bounds = field(default_factory=Bounds)
    # How long the event loop polls before it sleeps (docs/performance.md); None: 100 µs when
    # the process may run on more than one CPU, else 0 (off).
    busy_poll_us: int | None = None
    nbd: NbdConfig | None = None  # the NBD front end; None: off
    gateways: list[GatewayConfig] = field(default_factory=list)  # empty: one process
    gateway: str | None = None  # which of `gateways` this process is
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    workers: int = 1  # processes serving sessions (docs/performance.md, *More than one core*)

    def poll_window(self) -> float:
        """The event loop's polling window in seconds."""
        if self.busy_poll_us is not None:
            return self.busy_poll_us / 1e6
        return DEFAULT_BUSY_POLL_US / 1e6 if len(os.sched_getaffinity(0)) > 1 else 0.0


@dataclass
class NbdConfig:
    """`nbd: "HOST[:PORT]"` and the `nbd_allow` lists of targets and LUNs (docs/nbd.md)."""

    address: tuple[str, int]
    # Client networks allowed per target name and per (target name, LUN id); a LUN's own list
    # replaces its target's, and without either only loopback clients are allowed.
    target_allow: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lun_allow: dict[tuple[str, int], tuple[str, ...]] = field(default_factory=dict)
    tls: NbdTls | None = None  # `nbd_tls`

    def allowed(self, target: str, lun: int) -> tuple[str, ...] | None:
        """The networks allowed to open a LUN's export, or None for the default (loopback)."""
        if (target, lun) in self.lun_allow:
            return self.lun_allow[(target, lun)]
        return self.target_allow.get(target)


@dataclass
class NbdTls:
    """`nbd_tls: {cert: PATH, key: PATH, ca: PATH, required: BOOL}`: the server's X.509
    certificate and key; with `ca`, clients must present a certificate it signed."""

    cert: Path
    key: Path
    ca: Path | None = None
    required: bool = True  # refuse every option but STARTTLS and ABORT before TLS


NBD_PORT = 10809
DEFAULT_BUSY_POLL_US = 100
MAX_BUSY_POLL_US = 10000
MAX_WORKERS = 64

MANAGEMENT_SERVICES = {
    "unspecified": 0x00, "storage-configuration": 0x01, "diagnostics": 0x02, "status": 0x03,
    "logging": 0x04, "code-download": 0x05, "copy": 0x06, "administrative-configuration": 0x07,
}


def parse_size(value: Any) -> int:
    """Bytes from 1073741824, "1GiB", "512MiB", "4K"... (binary units)."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("size must be positive")
        return value
    if not isinstance(value, str):
        raise ValueError("not a size")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"bad size {value!r}")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    n = int(m.group(1)) * _UNITS[unit]
    if n <= 0:
        raise ValueError("size must be positive")
    return n


def parse_portal(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
        if not host:
            host, port_text = port_text, ""
    port = int(port_text) if port_text else 3260
    if not 0 <= port < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, port


class _Reader:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, key, message)

    def mapping(self, value: Any, key: str, allowed: set[str],
                required: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "expected a mapping")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else str(k), "unknown key")
        for k in required:
            if k not in value:
                raise self.fail(f"{key}.{k}" if key else k, "missing")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "expected true or false")
        return value


def load(path: str | os.PathLike[str] | None, gateway: str | None = None) -> Config:
    """Read and validate a configuration; None means luns/default.yaml or the built-in one.
    `gateway` (the command line's --gateway) names this process's gateway over the file's
    `gateway:` key."""
    if path is None:
        if DEFAULT_CONFIG.exists():
            return load(DEFAULT_CONFIG, gateway)
        text = resources.files("pytarget").joinpath("default.yaml").read_text()
        return parse(text, "<built-in luns/default.yaml>", DEFAULT_CONFIG.parent, gateway)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), "-", f"cannot read: {exc.strerror}") from None
    return parse(text, str(p), p.resolve().parent, gateway)


def parse(text: str, file: str, base: Path, gateway: str | None = None) -> Config:
    r = _Reader(file)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "-"
        raise ConfigError(file, where, "invalid YAML") from None
    nbd = _nbd(r, doc, base)
    doc = r.mapping(doc if doc is not None else {}, "",
                    {"portals", "targets", "management_addresses", "control_socket",
                     "control_group", "metrics", "discovery_auth", "limits",
                     "busy_poll_us", "gateways", "gateway", "failover",
                     "workers"}, {"targets"})
    portals_raw = doc.get("portals", ["0.0.0.0:3260"])
    if not isinstance(portals_raw, list) or not portals_raw:
        raise r.fail("portals", "expected a non-empty list of HOST:PORT")
    portals = []
    for i, item in enumerate(portals_raw):
        try:
            portals.append(parse_portal(str(item)))
        except ValueError as exc:
            raise r.fail(f"portals[{i}]", str(exc)) from None
    targets_raw = doc["targets"]
    if not isinstance(targets_raw, list) or not targets_raw:
        raise r.fail("targets", "expected a non-empty list")
    targets: list[TargetConfig] = []
    names: set[str] = set()
    paths: dict[Path, str] = {}
    images: dict[tuple[Any, ...], str] = {}
    for ti, t in enumerate(targets_raw):
        tkey = f"targets[{ti}]"
        t = r.mapping(t, tkey, {"name", "alias", "luns", "auth", "acl", "max_sessions", "qos"},
                      {"name", "luns"})
        name = t["name"]
        if not isinstance(name, str) or not IQN_RE.match(name):
            raise r.fail(f"{tkey}.name", "not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id])")
        if name.lower() in names:
            raise r.fail(f"{tkey}.name", "duplicate target name")
        names.add(name.lower())
        alias = t.get("alias", "")
        if not isinstance(alias, str) or len(alias) > 255:
            raise r.fail(f"{tkey}.alias", "expected a string of at most 255 characters")
        luns_raw = t["luns"]
        if not isinstance(luns_raw, list):
            raise r.fail(f"{tkey}.luns", "expected a list")
        luns: list[LunConfig] = []
        ids: set[int] = set()
        for li, item in enumerate(luns_raw):
            lkey = f"{tkey}.luns[{li}]"
            item, owner = _lun_owner(r, item, lkey)
            lun = _lun(r, item, lkey, base)
            lun.owner = owner
            if lun.id in ids:
                raise r.fail(f"{lkey}.id", f"duplicate LUN id {lun.id}")
            ids.add(lun.id)
            if lun.snapshot is not None:
                pass  # shares its source's medium, resolved below
            elif lun.path is not None:
                resolved = lun.path.resolve()
                if resolved in paths:
                    raise r.fail(f"{lkey}.path", f"same file as {paths[resolved]}")
                paths[resolved] = f"{lkey}.path"
            else:
                image = (lun.rbd["pool"], lun.rbd["image"], lun.rbd.get("conf"))
                if image in images:
                    raise r.fail(f"{lkey}.image", f"same image as {images[image]}")
                images[image] = f"{lkey}.image"
            luns.append(lun)
        target = TargetConfig(name, alias, luns)
        _target_security(r, t, tkey, target, ids)
        target.qos = _qos(r, t, tkey)
        targets.append(target)
    _snapshot_luns(r, targets)
    config = Config(file, base, portals, targets, _management_addresses(r, doc))
    _operating(r, doc, config)
    config.discovery_auth = _auth(r, doc, "discovery_auth")
    config.limits = _limits(r, doc)
    _check_secrets(r, config)
    config.nbd = nbd
    _gateways(r, doc, config, gateway)
    config.failover = _failover(r, doc)
    _workers(r, doc, config)
    return config


def _failover(r: _Reader, doc: dict[str, Any]) -> FailoverConfig:
    """failover: {timeout: SECONDS, heartbeat: SECONDS}; the heartbeat must leave room for
    at least two heartbeats within the timeout."""
    failover = FailoverConfig()
    if "failover" not in doc:
        return failover
    raw = r.mapping(doc["failover"], "failover", {"timeout", "heartbeat"}, set())
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0.1 <= value <= 3600:
            raise r.fail(f"failover.{name}", "expected seconds, 0.1..3600")
        setattr(failover, name, float(value))
    if failover.heartbeat * 2 > failover.timeout:
        raise r.fail("failover.heartbeat", f"expected at most half of failover.timeout "
                     f"({failover.timeout:g} s)")
    return failover


def _workers(r: _Reader, doc: dict[str, Any], config: Config) -> None:
    """workers: N, the processes that serve sessions (1: the one process of old). What the
    worker processes cannot share yet is refused by name."""
    if "workers" not in doc:
        return
    raw = doc["workers"]
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_WORKERS:
        raise r.fail("workers", f"expected a number of processes, 1..{MAX_WORKERS}")
    config.workers = raw
    if raw == 1:
        return
    if config.nbd is not None:
        raise r.fail("nbd", "not served with workers > 1 (the NBD front end runs in one "
                     "process); remove nbd or set workers: 1")
    if config.metrics is not None:
        raise r.fail("metrics", "not served with workers > 1 (each worker keeps its own "
                     "counters); remove metrics or set workers: 1")
    if config.gateways:
        raise r.fail("workers", "not served with gateways yet (each worker would keep its own "
                     "heartbeat to the cluster); set workers: 1 on gateways")


# ---------------------------------------------------------------- gateways
_GATEWAY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _lun_owner(r: _Reader, item: Any, key: str) -> tuple[Any, str | None]:
    """A LUN's `owner: GATEWAY` taken out of its mapping (checked against the gateways by
    `_gateways`), and the rest of the mapping."""
    if not isinstance(item, dict) or "owner" not in item:
        return item, None
    rest = dict(item)
    owner = rest.pop("owner")
    if not isinstance(owner, str) or not owner:
        raise r.fail(f"{key}.owner", "expected the name of a gateway")
    return rest, owner


def _gateways(r: _Reader, doc: dict[str, Any], config: Config, chosen: str | None) -> None:
    """gateways: [{name: gw1, portals: [HOST:PORT, ...], id: 1, metrics: HOST:PORT}, ...]
    and gateway: NAME (this process; `chosen`, from --gateway, wins). With a gateway chosen,
    the process listens on that gateway's portals (and metrics endpoint, if it names one)."""
    raw = doc.get("gateways")
    if raw is None:
        for i, tc in enumerate(config.targets):
            for li, lc in enumerate(tc.luns):
                if lc.owner is not None:
                    raise r.fail(f"targets[{i}].luns[{li}].owner", "no gateways: are configured")
        if "gateway" in doc or chosen is not None:
            raise r.fail("gateway", "no gateways: are configured")
        return
    if not isinstance(raw, list) or not raw:
        raise r.fail("gateways", "expected a non-empty list of {name: NAME, portals: [...]}")
    if "portals" in doc:
        raise r.fail("portals", "with gateways:, each gateway lists its own portals")
    ids: set[int] = set()
    names: set[str] = set()
    for i, item in enumerate(raw):
        key = f"gateways[{i}]"
        item = r.mapping(item, key, {"name", "id", "portals", "metrics"}, {"name", "portals"})
        name = item["name"]
        if not isinstance(name, str) or not _GATEWAY_NAME_RE.match(name):
            raise r.fail(f"{key}.name", "expected 1-63 letters, digits, '.', '_' or '-'")
        if name in names:
            raise r.fail(f"{key}.name", f"duplicate gateway name {name}")
        names.add(name)
        gid = _count(r, item.get("id", i + 1), f"{key}.id", 1)
        if gid in ids:
            raise r.fail(f"{key}.id", f"duplicate gateway id {gid}")
        ids.add(gid)
        portals_raw = item["portals"]
        if not isinstance(portals_raw, list) or not portals_raw:
            raise r.fail(f"{key}.portals", "expected a non-empty list of HOST:PORT")
        portals = []
        for pi, text in enumerate(portals_raw):
            try:
                portals.append(parse_portal(str(text)))
            except ValueError as exc:
                raise r.fail(f"{key}.portals[{pi}]", str(exc)) from None
        metrics = None
        if "metrics" in item:
            text = item["metrics"]
            if not isinstance(text, str) or not text.rpartition(":")[2].isdigit():
                raise r.fail(f"{key}.metrics", 'expected "HOST:PORT", e.g. "127.0.0.1:9360"')
            try:
                metrics = parse_portal(text)
            except ValueError as exc:
                raise r.fail(f"{key}.metrics", str(exc)) from None
        config.gateways.append(GatewayConfig(name, gid, portals, metrics))
    for ti, tc in enumerate(config.targets):
        for li, lc in enumerate(tc.luns):
            if lc.owner is not None and lc.owner not in names:
                raise r.fail(f"targets[{ti}].luns[{li}].owner",
                             "not a gateway: one of " + ", ".join(sorted(names)))
    if chosen is None and "gateway" in doc:
        chosen = doc["gateway"]
        if not isinstance(chosen, str):
            raise r.fail("gateway", "expected the name of a gateway")
    if chosen is not None:
        use_gateway(config, chosen)


def use_gateway(config: Config, name: str) -> GatewayConfig:
    """Make the gateway `name` this process: its portals (and metrics endpoint) are the
    ones it listens on."""
    for gw in config.gateways:
        if gw.name == name:
            config.gateway = name
            config.portals = list(gw.portals)
            if gw.metrics is not None:
                config.metrics = gw.metrics
            return gw
    raise ConfigError(config.file, "gateway", f"no gateway {name!r} in gateways: (one of "
                      + ", ".join(g.name for g in config.gateways) + ")")


def local_gateway(config: Config) -> GatewayConfig | None:
    """This process's gateway; None without `gateways:`. ConfigError when gateways are
    configured but none is chosen (`gateway: NAME` or `pytarget serve --gateway NAME`)."""
    if not config.gateways:
        return None
    for gw in config.gateways:
        if gw.name == config.gateway:
            return gw
    raise ConfigError(config.file, "gateway", "name this process's gateway (gateway: NAME or "
                      "--gateway NAME), one of " + ", ".join(g.name for g in config.gateways))


def lun_owner(config: Config, lc: LunConfig) -> GatewayConfig | None:
    """The gateway that owns a LUN: its `owner`, else the gateways in order by LUN id
    (LUN n on gateways[n mod N]); None without `gateways:`."""
    if not config.gateways:
        return None
    if lc.owner is not None:
        return next(g for g in config.gateways if g.name == lc.owner)
    return config.gateways[lc.id % len(config.gateways)]


def _target_security(r: _Reader, t: dict[str, Any], key: str, target: TargetConfig,
                     lun_ids: set[int]) -> None:
    """auth, acl and max_sessions of one target (docs/security.md)."""
    target.auth = _auth(r, t, f"{key}.auth")
    if "max_sessions" in t:
        target.max_sessions = _count(r, t["max_sessions"], f"{key}.max_sessions", 1)
    if "acl" not in t:
        return
    raw = t["acl"]
    if not isinstance(raw, list):
        raise r.fail(f"{key}.acl", "expected a list of {initiator: NAME, luns: [IDS]}")
    target.acl = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        ekey = f"{key}.acl[{i}]"
        item = r.mapping(item, ekey, {"initiator", "luns"}, {"initiator"})
        initiator = item["initiator"]
        if not isinstance(initiator, str) or not IQN_RE.match(initiator):
            raise r.fail(f"{ekey}.initiator", "not an iSCSI name")
        if initiator.lower() in seen:
            raise r.fail(f"{ekey}.initiator", "listed twice")
        seen.add(initiator.lower())
        luns = None
        if "luns" in item:
            luns = item["luns"]
            if not isinstance(luns, list) or any(
                    isinstance(n, bool) or not isinstance(n, int) for n in luns):
                raise r.fail(f"{ekey}.luns", "expected a list of LUN ids")
            for n in luns:
                if n not in lun_ids:
                    raise r.fail(f"{ekey}.luns", f"no LUN {n} in this target")
            if len(set(luns)) != len(luns):
                raise r.fail(f"{ekey}.luns", "a LUN is listed twice")
        target.acl.append(AclConfig(initiator, luns))


def _auth(r: _Reader, doc: dict[str, Any], key: str) -> ChapCredentials | None:
    """{chap: {user: U, secret: S}, mutual: {user: T, secret: S2}}; mutual is optional."""
    leaf = key.rpartition(".")[2]
    if leaf not in doc:
        return None
    raw = r.mapping(doc[leaf], key, {"chap", "mutual"}, {"chap"})
    chap = _chap_secret(r, raw["chap"], f"{key}.chap")
    mutual = _chap_secret(r, raw["mutual"], f"{key}.mutual") if "mutual" in raw else None
    if mutual is not None and mutual.secret == chap.secret:
        # RFC 7143 12.1.3: a secret authenticates one direction only
        raise r.fail(f"{key}.mutual.secret", "must differ from chap.secret")
    return ChapCredentials(chap, mutual)


def _chap_secret(r: _Reader, raw: Any, key: str) -> ChapSecret:
    raw = r.mapping(raw, key, {"user", "secret"}, {"user", "secret"})
    user = raw["user"]
    if not isinstance(user, str) or not 0 < len(user.encode()) <= MAX_NAME \
            or not user.isprintable():
        raise r.fail(f"{key}.user", f"expected 1-{MAX_NAME} printable characters")
    secret = raw["secret"]
    if not isinstance(secret, str) or "\0" in secret:
        raise r.fail(f"{key}.secret", "expected a string")
    data = secret.encode()
    if len(data) < MIN_SECRET:
        # RFC 7143 12.1.3: secrets under 96 bits need IPsec, which pytarget does not do
        raise r.fail(f"{key}.secret", f"shorter than {MIN_SECRET} bytes (RFC 7143 12.1.3)")
    if len(data) > MAX_SECRET:
        raise r.fail(f"{key}.secret", f"longer than {MAX_SECRET} bytes")
    return ChapSecret(user, data)


def _check_secrets(r: _Reader, config: Config) -> None:
    """A secret that authenticates initiators must not also authenticate a target."""
    initiator_side: dict[bytes, str] = {}
    target_side: dict[bytes, str] = {}
    places = [(f"targets[{i}].auth", t.auth) for i, t in enumerate(config.targets)]
    places.append(("discovery_auth", config.discovery_auth))
    for key, creds in places:
        if creds is None:
            continue
        initiator_side.setdefault(creds.chap.secret, f"{key}.chap.secret")
        if creds.mutual is not None:
            target_side.setdefault(creds.mutual.secret, f"{key}.mutual.secret")
    for key, creds in places:
        if creds is not None and creds.mutual is not None \
                and creds.mutual.secret in initiator_side:
            raise r.fail(f"{key}.mutual.secret",
                         f"also used as {initiator_side[creds.mutual.secret]}")


_LIMIT_KEYS = {"max_connections": int, "max_sessions": int, "data_out_memory": "size",
               "session_data_out_memory": "size", "login_timeout": float,
               "auth_failure_delay": float, "nop_interval": float, "nop_timeout": float,
               "pdu_timeout": float, "send_timeout": float, "output_high_water": "size"}


def _limits(r: _Reader, doc: dict[str, Any]) -> Bounds:
    """limits: the bounds of iscsi.bounds.Bounds, each optional (docs/security.md)."""
    bounds = Bounds()
    if "limits" not in doc:
        return bounds
    raw = r.mapping(doc["limits"], "limits", set(_LIMIT_KEYS), set())
    for name, value in raw.items():
        key = f"limits.{name}"
        kind = _LIMIT_KEYS[name]
        if kind is int:
            setattr(bounds, name, _count(r, value, key, 1))
        elif kind == "size":
            try:
                setattr(bounds, name, parse_size(value))
            except ValueError as exc:
                raise r.fail(key, str(exc)) from None
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value <= 86400:
                raise r.fail(key, "expected seconds, 0..86400")
            setattr(bounds, name, float(value))
    for name in ("login_timeout", "pdu_timeout", "send_timeout"):
        if getattr(bounds, name) <= 0:
            raise r.fail(f"limits.{name}", "must be more than 0 seconds")
    if bounds.data_out_memory < 32 << 20:
        raise r.fail("limits.data_out_memory", "must hold one 32 MiB write (at least 32MiB)")
    if bounds.session_data_out_memory > bounds.data_out_memory:
        raise r.fail("limits.session_data_out_memory", "larger than limits.data_out_memory")
    if bounds.session_data_out_memory < 32 << 20:
        raise r.fail("limits.session_data_out_memory", "at least 32MiB")
    return bounds


def _count(r: _Reader, value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise r.fail(key, f"expected an integer {low}..65535")
    return value


def _operating(r: _Reader, doc: dict[str, Any], config: Config) -> None:
    """control_socket: PATH, control_group: NAME, metrics: "HOST:PORT", busy_poll_us: N."""
    if "busy_poll_us" in doc:
        raw = doc["busy_poll_us"]
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_BUSY_POLL_US:
            raise r.fail("busy_poll_us", f"expected microseconds, 0..{MAX_BUSY_POLL_US} (0: off)")
        config.busy_poll_us = raw
    if "control_socket" in doc:
        raw = doc["control_socket"]
        if not isinstance(raw, str) or not raw:
            raise r.fail("control_socket", "expected a file path")
        path = Path(raw)
        config.control_socket = path if path.is_absolute() else config.base / path
    if "control_group" in doc:
        group = doc["control_group"]
        if not isinstance(group, str) or not group:
            raise r.fail("control_group", "expected a group name")
        config.control_group = group
    if "metrics" in doc:
        raw = doc["metrics"]
        if not isinstance(raw, str) or not raw.rpartition(":")[2].isdigit():
            raise r.fail("metrics", 'expected "HOST:PORT", e.g. "127.0.0.1:9360"')
        try:
            config.metrics = parse_portal(raw)
        except ValueError as exc:
            raise r.fail("metrics", str(exc)) from None


def _management_addresses(r: _Reader, doc: dict[str, Any]) -> list[tuple[int, str]]:
    """management_addresses: [{service: copy, url: "iscsi://192.0.2.1:3260"}, ...]"""
    raw = doc.get("management_addresses", [])
    if not isinstance(raw, list):
        raise r.fail("management_addresses", "expected a list")
    out: list[tuple[int, str]] = []
    for i, item in enumerate(raw):
        key = f"management_addresses[{i}]"
        item = r.mapping(item, key, {"service", "url"}, {"service", "url"})
        service = item["service"]
        if service not in MANAGEMENT_SERVICES:
            raise r.fail(f"{key}.service", "one of " + ", ".join(MANAGEMENT_SERVICES))
        url = item["url"]
        if not isinstance(url, str) or not url.isascii() or not 0 < len(url) <= 250:
            raise r.fail(f"{key}.url", "expected a URL of 1-250 ASCII characters")
        out.append((MANAGEMENT_SERVICES[service], url))
    return out


def _snapshot_lun(r: _Reader, item: dict[str, Any], key: str) -> LunConfig:
    """`{id: N, snapshot: "[TARGET-IQN/]LUN@SNAPSHOT"}`, its medium resolved later
    (`_snapshot_luns`); its target `""` stands for the LUN's own."""
    item = r.mapping(item, key, {"id", "snapshot", "serial"}, {"id", "snapshot"})
    lun_id = item["id"]
    if isinstance(lun_id, bool) or not isinstance(lun_id, int) or not 0 <= lun_id <= MAX_LUN:
        raise r.fail(f"{key}.id", f"expected an integer 0..{MAX_LUN}")
    raw = item["snapshot"]
    if not isinstance(raw, str):
        raise r.fail(f"{key}.snapshot", "expected [TARGET-IQN/]LUN@SNAPSHOT")
    try:
        source = parse_snapshot_ref(raw, "")
    except ValueError as exc:
        raise r.fail(f"{key}.snapshot", str(exc)) from None
    serial = item.get("serial")
    if serial is not None and (not isinstance(serial, str) or not serial.isascii()
                               or not 0 < len(serial) <= 32):
        raise r.fail(f"{key}.serial", "expected 1-32 ASCII characters")
    return LunConfig(lun_id, None, readonly=True, serial=serial, snapshot=source)


def _snapshot_luns(r: _Reader, targets: list[TargetConfig]) -> None:
    """Give each `snapshot:` LUN the medium of the LUN it shows a snapshot of."""
    by_name = {t.name.lower(): t for t in targets}
    shown: dict[SnapshotSource, str] = {}
    for ti, tc in enumerate(targets):
        for li, lc in enumerate(tc.luns):
            if lc.snapshot is None:
                continue
            key = f"targets[{ti}].luns[{li}].snapshot"
            ref = lc.snapshot
            source_target = by_name.get((ref.target or tc.name).lower())
            if source_target is None:
                raise r.fail(key, f"no target {ref.target}")
            source = next((s for s in source_target.luns if s.id == ref.lun), None)
            if source is None:
                raise r.fail(key, f"target {source_target.name} has no LUN {ref.lun}")
            if source.snapshot is not None:
                raise r.fail(key, f"LUN {ref.lun} of {source_target.name} is itself a "
                                  "snapshot")
            lc.snapshot = SnapshotSource(source_target.name, ref.lun, ref.name)
            if lc.snapshot in shown:
                raise r.fail(key, f"{lc.snapshot} is already shown by {shown[lc.snapshot]}")
            shown[lc.snapshot] = f"targets[{ti}].luns[{li}]"
            lc.path, lc.rbd, lc.backstore = source.path, dict(source.rbd), source.backstore
            lc.block_size, lc.thin = source.block_size, source.thin


def _lun(r: _Reader, item: Any, key: str, base: Path) -> LunConfig:
    if isinstance(item, dict) and "snapshot" in item:
        return _snapshot_lun(r, item, key)
    backstore = item.get("backstore", "file") if isinstance(item, dict) else "file"
    common = {"id", "size", "block_size", "readonly", "thin", "removable", "serial",
              "backstore", "reservations", "sanitize_rate",
              "atomic_write_size", "qos", "checkpoint_granularity"}
    if backstore == "rbd":
        item = r.mapping(item, key, common | set(RBD_KEYS), {"id", "pool", "image"})
    else:
        item = r.mapping(item, key, common | {"path"}, {"id", "path"})
    lun_id = item["id"]
    if isinstance(lun_id, bool) or not isinstance(lun_id, int) or not 0 <= lun_id <= MAX_LUN:
        raise r.fail(f"{key}.id", f"expected an integer 0..{MAX_LUN}")
    path: Path | None = None
    rbd: dict[str, Any] = {}
    if backstore == "rbd":
        rbd = _rbd_keys(r, item, key, base)
    else:
        path_raw = item["path"]
        if not isinstance(path_raw, str) or not path_raw:
            raise r.fail(f"{key}.path", "expected a file path")
        path = Path(path_raw)
        if not path.is_absolute():
            path = base / path
    block_size = item.get("block_size", 512)
    if block_size not in (512, 4096):
        raise r.fail(f"{key}.block_size", "must be 512 or 4096")
    size = None
    if "size" in item:
        try:
            size = parse_size(item["size"])
        except ValueError as exc:
            raise r.fail(f"{key}.size", str(exc)) from None
        if size % block_size:
            raise r.fail(f"{key}.size", f"not a multiple of the block size {block_size}")
    readonly = r.boolean(item.get("readonly", False), f"{key}.readonly")
    thin = r.boolean(item.get("thin", True), f"{key}.thin")
    removable = r.boolean(item.get("removable", False), f"{key}.removable")
    serial = item.get("serial")
    if serial is not None and (not isinstance(serial, str) or not serial.isascii()
                               or not 0 < len(serial) <= 32):
        raise r.fail(f"{key}.serial", "expected 1-32 ASCII characters")
    if not isinstance(backstore, str) or not backstore:
        raise r.fail(f"{key}.backstore", "expected the name of a kind of backing store")
    sanitize_rate = 0
    if "sanitize_rate" in item:
        try:
            sanitize_rate = parse_size(item["sanitize_rate"])
        except ValueError as exc:
            raise r.fail(f"{key}.sanitize_rate", f"{exc} (bytes per second)") from None
    atomic_write_size = None
    if "atomic_write_size" in item:
        try:
            atomic_write_size = parse_size(item["atomic_write_size"])
        except ValueError as exc:
            raise r.fail(f"{key}.atomic_write_size", str(exc)) from None
        if atomic_write_size & (atomic_write_size - 1) or atomic_write_size < block_size:
            raise r.fail(f"{key}.atomic_write_size",
                         f"must be a power of two of at least the block size {block_size}")
    lun = LunConfig(lun_id, path, size, block_size, readonly, thin, removable, serial, backstore,
                    rbd=rbd, sanitize_rate=sanitize_rate, atomic_write_size=atomic_write_size)
    if "checkpoint_granularity" in item:
        try:
            granularity = parse_size(item["checkpoint_granularity"])
        except ValueError as exc:
            raise r.fail(f"{key}.checkpoint_granularity", str(exc)) from None
        if granularity & (granularity - 1) or not block_size <= granularity <= 1 << 30:
            raise r.fail(f"{key}.checkpoint_granularity",
                         f"must be a power of two from the block size {block_size} to 1GiB")
        lun.checkpoint_granularity = granularity
    if "reservations" in item:
        lun.reservations = _reservations(r, item["reservations"], f"{key}.reservations", base)
    if path is not None:
        _check_path(r, lun, key)
    return lun


def _rbd_keys(r: _Reader, item: dict[str, Any], key: str, base: Path) -> dict[str, Any]:
    """The keys of a `backstore: rbd` LUN, as the RBD backstore's parameters. Whether the
    image exists is known only once the cluster is reached: `size` creates it when missing,
    and a missing image without a size fails the start naming the LUN."""
    out: dict[str, Any] = {}
    for name, kind in RBD_KEYS.items():
        if name not in item:
            continue
        value = item[name]
        if kind is int:
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise r.fail(f"{key}.{name}", str(exc)) from None
            if value < 4096 or value & (value - 1):
                raise r.fail(f"{key}.{name}", "expected a power of two from 4KiB")
        elif not isinstance(value, str) or not value or "\0" in value:
            raise r.fail(f"{key}.{name}", "expected a non-empty string")
        elif name in ("conf", "keyring"):
            file = Path(value) if Path(value).is_absolute() else base / value
            if not os.access(file, os.R_OK):
                raise r.fail(f"{key}.{name}", f"{file} is not a readable file")
            value = str(file)
        out[name] = value
    return out


RESERVATION_STORES = ("rados",)


def _reservations(r: _Reader, raw: Any, key: str, base: Path) -> ReservationsConfig:
    """A LUN's `reservations:` mapping: `store: rados`, `pool`, and optionally `object`,
    `conf`, `keyring`, `client_id` (relative paths from the configuration's directory)."""
    item = r.mapping(raw, key, {"store", "pool", "object", "conf", "keyring", "client_id"},
                     {"store", "pool"})
    if item["store"] not in RESERVATION_STORES:
        raise r.fail(f"{key}.store", "one of " + ", ".join(RESERVATION_STORES))
    texts: dict[str, str] = {}
    for name in ("pool", "object", "conf", "keyring", "client_id"):
        if name in item:
            value = item[name]
            if not isinstance(value, str) or not value or not value.isprintable() \
                    or len(value) > 255:
                raise r.fail(f"{key}.{name}", "expected a non-empty name of at most 255 "
                             "printable characters")
            texts[name] = value
    paths: dict[str, Path] = {}
    for name in ("conf", "keyring"):
        if name in texts:
            path = Path(texts[name])
            paths[name] = path if path.is_absolute() else base / path
    conf = paths.get("conf", ReservationsConfig.conf)
    for name, path in (("conf", conf), ("keyring", paths.get("keyring", conf))):
        if not os.access(path, os.R_OK):
            raise r.fail(f"{key}.{name}", f"{path} is not a readable file")
    return ReservationsConfig(item["store"], texts["pool"], texts.get("object"), conf,
                              paths.get("keyring"), texts.get("client_id", "admin"))


def _check_path(r: _Reader, lun: LunConfig, key: str) -> None:
    path = lun.path
    assert path is not None
    if path.exists():
        mode = os.R_OK if lun.readonly else os.R_OK | os.W_OK
        if not path.is_file() and not path.is_block_device():
            raise r.fail(f"{key}.path", f"{path} is not a regular file")
        if not os.access(path, mode):
            wanted = "readable" if lun.readonly else "readable and writable"
            raise r.fail(f"{key}.path", f"{path} is not {wanted}")
        if path.stat().st_size < lun.block_size and path.is_file():
            raise r.fail(f"{key}.path", f"{path} is smaller than one block")
        return
    if lun.size is None:
        raise r.fail(f"{key}.size", f"{path} does not exist and no size is given to create it")
    if lun.readonly:
        raise r.fail(f"{key}.path", f"{path} does not exist (read-only LUNs are never created)")
    parent = path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise r.fail(f"{key}.path", f"cannot create {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise r.fail(f"{key}.path", f"cannot create {path}: {probe} is not writable")


def _nbd(r: _Reader, doc: Any, base: Path) -> NbdConfig | None:
    """`nbd: "HOST[:PORT]"` (10809 when no port is given) at the top level, and `nbd_allow:
    [NETWORK, ...]` in a target or a LUN: taken out of `doc` before the rest is checked. An
    `nbd_allow` without `nbd` is refused (it would do nothing)."""
    if not isinstance(doc, dict):
        return None
    raw = doc.pop("nbd", None)
    config: NbdConfig | None = None
    if raw is not None:
        if not isinstance(raw, str) or not raw.strip():
            raise r.fail("nbd", 'expected "HOST:PORT" or "HOST", e.g. "127.0.0.1:10809"')
        text = raw.strip()
        try:
            if text.startswith("["):
                host, port = parse_portal(text if "]:" in text else text + f":{NBD_PORT}")
            elif text.count(":") == 1:
                host, port = parse_portal(text)
            else:
                host, port = text, NBD_PORT  # a host name, IPv4 or a bare IPv6 address
        except ValueError as exc:
            raise r.fail("nbd", str(exc)) from None
        if not host:
            raise r.fail("nbd", "expected a host address")
        config = NbdConfig((host, port))
    if "nbd_tls" in doc:
        tls_raw = doc.pop("nbd_tls")
        if config is None:
            raise r.fail("nbd_tls", 'has no effect without a top-level `nbd: "HOST:PORT"`')
        config.tls = _nbd_tls(r, tls_raw, base)
    targets = doc.get("targets")
    for ti, t in enumerate(targets if isinstance(targets, list) else []):
        if not isinstance(t, dict):
            continue
        name = t.get("name")
        if "nbd_allow" in t:
            allow = _nbd_allow(r, t.pop("nbd_allow"), f"targets[{ti}].nbd_allow", config)
            if config is not None and isinstance(name, str):
                config.target_allow[name] = allow
        luns = t.get("luns")
        for li, lun in enumerate(luns if isinstance(luns, list) else []):
            if isinstance(lun, dict) and "nbd_allow" in lun:
                key = f"targets[{ti}].luns[{li}].nbd_allow"
                allow = _nbd_allow(r, lun.pop("nbd_allow"), key, config)
                if config is not None and isinstance(name, str) \
                        and isinstance(lun.get("id"), int):
                    config.lun_allow[(name, lun["id"])] = allow
    return config


def _nbd_allow(r: _Reader, raw: Any, key: str, config: NbdConfig | None) -> tuple[str, ...]:
    if config is None:
        raise r.fail(key, 'has no effect without a top-level `nbd: "HOST:PORT"`')
    if not isinstance(raw, list):
        raise r.fail(key, 'expected a list of client addresses or networks, e.g. '
                          '["192.0.2.0/24", "::1"]')
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(str(ipaddress.ip_network(str(item), strict=False)))
        except ValueError:
            raise r.fail(f"{key}[{i}]", f"not an address or network: {item!r}") from None
    return tuple(out)


def _nbd_tls(r: _Reader, raw: Any, base: Path) -> NbdTls:
    raw = r.mapping(raw, "nbd_tls", {"cert", "key", "ca", "required"}, {"cert", "key"})
    paths: dict[str, Path] = {}
    for name in ("cert", "key", "ca"):
        if name not in raw:
            continue
        value = raw[name]
        if not isinstance(value, str) or not value:
            raise r.fail(f"nbd_tls.{name}", "expected a file path")
        path = Path(value)
        if not path.is_absolute():
            path = base / path
        if not path.is_file() or not os.access(path, os.R_OK):
            raise r.fail(f"nbd_tls.{name}", f"{path} is not a readable file")
        paths[name] = path
    required = r.boolean(raw.get("required", True), "nbd_tls.required")
    return NbdTls(paths["cert"], paths["key"], paths.get("ca"), required)


_QOS_RATES = ("iops", "bps", "read_bps", "write_bps")
MAX_QOS_IOPS = 10**9
MAX_QOS_BURST = 60.0


def _qos(r: _Reader, t: dict[str, Any], key: str) -> TargetPolicy:
    """A target's QoS policies: `qos` of the target (normalize, initiators) and of each LUN
    (maximums, initiators with maximums and minimums); docs/qos.md."""
    normalize = NORMALIZE
    initiators: tuple[InitiatorPolicy, ...] = ()
    if "qos" in t:
        raw = r.mapping(t["qos"], f"{key}.qos", {"normalize", "initiators"}, set())
        if "normalize" in raw:
            try:
                normalize = parse_size(raw["normalize"])
            except ValueError as exc:
                raise r.fail(f"{key}.qos.normalize", str(exc)) from None
            if not 512 <= normalize <= 1 << 20:
                raise r.fail(f"{key}.qos.normalize", "expected 512B..1MiB")
        initiators = _qos_initiators(r, raw, f"{key}.qos", minimums=False)
    luns: list[tuple[int, LunPolicy]] = []
    for li, item in enumerate(t["luns"]):
        if not isinstance(item, dict) or "qos" not in item:
            continue
        lkey = f"{key}.luns[{li}].qos"
        raw = r.mapping(item["qos"], lkey, {*_QOS_RATES, "burst", "initiators"}, set())
        limits = _qos_limits(r, raw, lkey, minimum=False)
        per_lun = _qos_initiators(r, raw, lkey, minimums=True)
        reserved = 0.0
        for i, p in enumerate(per_lun):
            if p.limits.min_iops is None:
                continue
            where = f"{lkey}.initiators[{i}].min_iops"
            if limits.iops is None:
                raise r.fail(where, f"needs {lkey}.iops: minimums are reserved out of the "
                             "LUN's maximum")
            if p.initiator != ANY_INITIATOR and p.per == BY_INITIATOR:
                reserved += p.limits.min_iops
            if reserved > limits.iops or p.limits.min_iops > limits.iops:
                raise r.fail(where, f"minimums add up to more than {lkey}.iops")
        luns.append((item["id"], LunPolicy(limits, per_lun)))
    return TargetPolicy(tuple(luns), initiators, normalize)


def _qos_initiators(r: _Reader, raw: dict[str, Any], key: str,
                    minimums: bool) -> tuple[InitiatorPolicy, ...]:
    if "initiators" not in raw:
        return ()
    items = raw["initiators"]
    if not isinstance(items, list):
        raise r.fail(f"{key}.initiators", "expected a list of {initiator: NAME or '*', ...}")
    out: list[InitiatorPolicy] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        ikey = f"{key}.initiators[{i}]"
        allowed = {"initiator", "per", "burst", *_QOS_RATES} | ({"min_iops"} if minimums
                                                                 else set())
        item = r.mapping(item, ikey, allowed, {"initiator"})
        name = item["initiator"]
        if not isinstance(name, str) or not (name == ANY_INITIATOR or IQN_RE.match(name)):
            raise r.fail(f"{ikey}.initiator", "expected an iSCSI name or '*' (every initiator)")
        if name.lower() in seen:
            raise r.fail(f"{ikey}.initiator", "listed twice")
        seen.add(name.lower())
        per = item.get("per", BY_INITIATOR)
        if per not in (BY_INITIATOR, BY_NEXUS):
            raise r.fail(f"{ikey}.per", f"one of {BY_INITIATOR}, {BY_NEXUS}")
        limits = _qos_limits(r, item, ikey, minimum=minimums)
        if not limits.limited and limits.min_iops is None:
            raise r.fail(ikey, "sets no limit (iops, bps, read_bps, write_bps"
                         + (", min_iops)" if minimums else ")"))
        out.append(InitiatorPolicy(name, limits, per))
    return tuple(out)


def _qos_limits(r: _Reader, raw: dict[str, Any], key: str, minimum: bool) -> Limits:
    values: dict[str, float] = {}
    for name in _QOS_RATES:
        if name not in raw:
            continue
        value = raw[name]
        if name == "iops":
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value <= MAX_QOS_IOPS:
                raise r.fail(f"{key}.{name}", f"expected normalized IOs per second, "
                             f"1..{MAX_QOS_IOPS}")
            values[name] = float(value)
        else:
            try:
                values[name] = float(parse_size(value))
            except ValueError as exc:
                raise r.fail(f"{key}.{name}", f"expected bytes per second: {exc}") from None
    burst = raw.get("burst", DEFAULT_BURST)
    if isinstance(burst, bool) or not isinstance(burst, (int, float)) \
            or not 0 <= burst <= MAX_QOS_BURST:
        raise r.fail(f"{key}.burst", f"expected seconds, 0..{MAX_QOS_BURST:g}")
    min_iops = None
    if minimum and "min_iops" in raw:
        value = raw["min_iops"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 < value <= MAX_QOS_IOPS:
            raise r.fail(f"{key}.min_iops", f"expected normalized IOs per second, "
                         f"1..{MAX_QOS_IOPS}")
        if "iops" in values and value > values["iops"]:
            raise r.fail(f"{key}.min_iops", f"more than {key}.iops")
        min_iops = float(value)
    return Limits(values.get("iops"), values.get("bps"), values.get("read_bps"),
                  values.get("write_bps"), float(burst), min_iops)
