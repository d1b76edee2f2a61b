"""A live pytarget serving `backstore: rbd` LUNs from the throw-away cluster: libiscsi's
iscsi-test-cu families one at a time (as tests/e2e runs them against file LUNs), and, through
pytarget's own initiator, READ/WRITE, UNMAP, WRITE SAME, COMPARE AND WRITE, GET LBA STATUS, the
VPD pages' claims, and copies (ODX through the generic engine) between file and RBD LUNs."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytarget import assembly
from pytarget.backstore import provision_backstore
from pytarget.config import ConfigError, load
from pytarget.initiator.client import Initiator

from ..ceph_cluster import CephCluster
from ..conftest import INITIATOR1, INITIATOR2, TARGET_IQN, LiveTarget, run, start_target
from ..conftest import write_config as write_target_config
from ..e2e.test_odx import populate, write_using_token
from ..e2e.test_reload import pytarget
from ..libiscsi import (
    ISCSI_TEST_CU,
    SUITES_COPY,
    SUITES_PR,
    SUITES_REMOVABLE,
    SUITES_SBC,
    assert_clean,
    run_suite,
)

pytestmark = pytest.mark.ceph

MiB = 1 << 20
BS = 512
OBJECT_BLOCKS = 4 * MiB // BS  # librbd's default object, in blocks

# The LUNs: every libiscsi family gets a LUN of its own, as the file tests give it a target.
SBC, READONLY, REMOVABLE, MULTIPATH, PR, COPY, FILE, OWN, BIG_BLOCKS = range(9)

needs_libiscsi = pytest.mark.skipif(ISCSI_TEST_CU is None,
                                    reason="iscsi-test-cu (libiscsi-bin) not installed")


def rbd_lun(cluster: CephCluster, lun: int, image: str, **extra: Any) -> dict[str, Any]:
    return {"id": lun, "backstore": "rbd", "pool": cluster.pool, "image": image,
            **cluster.client, "size": "64MiB", **extra}


@pytest.fixture(scope="module")
def rbd_target(ceph_cluster: CephCluster, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("rbd-target")
    prefix = f"t{os.getpid()}"
    luns = [rbd_lun(ceph_cluster, n, f"{prefix}-lun{n}") for n in range(FILE)]
    luns[READONLY] = {**luns[READONLY], "readonly": True}
    luns[REMOVABLE] = {**luns[REMOVABLE], "removable": True}
    luns.append({"id": FILE, "path": "file.img", "size": "64MiB"})
    luns.append(rbd_lun(ceph_cluster, OWN, f"{prefix}-lun{OWN}"))
    luns.append(rbd_lun(ceph_cluster, BIG_BLOCKS, f"{prefix}-lun{BIG_BLOCKS}",
                        block_size=4096))
    # read-only LUNs are never created: the image exists before the target starts
    readonly = {k: v for k, v in luns[READONLY].items()
                if k in ("pool", "image", "conf", "keyring", "client_id")}
    provision_backstore("rbd", readonly, 64 * MiB)
    target = start_target(write_target_config(directory, luns=luns))
    yield target
    target.stop()


@needs_libiscsi
@pytest.mark.libiscsi
@pytest.mark.parametrize("suite", SUITES_SBC)
def test_sbc_suite(rbd_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, rbd_target.url(SBC), INITIATOR1, INITIATOR2))


@needs_libiscsi
@pytest.mark.libiscsi
@pytest.mark.parametrize("suite", SUITES_REMOVABLE)
def test_removable_suite(rbd_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, rbd_target.url(REMOVABLE), INITIATOR1, INITIATOR2))


@needs_libiscsi
@pytest.mark.libiscsi
def test_readonly_suite(rbd_target: LiveTarget) -> None:
    assert_clean(run_suite("ReadOnly", rbd_target.url(READONLY), INITIATOR1, INITIATOR2))


@needs_libiscsi
@pytest.mark.libiscsi
def test_multipath_io(rbd_target: LiveTarget) -> None:
    url = rbd_target.url(MULTIPATH)
    assert_clean(run_suite("MultipathIO", url, INITIATOR1, INITIATOR2, urls=[url]))


@needs_libiscsi
@pytest.mark.libiscsi
@pytest.mark.parametrize("suite", SUITES_PR)
def test_pr_suite(rbd_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, rbd_target.url(PR), INITIATOR1, INITIATOR2))


@needs_libiscsi
@pytest.mark.libiscsi
@pytest.mark.parametrize("suite", SUITES_COPY)
def test_copy_suite(rbd_target: LiveTarget, suite: str) -> None:
    assert_clean(run_suite(suite, rbd_target.url(COPY), INITIATOR1, INITIATOR2))


# -- through pytarget's own initiator

async def session(target: LiveTarget) -> Initiator:
    ini = await Initiator.connect(target.host, target.port)
    await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
    for lun in (FILE, OWN, BIG_BLOCKS):
        await ini.clear_unit_attentions(lun)
    return ini


def vpd_cdb(page: int) -> bytes:
    return bytes((0x12, 0x01, page, 0x01, 0x00, 0x00))


def caw_cdb(lba: int, blocks: int) -> bytes:
    return bytes((0x89, 0)) + lba.to_bytes(8, "big") + bytes(3) + bytes((blocks, 0, 0))


def unmap_params(*pairs: tuple[int, int]) -> bytes:
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in pairs)
    return struct.pack(">HH4x", 6 + len(desc), len(desc)) + desc


def unmap_cdb(length: int) -> bytes:
    return bytes((0x42, 0)) + bytes(5) + length.to_bytes(2, "big") + bytes(1)


def write_same16(lba: int, blocks: int, unmap: bool = False) -> bytes:
    return bytes((0x93, 0x08 if unmap else 0)) + lba.to_bytes(8, "big") \
        + blocks.to_bytes(4, "big") + bytes(2)


def get_lba_status(lba: int) -> bytes:
    return bytes((0x9E, 0x12)) + lba.to_bytes(8, "big") + (4096).to_bytes(4, "big") + bytes(2)


def lba_status(data: bytes) -> list[tuple[int, int, int]]:
    length = struct.unpack_from(">I", data)[0]
    return [struct.unpack_from(">QIB", data, at) for at in range(8, 4 + length, 16)]


def test_vpd_tells_what_librbd_does(rbd_target: LiveTarget) -> None:
    """Block Limits: one block of atomic COMPARE AND WRITE, 64 KiB unmap granularity; LBPRZ;
    a 4096-byte-block RBD LUN offers no COMPARE AND WRITE at all."""
    async def go() -> None:
        ini = await session(rbd_target)
        limits = (await ini.command(OWN, vpd_cdb(0xB0), read_length=64)).check().data
        assert limits[5] == 1  # MAXIMUM COMPARE AND WRITE LENGTH
        assert struct.unpack_from(">I", limits, 28)[0] == 64 * 1024 // BS
        assert struct.unpack_from(">I", limits, 32)[0] == 0x80000000  # UGAVALID, alignment 0
        provisioning = (await ini.command(OWN, vpd_cdb(0xB2), read_length=8)).check().data
        assert provisioning[5] & 0x04  # LBPRZ
        big = (await ini.command(BIG_BLOCKS, vpd_cdb(0xB0), read_length=64)).check().data
        assert big[5] == 0
        r = await ini.command(BIG_BLOCKS, caw_cdb(0, 1), bytes(8192))
        assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x20, 0x00)  # INVALID COMMAND OP CODE
        await ini.logout()
    run(go())


def test_read_write_compare_and_write(rbd_target: LiveTarget) -> None:
    async def go() -> None:
        ini = await session(rbd_target)
        data = os.urandom(300 * BS)
        (await ini.write(OWN, OBJECT_BLOCKS - 100, data)).check()  # across an object boundary
        assert (await ini.read(OWN, OBJECT_BLOCKS - 100, 300)).check().data == data
        old, new = data[:BS], os.urandom(BS)
        stale = bytearray(old)
        stale[77] ^= 0xFF
        r = await ini.command(OWN, caw_cdb(OBJECT_BLOCKS - 100, 1), bytes(stale) + new)
        assert (r.sense_key, r.asc) == (0x0E, 0x1D)  # MISCOMPARE
        assert r.sense is not None and struct.unpack_from(">I", r.sense, 3)[0] == 77
        assert (await ini.read(OWN, OBJECT_BLOCKS - 100, 1)).check().data == old
        (await ini.command(OWN, caw_cdb(OBJECT_BLOCKS - 100, 1), old + new)).check()
        assert (await ini.read(OWN, OBJECT_BLOCKS - 100, 1)).check().data == new
        r = await ini.command(OWN, caw_cdb(0, 2), bytes(4 * BS))
        assert (r.sense_key, r.asc) == (0x05, 0x24)  # more than the advertised one block
        await ini.logout()
    run(go())


def test_unmap_write_same_and_lba_status(rbd_target: LiveTarget) -> None:
    async def go() -> None:
        ini = await session(rbd_target)
        base = 2 * OBJECT_BLOCKS
        data = os.urandom(2 * OBJECT_BLOCKS * BS)
        (await ini.write(OWN, base, data[:OBJECT_BLOCKS * BS])).check()
        (await ini.write(OWN, base + OBJECT_BLOCKS, data[OBJECT_BLOCKS * BS:])).check()
        # UNMAP a range that starts and ends inside 64 KiB granules: all of it reads zeros
        params = unmap_params((base + 7, 1000))
        (await ini.command(OWN, unmap_cdb(len(params)), params)).check()
        got = (await ini.read(OWN, base, 2000)).check().data
        assert got[7 * BS:1007 * BS] == bytes(1000 * BS)
        assert got[:7 * BS] == data[:7 * BS] and got[1007 * BS:] == data[1007 * BS:2000 * BS]
        # WRITE SAME with UNMAP of the whole second object: deallocated, reads zeros
        (await ini.command(OWN, write_same16(base + OBJECT_BLOCKS, OBJECT_BLOCKS, unmap=True),
                           bytes(BS))).check()
        assert (await ini.read(OWN, base + OBJECT_BLOCKS, 8)).check().data == bytes(8 * BS)
        status = lba_status((await ini.command(OWN, get_lba_status(base),
                                               read_length=4096)).check().data)
        assert status[0] == (base, OBJECT_BLOCKS, 0)  # the first object holds data: mapped
        assert status[1][0] == base + OBJECT_BLOCKS and status[1][2] == 1  # deallocated
        # WRITE SAME of a pattern
        pattern = os.urandom(BS)
        (await ini.command(OWN, write_same16(base + 5000, 64), pattern)).check()
        assert (await ini.read(OWN, base + 5000, 64)).check().data == pattern * 64
        await ini.logout()
    run(go())


def test_copies_between_file_and_rbd(rbd_target: LiveTarget) -> None:
    """ODX between a file LUN and RBD LUNs runs the generic engine (the device server's
    internal READ/WRITE) in both directions and from RBD to RBD."""
    async def go() -> None:
        ini = await session(rbd_target)
        data = os.urandom(4096 * BS)
        (await ini.write(FILE, 10000, data)).check()
        token = await populate(ini, FILE, 41, (10000, 4096))
        (await write_using_token(ini, OWN, 42, token, (20000, 4096))).check()
        assert (await ini.read(OWN, 20000, 4096)).check().data == data
        token = await populate(ini, OWN, 43, (20000, 4096))
        (await write_using_token(ini, FILE, 44, token, (30000, 4096))).check()
        assert (await ini.read(FILE, 30000, 4096)).check().data == data
        (await write_using_token(ini, OWN, 45, token, (90000, 4096))).check()
        assert (await ini.read(OWN, 90000, 4096)).check().data == data
        await ini.logout()
    run(go())


def test_status_and_reload_grow(rbd_target: LiveTarget) -> None:
    """`pytarget status` shows an RBD LUN as pool/image with its allocated bytes; a reload with
    a larger size grows the image and READ CAPACITY follows. Runs last: it resizes LUN OWN."""
    async def go() -> None:
        ini = await session(rbd_target)
        (await ini.write(OWN, 0, os.urandom(128 * BS))).check()
        await ini.logout()
        config = rbd_target.config
        own: dict[str, Any] = {}
        for _ in range(50):  # the figure is refreshed off the loop when a status finds it old
            status, out = await pytarget("status", "--json", "--config", str(config))
            assert status == 0, out
            [target] = json.loads(out)["targets"]
            [own] = [lun for lun in target["luns"] if lun["lun"] == OWN]
            if own["allocated_bytes"]:
                break
        image = next(lc["image"] for lc in yaml.safe_load(config.read_text())["targets"][0]
                     ["luns"] if lc["id"] == OWN)
        assert own["path"] == f"{rbd_target_pool(config)}/{image}"
        assert own["size_bytes"] == 64 * MiB and own["allocated_bytes"] > 0
        doc = yaml.safe_load(config.read_text())
        for lc in doc["targets"][0]["luns"]:
            if lc["id"] == OWN:
                lc["size"] = "96MiB"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        status, out = await pytarget("reload", "--config", str(config))
        assert status == 0, out
        ini = await session(rbd_target)
        capacity = (await ini.command(OWN, bytes((0x25,)) + bytes(9), read_length=8)).data
        assert struct.unpack(">II", capacity) == (96 * MiB // BS - 1, BS)
        await ini.logout()
    run(go())


def rbd_target_pool(config: Path) -> str:
    return str(next(lc["pool"] for lc in yaml.safe_load(config.read_text())["targets"][0]
                    ["luns"] if lc.get("backstore") == "rbd"))


def test_a_missing_image_needs_a_size(ceph_cluster: CephCluster, image_name: str,
                                      tmp_path: Path) -> None:
    """Only the cluster knows whether an image exists: a missing one without a size, or a
    read-only one, is a configuration error naming the key when the target starts."""
    lun = rbd_lun(ceph_cluster, 0, image_name)
    del lun["size"]
    path = write_target_config(tmp_path, luns=[lun])
    with pytest.raises(ConfigError, match="no size is given") as info:
        assembly.prepare_backing_files(load(path))
    assert info.value.key == "targets[0].luns[0].size"
    status, out = run(pytarget("serve", "--config", str(path)))
    assert status == 2 and "configuration error" in out and "luns[0].size" in out, out
    config = load(write_target_config(tmp_path, luns=[{**lun, "readonly": True,
                                                       "size": "1MiB"}]))
    with pytest.raises(ConfigError, match="read-only LUNs are never created") as info:
        assembly.prepare_backing_files(config)
    assert info.value.key == "targets[0].luns[0].image"
