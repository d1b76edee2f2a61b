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

from pytarget.backstore.rbd import remove_image

from ..caw_stress import run_stress
from ..ceph_cluster import CephCluster
from ..conftest import LiveTarget, gateway_targets, run
from .test_rbd_target import rbd_lun

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

SESSIONS = 8
LOOPS = 60


@pytest.fixture
def gateways(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[list[LiveTarget]]:
    image = f"caw-{uuid.uuid4().hex[:12]}"
    try:
        with gateway_targets(tmp_path, [rbd_lun(ceph_cluster, 0, image)]) as started:
            yield started
    finally:
        with contextlib.suppress(FileNotFoundError):  # never created: start failed
            run(remove_image(ceph_cluster.pool, image, **ceph_cluster.client))


def test_counter_is_exact_across_two_gateways(gateways: list[LiveTarget]) -> None:
    outcome = run_stress(gateways, sessions=SESSIONS, loops=LOOPS, caw_blocks=1)
    assert outcome.counter == outcome.expected == SESSIONS * LOOPS
    assert outcome.retries > 0  # the sessions did contend
    for target in gateways:
        log = target.log_text()
        assert "Traceback" not in log, log[-3000:]
