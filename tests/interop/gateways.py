"""The RBD image the gateway parts of lane.py's shared boot serve (test_gateways_pr.py,
tests/ceph/test_gateways_failover_guest.py); their two gateway processes are
tests/conftest.py's `gateway_targets`, their keys to the cluster `CephCluster.client`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

from pytarget.backstore.rbd import remove_image

from ..ceph_cluster import CephCluster
from ..conftest import run


@contextmanager
def rbd_image(cluster: CephCluster, image: str, owner_record: bool = False) -> Iterator[str]:
    """The image `image` of the cluster's pool, removed at the end when it was ever created;
    with `owner_record`, its ownership record (cluster/ownership.py) too."""
    try:
        yield image
    finally:
        with contextlib.suppress(FileNotFoundError):
            run(remove_image(cluster.pool, image, **cluster.client))
        if owner_record:
            cluster.remove_object(f"pytarget.owner.{image}")
