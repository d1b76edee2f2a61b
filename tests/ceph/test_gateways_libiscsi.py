"""libiscsi's persistent reservation, RESERVE(6) and MultipathIO suites with their two URLs on
two gateway processes (`pytarget serve --gateway gw1|gw2` from one configuration) that serve
one file LUN and keep its reservations in one RADOS object of the throw-away cluster: what one
gateway does the other must enforce."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from pytarget.cluster.rados import remove_state

from ..ceph_cluster import CephCluster
from ..conftest import INITIATOR1, INITIATOR2, LiveTarget, gateway_targets, run
from ..libiscsi import ISCSI_TEST_CU, SUITES_PR, assert_clean, run_suite

pytestmark = [
    pytest.mark.ceph,
    pytest.mark.libiscsi,
    pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed"),
]

SUITES = [*SUITES_PR, "MultipathIO"]


@pytest.fixture(scope="module")
def gateways(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[list[LiveTarget]]:
    shared = tmp_path_factory.mktemp("gateways")
    name = f"pytarget.test.{uuid.uuid4().hex[:12]}"
    reservations = {"store": "rados", "pool": ceph_cluster.pool, "object": name,
                    **ceph_cluster.client}
    lun = {"id": 0, "path": str(shared / "lun0.img"), "size": "64MiB",
           "reservations": reservations}
    # One configuration, two gateways: each process is its own target port group with its own
    # relative target port (docs/guides/scale-out.md), so their I_T nexuses differ.
    try:
        with gateway_targets(shared, [lun]) as started:
            yield started
    finally:
        run(remove_state(ceph_cluster.pool, name, **ceph_cluster.client))


@pytest.mark.parametrize("suite", SUITES)
def test_pr_suite_across_gateways(gateways: list[LiveTarget], suite: str) -> None:
    gw1, gw2 = gateways
    assert_clean(run_suite(suite, gw1.url(0), INITIATOR1, INITIATOR2, urls=[gw2.url(0)]))
