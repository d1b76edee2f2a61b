"""Two `pytarget serve --gateway` processes of one configuration, and the RBD image they
serve, for the gateway parts of lane.py's shared boot (test_gateways_multipath.py,
test_gateways_pr.py, tests/ceph/test_gateways_failover_guest.py) and for
tests/ceph/test_gateway_failover.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from pytarget.backstore.rbd import remove_image

from ..ceph_cluster import CephCluster
from ..conftest import TARGET_IQN, LiveTarget, run, start_target

GATEWAYS = [{"name": "gw1", "portals": ["127.0.0.1:0"]},
            {"name": "gw2", "portals": ["127.0.0.1:0"]}]


@contextmanager
def gateway_pair(directory: Path, luns: list[dict[str, Any]], **extra: Any
                 ) -> Iterator[list[LiveTarget]]:
    """gw1 and gw2 of one target (TARGET_IQN) with `luns`, from directory/pytarget.yaml (with
    `extra` top-level keys); every process in the list, also one a test appends, is stopped at
    the end."""
    config = directory / "pytarget.yaml"
    config.write_text(yaml.safe_dump({"gateways": GATEWAYS, **extra,
                                      "targets": [{"name": TARGET_IQN, "luns": luns}]},
                                     sort_keys=False))
    started: list[LiveTarget] = []
    try:
        for name in ("gw1", "gw2"):
            started.append(start_target(config, "--gateway", name, log_name=f"{name}.log"))
        yield started
    finally:
        for target in started:
            target.stop()


def rbd_client(cluster: CephCluster) -> dict[str, str]:
    """The keys a LUN (or its reservation store) needs to reach the cluster."""
    return {"conf": str(cluster.conf), "keyring": str(cluster.keyring),
            "client_id": cluster.client_id}


@contextmanager
def rbd_image(cluster: CephCluster, image: str, owner_record: bool = False) -> Iterator[str]:
    """The image `image` of the cluster's pool, removed at the end when it was ever created;
    with `owner_record`, its ownership record (cluster/ownership.py) too."""
    try:
        yield image
    finally:
        with contextlib.suppress(FileNotFoundError):
            run(remove_image(cluster.pool, image, conf=str(cluster.conf),
                             keyring=str(cluster.keyring)))
        if owner_record:
            handle = cluster.connect()
            try:
                with handle.open_ioctx(cluster.pool) as ioctx:
                    ioctx.remove_object(f"pytarget.owner.{image}")
            finally:
                handle.shutdown()
