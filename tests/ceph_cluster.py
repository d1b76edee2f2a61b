"""A throw-away single-node Ceph cluster for tests and tools: one monitor and N BlueStore OSDs.

Everything lives under one directory (configuration, keys, monitor store, OSD block files,
logs, admin sockets) and listens on 127.0.0.1 only: the monitor on a free port picked at
start, the OSDs on ports they pick themselves. Daemons run in the foreground of processes
started here (no systemd, cephadm or containers), their PIDs recorded in `<dir>/pids`; `stop`
ends only those PIDs, and only while their command line still names this cluster's
configuration file. No manager daemon: RBD does not need one. Pools have one replica
(`osd pool default size = 1`, `osd crush chooseleaf type = 0`).

Needs the `ceph-mon`, `ceph-osd` and `ceph-common` packages and, for the commands sent to the
monitor, the `rados` and `rbd` Python modules (tools/install-ceph installs all of them).
Independent of pytarget.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BINARIES = ("ceph-authtool", "monmaptool", "ceph-mon", "ceph-osd")
CONF = "ceph.conf"
ADMIN_KEYRING = "keyring"
PIDS = "pids"
DEFAULT_POOL = "rbd"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


def missing() -> str | None:
    """Why a cluster cannot be started here (missing binaries or modules), or None."""
    absent = [name for name in BINARIES if shutil.which(name) is None]
    if absent:
        return f"Ceph is not installed ({', '.join(absent)} missing; run tools/install-ceph)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as exc:
        return f"the rados/rbd Python modules are not importable ({exc}; run tools/install-ceph)"
    return None


class ClusterError(RuntimeError):
    """The cluster could not be created, started or reached."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(directory: Path, fsid: str, mon_port: int, osd_block_size: int,
            osd_memory_target: int) -> str:
    d = str(directory)
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.1/32
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {d}/{ADMIN_KEYRING}
run dir = {d}/run
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
ms async op threads = 1

[client]
log to file = false

[mon]
mon data = {d}/$name
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
mon cluster log file = {d}/log/cluster.log
keyring = {d}/$name/keyring

[osd]
osd data = {d}/$name
keyring = {d}/$name/keyring
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {osd_block_size}
bluestore fsck on mkfs = false
osd memory target = {osd_memory_target}
osd op num shards = 2
osd op num threads per shard = 1
osd crush update on start = true
"""


@dataclass
class Daemon:
    name: str
    pid: int
    process: subprocess.Popen[bytes] | None = None


@dataclass
class CephCluster:
    """One cluster under `directory`; `start` creates it if it does not exist yet."""

    directory: Path
    osds: int = 1
    pool: str = DEFAULT_POOL
    osd_block_size: int = 2 << 30
    osd_memory_target: int = 1 << 30
    daemons: list[Daemon] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()

    @property
    def conf(self) -> Path:
        return self.directory / CONF

    @property
    def keyring(self) -> Path:
        return self.directory / ADMIN_KEYRING

    client_id = "admin"

    @property
    def client(self) -> dict[str, str]:
        """How pytarget reaches this cluster: the `conf`, `keyring` and `client_id` of an RBD
        LUN or a `reservations:` store, and the same keywords of `remove_image` and
        `remove_state`."""
        return {"conf": str(self.conf), "keyring": str(self.keyring),
                "client_id": self.client_id}

    def _run(self, *argv: str, input: bytes | None = None) -> str:
        result = subprocess.run(argv, input=input, capture_output=True, timeout=START_TIMEOUT)
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                               f"{stderr[-2000:]}")
        return result.stdout.decode()

    def _spawn(self, name: str, *argv: str) -> Daemon:
        out = open(self.directory / "log" / f"{name}.out", "ab")
        with out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       start_new_session=True)
        daemon = Daemon(name, process.pid, process)
        self.daemons.append(daemon)
        self._save_pids()
        return daemon

    def _save_pids(self) -> None:
        lines = "".join(f"{daemon.name} {daemon.pid}\n" for daemon in self.daemons)
        (self.directory / PIDS).write_text(lines)

    def _load_pids(self) -> None:
        path = self.directory / PIDS
        if self.daemons or not path.exists():
            return
        for line in path.read_text().splitlines():
            name, pid = line.split()
            self.daemons.append(Daemon(name, int(pid)))

    def _ours(self, pid: int) -> bool:
        """Whether `pid` is still a daemon of this cluster (not a reused PID)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return False
        return str(self.conf).encode() in argv

    def _alive(self, daemon: Daemon) -> bool:
        if daemon.process is not None:
            return daemon.process.poll() is None
        return self._ours(daemon.pid)

    def _check_alive(self) -> None:
        for daemon in self.daemons:
            if not self._alive(daemon):
                log = self.directory / "log" / f"{daemon.name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise ClusterError(f"{daemon.name} (pid {daemon.pid}) exited\n{tail}")

    def _mon_command(self, cluster: Any, command: dict[str, Any], inbuf: bytes = b"") -> str:
        ret, out, err = cluster.mon_command(json.dumps(command), inbuf, timeout=30)
        if ret != 0:
            raise ClusterError(f"mon command {command['prefix']} failed ({ret}): {err}")
        return out.decode()

    def connect(self) -> Any:
        """A connected `rados.Rados` handle as client.admin; the caller shuts it down."""
        import rados
        cluster = rados.Rados(conffile=str(self.conf), rados_id=self.client_id)
        cluster.conf_set("client_mount_timeout", "30")
        cluster.conf_set("rados_mon_op_timeout", "30")
        cluster.conf_set("rados_osd_op_timeout", "60")
        cluster.connect(timeout=30)
        return cluster

    def remove_object(self, name: str) -> None:
        """Delete object `name` of the pool (an ownership record a test leaves behind)."""
        cluster = self.connect()
        try:
            with cluster.open_ioctx(self.pool) as ioctx:
                ioctx.remove_object(name)
        finally:
            cluster.shutdown()

    def start(self) -> None:
        """Create the cluster if `directory` holds none, start its daemons and wait until the
        pool serves I/O. On failure, stops whatever it started and raises ClusterError."""
        began = time.monotonic()
        try:
            if self.conf.exists():
                self._load_pids()
                if any(self._alive(daemon) for daemon in self.daemons):
                    raise ClusterError(f"a cluster is already running in {self.directory}")
                self.daemons.clear()
                self._restart()
            else:
                self._create()
            self.timings["start"] = time.monotonic() - began
        except BaseException:
            self.stop(remove=False)
            raise

    def _create(self) -> None:
        began = time.monotonic()
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        for sub in ("log", "run", "mon.a"):
            (directory / sub).mkdir(exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_port = free_port()
        self.conf.write_text(_config(directory, fsid, mon_port, self.osd_block_size,
                                     self.osd_memory_target))
        mon_keyring = directory / "mon.keyring"
        self._run("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key",
                  "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-authtool", "--create-keyring", str(self.keyring), "--gen-key",
                  "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                  "--cap", "mgr", "allow *")
        self._run("ceph-authtool", str(mon_keyring), "--import-keyring", str(self.keyring))
        monmap = directory / "monmap"
        self._run("monmaptool", "--create", "--fsid", fsid,
                  "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", str(monmap))
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a",
                  "--monmap", str(monmap), "--keyring", str(mon_keyring))
        self._spawn("mon.a", "ceph-mon", "-c", str(self.conf), "-f", "-i", "a")
        self.timings["mon"] = time.monotonic() - began
        cluster = self.connect()
        try:
            self.timings["mon-reachable"] = time.monotonic() - began
            for osd in range(self.osds):
                self._create_osd(cluster, osd)
            self.timings["osds-created"] = time.monotonic() - began
            self._create_pool(cluster)
        finally:
            cluster.shutdown()
        self.timings["pool-ready"] = time.monotonic() - began

    def _create_osd(self, cluster: Any, expected_id: int) -> None:
        osd_uuid = str(uuid.uuid4())
        secret = self._run("ceph-authtool", "--gen-print-key").strip()
        out = self._mon_command(cluster, {"prefix": "osd new", "uuid": osd_uuid,
                                          "format": "json"},
                                json.dumps({"cephx_secret": secret}).encode())
        osd_id = int(json.loads(out)["osdid"]) if out.strip().startswith("{") else int(out)
        if osd_id != expected_id:
            raise ClusterError(f"osd new gave id {osd_id}, expected {expected_id}")
        name = f"osd.{osd_id}"
        (self.directory / name).mkdir(exist_ok=True)
        self._run("ceph-osd", "-c", str(self.conf), "-i", str(osd_id), "--mkfs",
                  "--osd-uuid", osd_uuid, "--key", secret)
        self._run("ceph-authtool", "--create-keyring", str(self.directory / name / "keyring"),
                  "--name", name, "--add-key", secret)
        self._spawn(name, "ceph-osd", "-c", str(self.conf), "-f", "-i", str(osd_id))

    def _create_pool(self, cluster: Any) -> None:
        import rbd
        self._mon_command(cluster, {"prefix": "osd pool create", "pool": self.pool,
                                    "pg_num": 8, "pgp_num": 8})
        self._wait_osds_up(cluster)
        with cluster.open_ioctx(self.pool) as ioctx:
            rbd.RBD().pool_init(ioctx, True)

    def _wait_osds_up(self, cluster: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_alive()
            status = json.loads(self._mon_command(cluster, {"prefix": "osd stat",
                                                            "format": "json"}))
            status = status.get("osdmap", status)
            if status["num_up_osds"] == self.osds and status["num_in_osds"] == self.osds:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"OSDs not up after {START_TIMEOUT:.0f} s: {status}")
            time.sleep(0.1)

    def _restart(self) -> None:
        self._spawn("mon.a", "ceph-mon", "-c", str(self.conf), "-f", "-i", "a")
        osd_dirs = sorted(p.name for p in self.directory.glob("osd.*") if p.is_dir())
        for name in osd_dirs:
            self._spawn(name, "ceph-osd", "-c", str(self.conf), "-f", "-i", name.split(".")[1])
        cluster = self.connect()
        try:
            self._wait_osds_up(cluster)
        finally:
            cluster.shutdown()

    def stop(self, remove: bool = True) -> None:
        """Stop the daemons this cluster started (SIGTERM, then SIGKILL after STOP_TIMEOUT),
        OSDs before the monitor; then delete the directory if `remove`."""
        self._load_pids()
        for daemon in sorted(self.daemons, key=lambda d: d.name.startswith("mon")):
            self._terminate(daemon)
        self.daemons.clear()
        if self.conf.exists() and (self.directory / PIDS).exists():
            (self.directory / PIDS).unlink()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _terminate(self, daemon: Daemon) -> None:
        if not self._alive(daemon):
            if daemon.process is not None:
                daemon.process.wait()
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon.pid, sig)
            if daemon.process is not None:
                try:
                    daemon.process.wait(STOP_TIMEOUT)
                    return
                except subprocess.TimeoutExpired:
                    continue
            deadline = time.monotonic() + STOP_TIMEOUT
            while self._ours(daemon.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self._ours(daemon.pid):
                return

    def status(self) -> dict[str, Any]:
        """Daemons with their PIDs and liveness, and the monitor's `status` when reachable."""
        self._load_pids()
        report: dict[str, Any] = {
            "directory": str(self.directory),
            "conf": str(self.conf),
            "keyring": str(self.keyring),
            "daemons": {d.name: {"pid": d.pid, "alive": self._alive(d)} for d in self.daemons},
        }
        if self.daemons and all(self._alive(d) for d in self.daemons):
            cluster = self.connect()
            try:
                report["status"] = json.loads(self._mon_command(
                    cluster, {"prefix": "status", "format": "json"}))
            finally:
                cluster.shutdown()
        return report

    def pids(self) -> list[int]:
        return [daemon.pid for daemon in self.daemons]


@contextlib.contextmanager
def running(directory: Path, **options: Any) -> Iterator[CephCluster]:
    """A started cluster, stopped and deleted when the block ends, also on an exception."""
    cluster = CephCluster(Path(directory), **options)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
