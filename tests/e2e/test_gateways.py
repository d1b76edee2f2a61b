"""Two gateways of one target, in this process, over the same backing files: each answers
discovery and login as its own portal group, both name the same logical units and report the
same target port groups, data written through one is read through the other, and an ownership
move is seen through both with the unit attention it owes (docs/guides/scale-out.md)."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import yaml

from pytarget import status
from pytarget.config import load
from pytarget.initiator.client import Initiator
from pytarget.server import Server

from ..conftest import INITIATOR1, INITIATOR2, TARGET_IQN

LUNS = [{"id": 0, "path": "lun0.img", "size": "4MiB"}, {"id": 1, "path": "lun1.img",
                                                       "size": "4MiB"}]
GATEWAYS = [{"name": "gw1", "portals": ["127.0.0.1:0"]},
            {"name": "gw2", "portals": ["127.0.0.1:0"]}]
RTPG = bytes((0xA3, 0x0A, 0, 0, 0, 0)) + struct.pack(">I", 1024) + bytes(2)
VPD83 = bytes((0x12, 0x01, 0x83, 0x01, 0x00, 0x00))


def designators(page: bytes) -> list[bytes]:
    out, at = [], 4
    while at < len(page):
        out.append(page[at:at + 4 + page[at + 3]])
        at += 4 + page[at + 3]
    return out


def test_two_gateways_one_target(tmp_path: Path) -> None:
    config_file = tmp_path / "pytarget.yaml"
    config_file.write_text(yaml.safe_dump(
        {"gateways": GATEWAYS, "targets": [{"name": TARGET_IQN, "luns": LUNS}]}))

    async def go() -> None:
        gateways = [Server(load(config_file, name), source=str(config_file))
                    for name in ("gw1", "gw2")]
        clients: list[Initiator] = []
        try:
            for server in gateways:
                await server.start()
            for tag, (server, name) in enumerate(zip(gateways, (INITIATOR1, INITIATOR2),
                                                     strict=True), start=1):
                host, port = server.registry.portals[0]
                discovery = await Initiator.connect(host, port)
                assert await discovery.discover() == {TARGET_IQN: [f"{host}:{port},{tag}"]}
                await discovery.logout()
                await discovery.close()
                ini = await Initiator.connect(host, port)
                login = await ini.login(TARGET_IQN, initiator_name=name)
                assert login.params.target_portal_group_tag == tag
                for lun in (0, 1):
                    await ini.clear_unit_attentions(lun)
                clients.append(ini)

            pages = [(await ini.command(0, VPD83, read_length=255)).check().data
                     for ini in clients]
            found = [designators(page) for page in pages]
            # The logical unit's own designators are the same through both gateways.
            assert found[0][:3] == found[1][:3]
            for tag, descs in enumerate(found, start=1):
                assert bytes((0x51, 0x94, 0, 4, 0, 0, 0, tag)) in descs  # relative port
                assert bytes((0x51, 0x95, 0, 4, 0, 0, 0, tag)) in descs  # target port group
            for ini in clients:
                inquiry = (await ini.command(0, bytes((0x12, 0, 0, 0, 96, 0)),
                                             read_length=96)).check().data
                assert inquiry[5] & 0x30 == 0x10  # TPGS: implicit ALUA

            for lun, owner in ((0, 1), (1, 2)):
                reports = [(await ini.command(lun, RTPG, read_length=1024)).check().data
                           for ini in clients]
                assert reports[0] == reports[1]
                report = reports[0]
                assert struct.unpack_from(">I", report)[0] == 24
                states = {struct.unpack_from(">H", report, at + 2)[0]: report[at] & 0x0F
                          for at in (4, 16)}
                ports = {struct.unpack_from(">H", report, at + 2)[0]:
                         struct.unpack_from(">H", report, at + 10)[0] for at in (4, 16)}
                assert states == {owner: 0x0, 3 - owner: 0x1}
                assert ports == {1: 1, 2: 2}

            data = os.urandom(64 * 512)
            (await clients[0].write(0, 128, data)).check()
            assert (await clients[1].read(0, 128, 64)).check().data == data

            doc = status.collect(gateways[1])
            assert doc["gateway"] == "gw2"
            assert [(g["name"], g["id"], g["local"]) for g in doc["gateways"]] == [
                ("gw1", 1, False), ("gw2", 2, True)]
            luns = doc["targets"][0]["luns"]
            assert [(u["owner"], u["alua_state"]) for u in luns] == [
                ("gw1", "active_non_optimized"), ("gw2", "active_optimized")]
            assert "gw1" in status.render(doc) and "active/non-optimized" in status.render(doc)

            # LUN 0 moves to gw2, as the exclusive lock of a shared image would move it: each
            # gateway learns it and tells its nexuses; both then report the new states.
            for server in gateways:
                lu = server.registry.target(TARGET_IQN).luns[0]  # type: ignore[union-attr]
                assert lu.set_owner("gw2")
            for ini in clients:
                tur = await ini.test_unit_ready(0)
                assert (tur.sense_key, tur.asc, tur.ascq) == (0x6, 0x2A, 0x06)
                assert (await ini.test_unit_ready(0)).good
            reports = [(await ini.command(0, RTPG, read_length=1024)).check().data
                       for ini in clients]
            assert reports[0] == reports[1]
            assert (reports[0][4] & 0x0F, reports[0][16] & 0x0F) == (0x1, 0x0)
            assert reports[0][9] == reports[0][21] == 0x02  # altered by implicit behaviour

            for ini in clients:
                await ini.logout()
        finally:
            for ini in clients:
                await ini.close()
            for server in gateways:
                await server.stop()

    asyncio.run(asyncio.wait_for(go(), 60))
