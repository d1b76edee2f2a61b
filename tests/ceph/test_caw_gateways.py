"""The COMPARE AND WRITE stress (tests/caw_stress.py) with its sessions spread over two gateway
processes (`pytarget serve --gateway gw1|gw2` from one configuration) serving one RBD LUN of the
throw-away cluster: eight counter sessions, four through each gateway, and two plain writers, one
through each. The counter must be exact and no block torn: librbd's compare-and-write is one OSD
operation, so it is atomic against the other gateway's writes, which no range lock of either
process sees (docs/ceph.md, *COMPARE AND WRITE*).

On RBD the compare range is one block (MAXIMUM COMPARE AND WRITE LENGTH 1 on 512-byte blocks),
so the writers rewrite the counter's neighbours in the same RADOS object rather than a block of
the compare range. Fewer loops than the file test: each gateway's write takes the image's
exclusive lock from the other, which costs milliseconds per command on the test cluster.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pytarget.backstore.rbd import remove_image

from ..caw_stress import run_stress
from ..ceph_cluster import CephCluster
from ..conftest import TARGET_IQN, LiveTarget, run, start_target
from .test_rbd_target import rbd_lun

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

SESSIONS = 8
LOOPS = 60


@pytest.fixture
def gateways(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[list[LiveTarget]]:
    image = f"caw-{uuid.uuid4().hex[:12]}"
    lun = rbd_lun(ceph_cluster, 0, image)
    config = tmp_path / "pytarget.yaml"
    config.write_text(yaml.safe_dump({
        "gateways": [{"name": "gw1", "portals": ["127.0.0.1:0"]},
                     {"name": "gw2", "portals": ["127.0.0.1:0"]}],
        "targets": [{"name": TARGET_IQN, "luns": [lun]}]}, sort_keys=False))
    started: list[LiveTarget] = []
    try:
        for name in ("gw1", "gw2"):
            started.append(start_target(config, "--gateway", name, log_name=f"{name}.log"))
        yield started
    finally:
        for target in started:
            target.stop()
        with contextlib.suppress(FileNotFoundError):  # never created: start failed
            run(remove_image(ceph_cluster.pool, image, conf=str(ceph_cluster.conf),
                             keyring=str(ceph_cluster.keyring), client_id=ceph_cluster.client_id))


def test_counter_is_exact_across_two_gateways(gateways: list[LiveTarget]) -> None:
    outcome = run_stress(gateways, sessions=SESSIONS, loops=LOOPS, caw_blocks=1)
    assert outcome.counter == outcome.expected == SESSIONS * LOOPS
    assert outcome.retries > 0  # the sessions did contend
    for target in gateways:
        log = target.log_text()
        assert "Traceback" not in log, log[-3000:]
