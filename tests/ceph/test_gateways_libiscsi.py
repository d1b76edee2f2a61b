"""libiscsi's persistent reservation, RESERVE(6) and MultipathIO suites with their two URLs on
two gateway processes (`pytarget serve --gateway gw1|gw2` from one configuration) that serve
one file LUN and keep its reservations in one RADOS object of the throw-away cluster: what one
gateway does the other must enforce."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import yaml

from pytarget.cluster.rados import remove_state

from ..ceph_cluster import CephCluster
from ..conftest import INITIATOR1, INITIATOR2, TARGET_IQN, LiveTarget, run, start_target
from ..libiscsi import ISCSI_TEST_CU, assert_clean, run_suite

pytestmark = [
    pytest.mark.ceph,
    pytest.mark.libiscsi,
    pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed"),
]

SUITES = [
    "PrinReadKeys", "PrinServiceactionRange", "PrinReportCapabilities", "ProutRegister",
    "ProutReserve", "ProutClear", "ProutPreempt", "Reserve6", "MultipathIO",
]


@pytest.fixture(scope="module")
def gateways(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[LiveTarget, LiveTarget]]:
    shared = tmp_path_factory.mktemp("gateways")
    name = f"pytarget.test.{uuid.uuid4().hex[:12]}"
    reservations = {"store": "rados", "pool": ceph_cluster.pool, "object": name,
                    "conf": str(ceph_cluster.conf), "keyring": str(ceph_cluster.keyring),
                    "client_id": ceph_cluster.client_id}
    lun = {"id": 0, "path": str(shared / "lun0.img"), "size": "64MiB",
           "reservations": reservations}
    # One configuration, two gateways: each process is its own target port group with its own
    # relative target port (docs/guides/scale-out.md), so their I_T nexuses differ.
    config = shared / "pytarget.yaml"
    config.write_text(yaml.safe_dump({
        "gateways": [{"name": "gw1", "portals": ["127.0.0.1:0"]},
                     {"name": "gw2", "portals": ["127.0.0.1:0"]}],
        "targets": [{"name": TARGET_IQN, "luns": [lun]}]}, sort_keys=False))
    started: list[LiveTarget] = []
    try:
        for gateway in ("gw1", "gw2"):
            started.append(start_target(config, "--gateway", gateway,
                                        log_name=f"{gateway}.log"))
        yield started[0], started[1]
    finally:
        for target in started:
            target.stop()
        run(remove_state(ceph_cluster.pool, name, conf=str(ceph_cluster.conf),
                         keyring=str(ceph_cluster.keyring), client_id=ceph_cluster.client_id))


@pytest.mark.parametrize("suite", SUITES)
def test_pr_suite_across_gateways(gateways: tuple[LiveTarget, LiveTarget], suite: str) -> None:
    gw1, gw2 = gateways
    assert_clean(run_suite(suite, gw1.url(0), INITIATOR1, INITIATOR2, urls=[gw2.url(0)]))
