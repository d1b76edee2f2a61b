"""Snapshots of a running target through the command line and the control socket, with the
project's initiator logged in: a set taken at one instant, shown as a read-only LUN (its own
VPD 83h identity, write protected, REPORTED LUNS DATA HAS CHANGED as it comes and goes) and as
an NBD export, refused deletes while exposed, rollback with its unit attention, a writable
clone, bad input, and the catalog and exposures kept across a stop and start. The target is a
`Server` of this process; the command line runs as a child, as an operator would run it."""

from __future__ import annotations

import asyncio
import gc
import json
import os
from pathlib import Path

from pytarget import assembly
from pytarget.config import load
from pytarget.initiator.client import CommandResult, Initiator
from pytarget.server import Server

from ..conftest import INITIATOR1, TARGET_IQN, run, until, write_config
from .test_reload import pytarget

BS = 512
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
MEDIUM_MAY_HAVE_CHANGED = (0x28, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
INQUIRY_83 = bytes([0x12, 0x01, 0x83, 0x00, 0xFF, 0x00])
MODE_SENSE_6 = bytes([0x1A, 0x00, 0x3F, 0x00, 0xFF, 0x00])


def ua(result: CommandResult) -> tuple[int, int] | None:
    if result.sense_key != UNIT_ATTENTION:
        return None
    assert result.asc is not None and result.ascq is not None
    return result.asc, result.ascq


async def cli(config: Path, *args: str, ok: bool = True) -> str:
    status, out = await pytarget("snapshot", *args, "--config", str(config))
    assert (status == 0) == ok, out
    return out


def test_snapshot_commands_on_a_live_target(tmp_path: Path) -> None:
    config = write_config(tmp_path, luns=[
        {"id": 0, "path": "lun0.img", "size": "8MiB"},
        {"id": 1, "path": "lun1.img", "size": "8MiB"}], nbd="127.0.0.1:0")
    a0, a1, b = os.urandom(64 * BS), os.urandom(64 * BS), os.urandom(64 * BS)

    async def go() -> None:
        server = Server(load(config), source=str(config))
        await server.start()
        try:
            host, port = server.registry.portals[0]
            ini = await Initiator.connect(host, port)
            await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
            for lun in (0, 1):
                await ini.clear_unit_attentions(lun)
            (await ini.write(0, 0, a0)).check()
            (await ini.write(1, 0, a1)).check()

            out = await cli(config, "create", "s1", "0", "1")
            assert f"snapshot {TARGET_IQN}/0@s1 taken" in out and "writes held back" in out
            (await ini.write(0, 0, b)).check()
            rows = json.loads(await cli(config, "list", "--json"))
            assert [(r["lun"], r["name"]) for r in rows] == [(0, "s1"), (1, "s1")]
            assert rows[0]["members"] == [f"{TARGET_IQN}/0", f"{TARGET_IQN}/1"]
            assert rows[0]["method"] in ("reflink", "copy") and rows[0]["size"] == 8 << 20
            assert f"{TARGET_IQN}/1@s1" in await cli(config, "list", "1")

            # bad input, each with its reason
            assert "already has a snapshot s1" in await cli(config, "create", "s1", "0", ok=False)
            assert "has no LUN 7" in await cli(config, "create", "s2", "7", ok=False)
            assert "not a snapshot name" in await cli(config, "create", "..x", "0", ok=False)
            assert "no snapshot nope" in await cli(config, "delete", "0@nope", ok=False)
            assert "no target" in await cli(config, "create", "s2", "iqn.2026-11.x:y/0",
                                            ok=False)
            assert "is not [TARGET-IQN/]LUN@SNAPSHOT" in await cli(config, "delete", "0",
                                                                   ok=False)

            # shown as LUN 5: initiators learn of it, it reads the snapshot, it is protected
            out = await cli(config, "expose", "0@s1", "--lun", "5")
            assert "running target: target" in out and "LUN 5 added" in out
            assert ua(await ini.test_unit_ready(0)) == REPORTED_LUNS_CHANGED
            await ini.clear_unit_attentions(5)
            assert (await ini.read(5, 0, 64)).check().data == a0
            assert (await ini.read(0, 0, 64)).check().data == b
            refused = await ini.write(5, 0, b)
            assert refused.sense_key == DATA_PROTECT
            assert (refused.asc, refused.ascq) == WRITE_PROTECTED
            mode = (await ini.command(5, MODE_SENSE_6, read_length=255)).check().data
            assert mode[2] & 0x80  # WP (SBC-3 6.5.1)
            own = assembly.lu_identity(TARGET_IQN, 0, None, "s1")[1]
            assert own != assembly.lu_identity(TARGET_IQN, 0, None)[1]
            vpd5 = (await ini.command(5, INQUIRY_83, read_length=255)).check().data
            vpd0 = (await ini.command(0, INQUIRY_83, read_length=255)).check().data
            assert own in vpd5 and own not in vpd0

            # and over NBD as TARGET-IQN/LUN-ID@SNAPSHOT
            out = await cli(config, "expose", "0@s1", "--nbd")
            assert f"{TARGET_IQN}/0@s1" in out
            assert server.nbd is not None
            assert server.nbd.directory.lookup(f"{TARGET_IQN}/0@s1", "127.0.0.1") is not None

            # an exposed snapshot is not deleted
            out = await cli(config, "delete", "0@s1", ok=False)
            assert f"shown as LUN {TARGET_IQN}/5" in out and "unexpose" in out
            out = await cli(config, "unexpose", "0@s1")
            assert "LUN 5 removed" in out
            assert ua(await ini.test_unit_ready(0)) == REPORTED_LUNS_CHANGED
            out = await cli(config, "delete", "0@s1", ok=False)
            assert "exposed over NBD" in out
            await cli(config, "unexpose", "0@s1", "--nbd")
            assert server.nbd.directory.lookup(f"{TARGET_IQN}/0@s1", "127.0.0.1") is None
            await cli(config, "delete", "0@s1")
            assert not (tmp_path / "lun0.img.snapshots" / "s1").exists()
            assert [r["lun"] for r in json.loads(await cli(config, "list", "--json"))] == [1]

            # rollback: the blocks come back, initiators are told the medium may have changed
            await ini.clear_unit_attentions(1)
            (await ini.write(1, 0, b)).check()
            await cli(config, "rollback", "1@s1")
            assert ua(await ini.test_unit_ready(1)) == MEDIUM_MAY_HAVE_CHANGED
            assert (await ini.read(1, 0, 64)).check().data == a1

            # a writable clone, added as a LUN
            out = await cli(config, "clone", "1@s1", "--path", str(tmp_path / "clone.img"),
                            "--id", "3")
            assert "LUN 3 added" in out
            await ini.clear_unit_attentions(3)
            assert (await ini.read(3, 0, 64)).check().data == a1
            (await ini.write(3, 0, b)).check()
            assert "exists" in await cli(config, "clone", "1@s1", "--path",
                                         str(tmp_path / "clone.img"), ok=False)
            await cli(config, "expose", "1@s1", "--nbd")
            await ini.close()
        finally:
            await server.stop()

        # kept across a stop and a start
        server = Server(load(config), source=str(config))
        await server.start()
        try:
            rows = json.loads(await cli(config, "list", "--json"))
            assert [(r["lun"], r["name"], r["nbd"]) for r in rows] == [(1, "s1", True)]
            assert server.nbd is not None
            assert server.nbd.directory.lookup(f"{TARGET_IQN}/1@s1", "127.0.0.1") is not None
            node = server.registry.target(TARGET_IQN)
            assert node is not None and sorted(node.luns) == [0, 1, 3]
        finally:
            await server.stop()

    run(go(), timeout=180)


def test_a_set_taken_during_dependent_writes_is_consistent(tmp_path: Path) -> None:
    """A writer puts sequence number k in block k of LUN 0, then (once that completed) in block
    k of LUN 1. Snapshots of the pair taken meanwhile must each show a state the pair really
    was in: LUN 1 at most one write behind LUN 0, never ahead of it."""
    config = write_config(tmp_path, luns=[
        {"id": 0, "path": "lun0.img", "size": "4MiB"},
        {"id": 1, "path": "lun1.img", "size": "4MiB"}])
    rounds = 2000
    sets = 8

    async def go() -> None:
        server = Server(load(config), source=str(config))
        await server.start()
        try:
            host, port = server.registry.portals[0]
            ini = await Initiator.connect(host, port)
            await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
            for lun in (0, 1):
                await ini.clear_unit_attentions(lun)
            done = asyncio.Event()

            async def writer() -> None:
                for k in range(1, rounds + 1):
                    block = k.to_bytes(8, "big") * (BS // 8)
                    (await ini.write(0, k, block)).check()
                    (await ini.write(1, k, block)).check()
                done.set()

            writing = asyncio.ensure_future(writer())
            members = [{"target": TARGET_IQN, "lun": 0}, {"target": TARGET_IQN, "lun": 1}]
            taken = 0
            while taken < sets and not done.is_set():
                await server.snapshots.handle("snapshot_create",
                                              {"name": f"s{taken}", "members": members})
                taken += 1
            await writing
            await ini.close()
        finally:
            await server.stop()
        assert taken >= 2, "the writer finished before two sets were taken"
        for n in range(taken):
            last = []
            for lun in (0, 1):
                data = (tmp_path / f"lun{lun}.img.snapshots" / f"s{n}").read_bytes()
                seqs = [int.from_bytes(data[k * BS:k * BS + 8], "big")
                        for k in range(1, rounds + 1)]
                written = [k for k, v in enumerate(seqs, 1) if v == k]
                assert written == list(range(1, len(written) + 1)), f"s{n} LUN {lun}: gaps"
                last.append(len(written))
            assert last[1] <= last[0] <= last[1] + 1, f"s{n}: LUN 0 at {last[0]}, LUN 1 at " \
                                                       f"{last[1]}"

    run(go(), timeout=300)


def open_names(fragment: str) -> list[str]:
    """The files this process has open whose path contains `fragment`."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
    return [name for name in names if fragment in name]


def test_a_deleted_snapshot_that_was_read_through_iscsi_is_let_go_at_once(tmp_path: Path) -> None:
    """Reads of a snapshot LUN are lent from its file's page-cache mapping; once the LUN is
    unexposed and the snapshot deleted, nothing of the target may keep the file (and so its
    blocks) open, even before Python's cyclic garbage collector runs."""
    config = write_config(tmp_path, luns=[{"id": 0, "path": "lun0.img", "size": "8MiB"}])
    data = os.urandom(2048 * BS)

    async def go() -> None:
        server = Server(load(config), source=str(config))
        await server.start()
        collecting = gc.isenabled()
        gc.disable()
        try:
            host, port = server.registry.portals[0]
            ini = await Initiator.connect(host, port)
            await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
            await ini.clear_unit_attentions(0)
            (await ini.write(0, 0, data)).check()
            await cli(config, "create", "s1", "0")
            await cli(config, "expose", "0@s1", "--lun", "1")
            await ini.clear_unit_attentions(1)
            for _ in range(4):  # the first reads fill the page cache, later ones are lent
                assert (await ini.read(1, 0, 2048)).check().data == data
            await ini.logout()
            await ini.close()
            await cli(config, "unexpose", "0@s1")
            await cli(config, "delete", "0@s1")
            await until(lambda: not open_names("lun0.img.snapshots"),
                        "the target closes the deleted snapshot's file")
        finally:
            if collecting:
                gc.enable()
            await server.stop()

    run(go(), timeout=120)
