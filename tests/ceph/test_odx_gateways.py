"""ODX across two gateway processes (`pytarget serve --gateway gw1|gw2` from one configuration)
serving two RBD LUNs of the throw-away cluster whose reservations, and so whose ROD tokens, live
in RADOS (docs/scale-out-consistency.md, *ROD tokens*): POPULATE TOKEN and RECEIVE ROD TOKEN
INFORMATION through gateway 1, WRITE USING TOKEN through gateway 2, the bytes checked through
both; then a write through gateway 2 to the token's source cancels it for gateway 1 too, and
DEL_TKN through one gateway deletes it for the other. Pytarget's own initiator."""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytarget.backstore.rbd import remove_image
from pytarget.cluster.rados import remove_state
from pytarget.initiator.client import Initiator

from ..ceph_cluster import CephCluster
from ..conftest import INITIATOR1, INITIATOR2, TARGET_IQN, LiveTarget, gateway_targets, run
from ..e2e.test_odx import cdb, populate, rrti, write_using_token, wut_params
from .test_rbd_target import rbd_lun

pytestmark = pytest.mark.ceph

BS = 512
SOURCE, DESTINATION = 0, 1


@pytest.fixture
def gateways(ceph_cluster: CephCluster, tmp_path: Path) -> Iterator[list[LiveTarget]]:
    prefix = f"odx-{uuid.uuid4().hex[:12]}"
    client = ceph_cluster.client
    luns = [rbd_lun(ceph_cluster, n, f"{prefix}-{n}",
                    reservations={"store": "rados", "pool": ceph_cluster.pool,
                                  "object": f"{prefix}-{n}.reservations", **client})
            for n in (SOURCE, DESTINATION)]
    try:
        with gateway_targets(tmp_path, luns) as started:
            yield started
    finally:
        for n in (SOURCE, DESTINATION):
            for suffix in (".reservations", ".reservations.tokens"):
                run(remove_state(ceph_cluster.pool, f"{prefix}-{n}{suffix}", **client))
            with contextlib.suppress(FileNotFoundError):  # never created: start failed
                run(remove_image(ceph_cluster.pool, f"{prefix}-{n}", **client))


async def session(target: LiveTarget, initiator: str) -> Initiator:
    ini = await Initiator.connect(target.host, target.port)
    await ini.login(TARGET_IQN, initiator_name=initiator)
    for lun in (SOURCE, DESTINATION):
        await ini.clear_unit_attentions(lun)
    return ini


def test_token_made_through_one_gateway_is_used_through_the_other(
        gateways: list[LiveTarget]) -> None:
    async def go() -> None:
        one = await session(gateways[0], INITIATOR1)
        two = await session(gateways[1], INITIATOR2)
        try:
            # 1 MiB across the first 4 MiB object boundary (LBA 8192)
            data = os.urandom(2048 * BS)
            (await one.write(SOURCE, 7000, data)).check()
            token = await populate(one, SOURCE, 1, (7000, 2048))
            assert len(token) == 512
            (await write_using_token(two, DESTINATION, 2, token, (30000, 2048))).check()
            info = (await two.command(DESTINATION, rrti(2), read_length=4096)).check().data
            assert info[4:6] == bytes((0x11, 0x01))  # WRITE USING TOKEN, completed
            assert struct.unpack_from(">Q", info, 16)[0] == 2048  # TRANSFER COUNT, blocks
            for ini in (one, two):
                assert (await ini.read(DESTINATION, 30000, 2048)).check().data == data
            # through gateway 1 too, with an offset into the ROD
            (await write_using_token(one, DESTINATION, 3, token, (40000, 8), offset=100)
             ).check()
            assert (await two.read(DESTINATION, 40000, 8)).check().data \
                == data[100 * BS:108 * BS]

            # a write through gateway 2 to the source cancels the token on both gateways
            (await two.write(SOURCE, 8100, os.urandom(BS))).check()
            for n, ini in enumerate((one, two)):
                r = await write_using_token(ini, DESTINATION, 4 + n, token, (50000, 8))
                assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x23, 0x08), r  # TOKEN CANCELLED
            assert (await one.read(DESTINATION, 50000, 8)).check().data == bytes(8 * BS)

            # DEL_TKN through gateway 1 deletes a token for gateway 2
            token = await populate(two, SOURCE, 6, (0, 64))
            params = bytearray(wut_params(token, (60000, 64)))
            params[2] |= 0x02  # DEL_TKN
            (await one.command(DESTINATION, cdb(0x11, 7, len(params)), bytes(params))).check()
            r = await write_using_token(two, DESTINATION, 8, token, (61000, 64))
            assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x23, 0x09), r  # TOKEN DELETED
        finally:
            await one.close()
            await two.close()

    run(go(), timeout=120)
    for target in gateways:
        log = target.log_text()
        assert "Traceback" not in log, log[-3000:]

