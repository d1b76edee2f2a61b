"""The throw-away Ceph cluster (tests/ceph_cluster.py) as a session fixture for `ceph` tests.

The tests are skipped only when Ceph is not installed here; once it is, a cluster that fails
to start is an error of every test that needs it, not a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ..ceph_cluster import CephCluster, missing, running


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    with running(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


@pytest.fixture
def image_name() -> str:
    """A fresh image name: tests share the session's cluster and pool."""
    return f"img-{uuid.uuid4().hex[:12]}"
