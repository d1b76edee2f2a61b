"""The throw-away cluster itself: it serves RBD, and stops exactly the daemons it started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ..ceph_cluster import CephCluster, ClusterError, running

pytestmark = pytest.mark.ceph


def test_session_cluster_serves_rbd(ceph_cluster: CephCluster) -> None:
    status = ceph_cluster.status()
    assert all(daemon["alive"] for daemon in status["daemons"].values())
    assert status["status"]["osdmap"]["num_up_osds"] == ceph_cluster.osds
    conf = ["-c", str(ceph_cluster.conf)]
    subprocess.run(["rbd", *conf, "create", "--size", "16M", "fixture-bench"], check=True,
                   timeout=60)
    try:
        subprocess.run(["rbd", *conf, "bench", "--io-type", "write", "--io-size", "64K",
                        "--io-total", "8M", "fixture-bench"], check=True, timeout=120,
                       capture_output=True)
    finally:
        subprocess.run(["rbd", *conf, "rm", "--no-progress", "fixture-bench"], check=True,
                       timeout=60)


def test_stop_ends_only_its_own_daemons(tmp_path: Path, ceph_cluster: CephCluster) -> None:
    others = set(ceph_cluster.pids())
    directory = tmp_path / "second"
    with pytest.raises(RuntimeError, match="inside"):
        with running(directory) as cluster:
            pids = cluster.pids()
            assert len(pids) == 2
            assert all(Path(f"/proc/{pid}").exists() for pid in pids)
            raise RuntimeError("a failing test inside the cluster's block")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}/cmdline") or \
            str(cluster.conf).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert not directory.exists()
    assert all(ceph_cluster._ours(pid) for pid in others)


def processes_naming(directory: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(directory).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_cluster_that_cannot_start_fails_and_leaves_nothing(
        tmp_path: Path, ceph_cluster: CephCluster) -> None:
    """An OSD block file too small for BlueStore: the monitor has started, the OSD's mkfs
    fails; the error names the failing step and the monitor is stopped."""
    directory = tmp_path / "broken"
    with pytest.raises(ClusterError, match="ceph-osd"):
        with running(directory, osd_block_size=1 << 20):
            pass
    assert not directory.exists()
    assert processes_naming(directory) == []
