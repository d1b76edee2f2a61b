"""Reservations shared by two gateways: two logical units over one in-memory versioned store
(tests/unit/scsi/shared_store.py), each as one gateway serving the same logical unit.

What one gateway does is what the other enforces at its next command: PR OUT and SPC-2
RESERVE/RELEASE, the unit attentions and aborts a change owes to the other gateway's I_T
nexuses, concurrent updates that race (compare-and-update, retried), a lost watch, an
unreachable store, I_T nexus loss and LOGICAL UNIT RESET."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pytarget.backstore.file import FileBackstore
from pytarget.core.sense import Asc, SenseKey, Status
from pytarget.core.task import Nexus, ScsiTask
from pytarget.scsi.device import LogicalUnit, LuConfig

from .shared_store import MemoryStore, SharedObject
from .test_pr import (
    BLOCK,
    CONFLICT,
    EA,
    EA_RO,
    ISID_2,
    NAME_A,
    NAME_B,
    NAME_C,
    PREEMPT,
    PREEMPT_AND_ABORT,
    REGISTER,
    RELEASE,
    WE,
    WE_RO,
    Directory,
    Source,
    execute,
    nexus,
    params,
    pending_uas,
    prout,
    prout_cdb,
    read10,
    read_keys,
    read_reservation,
    register,
    reserve,
    run_async,
    sense_of,
    write10,
)

NAA = bytes.fromhex("3000000000000001")
RESERVE6, RELEASE6 = bytes((0x16, 0, 0, 0, 0, 0)), bytes((0x17, 0, 0, 0, 0, 0))


def gateway(path: Path, store: MemoryStore) -> LogicalUnit:
    """One gateway's logical unit: the shared backing file, the shared reservation store."""
    if not path.exists():
        FileBackstore.create(str(path), 1 << 20)
    return LogicalUnit(LuConfig(lun=0, naa=NAA), FileBackstore(str(path)), Directory(),
                       reservations=store)


@pytest.fixture
def shared() -> SharedObject:
    return SharedObject()


@pytest.fixture
def gateways(tmp_path: Path, shared: SharedObject) -> tuple[LogicalUnit, LogicalUnit]:
    path = tmp_path / "lun0.img"
    return gateway(path, shared.handle("gw1")), gateway(path, shared.handle("gw2"))


def touch(lu: LogicalUnit, n: Nexus) -> None:
    """`n` has used this gateway (it has a unit attention queue there), with nothing pending."""
    while lu.take_unit_attention(n) is not None:
        pass


def store(lu: LogicalUnit) -> MemoryStore:
    assert isinstance(lu.pr.store, MemoryStore)
    return lu.pr.store


@run_async
async def test_write_exclusive_through_one_gateway_conflicts_on_the_other(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a, c = nexus(NAME_A), nexus(NAME_C)
    await register(gw1, a, 0xA)
    assert (await reserve(gw1, a, 0xA, WE)).status == Status.GOOD
    assert (await execute(gw2, c, write10(), b"\0" * BLOCK)).status == CONFLICT
    assert (await execute(gw2, c, read10())).status == Status.GOOD  # Write Exclusive
    assert await read_reservation(gw2) == (0xA, WE)
    assert (await execute(gw1, a, write10(), b"\1" * BLOCK)).status == Status.GOOD


@run_async
async def test_preempt_through_the_other_gateway_owes_a_unit_attention(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(gw1, a, 0xA)
    assert (await reserve(gw1, a, 0xA, WE)).status == Status.GOOD
    await register(gw2, b, 0xB)
    touch(gw1, a)
    task = await prout(gw2, b, PREEMPT, params(0xB, 0xA), EA)
    assert task.status == Status.GOOD, task.sense
    # gw2's PREEMPT completed only after gw1 took the change in: nothing left to read.
    assert store(gw1).trusted()
    assert pending_uas(gw1, a) == [Asc.REGISTRATIONS_PREEMPTED]
    assert await read_reservation(gw1) == (0xB, EA)
    late = ScsiTask(read10(), 0, 1, a, expected_out=0, source=Source(b""))
    await gw1.execute(late)
    assert sense_of(late)[:2] == (SenseKey.UNIT_ATTENTION, Asc.REGISTRATIONS_PREEMPTED)
    assert (await execute(gw1, a, read10())).status == CONFLICT  # Exclusive Access now


@run_async
async def test_release_of_registrants_only_tells_registrants_on_both_gateways(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a, b, c = nexus(NAME_A), nexus(NAME_B), nexus(NAME_C)
    await register(gw1, a, 0xA)
    await register(gw2, b, 0xB)
    await register(gw1, c, 0xC)
    assert (await reserve(gw1, a, 0xA, WE_RO)).status == Status.GOOD
    touch(gw2, b)
    touch(gw1, c)
    touch(gw2, c)
    assert (await prout(gw1, a, RELEASE, params(0xA), WE_RO)).status == Status.GOOD
    assert pending_uas(gw2, b) == [Asc.RESERVATIONS_RELEASED]
    assert pending_uas(gw1, c) == [Asc.RESERVATIONS_RELEASED]
    assert pending_uas(gw2, c) == [Asc.RESERVATIONS_RELEASED]
    assert pending_uas(gw1, a) == []


@run_async
async def test_register_races_end_with_one_generation(
        shared: SharedObject, gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    count = 12
    firsts = [nexus(f"iqn.2026-11.io.pytarget.test:r{i}") for i in range(count)]
    seconds = [nexus(f"iqn.2026-11.io.pytarget.test:r{i}", ISID_2) for i in range(count)]
    await asyncio.gather(*(register(gw, n, 0x100 + i)
                           for i in range(count)
                           for gw, n in ((gw1, firsts[i]), (gw2, seconds[i]))))
    assert shared.conflicts > 0  # the two gateways did race
    generation1, keys1 = await read_keys(gw1)
    generation2, keys2 = await read_keys(gw2)
    assert generation1 == generation2 == 2 * count == shared.updates
    assert sorted(keys1) == sorted(keys2) == sorted([0x100 + i for i in range(count)] * 2)


@run_async
async def test_a_command_waits_for_a_change_in_flight(
        shared: SharedObject, gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    """Between the store taking a change and gw2 hearing of it, gw2 is not trusted: a command
    there re-reads instead of acting on its cached copy."""
    gw1, gw2 = gateways
    a, c = nexus(NAME_A), nexus(NAME_C)
    await register(gw1, a, 0xA)
    assert (await execute(gw2, c, write10(), b"\0" * BLOCK)).status == Status.GOOD
    shared.hold = asyncio.Event()
    taking = asyncio.ensure_future(reserve(gw1, a, 0xA, WE))
    while shared.updates < 2:
        await asyncio.sleep(0)
    assert not store(gw2).trusted()
    assert (await execute(gw2, c, write10(), b"\0" * BLOCK)).status == CONFLICT
    shared.hold.set()
    assert (await taking).status == Status.GOOD


@run_async
async def test_lost_watch_means_reading_before_acting(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a, c = nexus(NAME_A), nexus(NAME_C)
    assert (await execute(gw2, c, read10())).status == Status.GOOD
    store(gw2).lose_watch()
    await register(gw1, a, 0xA)
    assert (await reserve(gw1, a, 0xA, EA)).status == Status.GOOD
    loads = store(gw2).loads
    assert (await execute(gw2, c, read10())).status == CONFLICT
    assert store(gw2).loads == loads + 1 and store(gw2).trusted()  # watching again


@run_async
async def test_unreachable_store_fails_commands_that_depend_on_it(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    c = nexus(NAME_C)
    assert (await execute(gw2, c, read10())).status == Status.GOOD
    store(gw2).reachable = False
    store(gw2).lose_watch()
    task = await execute(gw2, c, read10())
    assert sense_of(task)[:2] == (SenseKey.NOT_READY,
                                  Asc.LUN_NOT_ACCESSIBLE_TARGET_PORT_UNAVAILABLE)
    inquiry = await execute(gw2, c, bytes((0x12, 0, 0, 0, 36, 0)))
    assert inquiry.status == Status.GOOD  # reservations never forbid INQUIRY
    store(gw2).reachable = True
    assert (await execute(gw2, c, read10())).status == Status.GOOD


@run_async
async def test_preempt_and_abort_ends_tasks_on_the_other_gateway(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a, b = nexus(NAME_A), nexus(NAME_B)
    await register(gw2, a, 0xA)
    await register(gw1, b, 0xB)
    assert (await reserve(gw2, a, 0xA, WE_RO)).status == Status.GOOD
    touch(gw2, a)
    victim = ScsiTask(write10(), 0, 1000, a, expected_out=BLOCK, source=Source(None))
    runner = gw2.start(victim)
    await asyncio.sleep(0)
    assert not runner.done()
    task = ScsiTask(prout_cdb(PREEMPT_AND_ABORT, EA_RO, length=24), 0, 2000, b,
                    expected_out=24, source=Source(params(0xB, 0xA)))
    await gw1.start(task)
    assert task.status == Status.GOOD, task.sense
    assert runner.done() and victim.aborted and victim.status == Status.TASK_ABORTED
    assert pending_uas(gw2, a) == [Asc.REGISTRATIONS_PREEMPTED,
                                   Asc.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR]
    assert await read_reservation(gw2) == (0xB, EA_RO)


@run_async
async def test_spc2_reserve_nexus_loss_and_reset_across_gateways(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a, c = nexus(NAME_A), nexus(NAME_C)
    assert (await execute(gw1, a, RESERVE6)).status == Status.GOOD
    assert (await execute(gw2, c, read10())).status == CONFLICT
    assert (await execute(gw2, c, RESERVE6)).status == CONFLICT
    assert (await prout(gw2, c, REGISTER, params(0, 0xC))).status == CONFLICT  # SPC-2 5.5.1
    assert (await execute(gw2, c, RELEASE6)).status == Status.GOOD  # not the holder: no effect
    assert gw1.reservation == a.key == gw2.reservation
    # I_T nexus loss on gw1 releases it everywhere (SPC-2 5.5.1)
    gw1.nexus_lost(a)
    while gw2.reservation is not None:
        await asyncio.sleep(0)
    assert (await execute(gw2, c, read10())).status == Status.GOOD
    # LOGICAL UNIT RESET through gw2 releases gw1's holder and resets gw1 too (SAM-5 7.7)
    assert (await execute(gw1, a, RESERVE6)).status == Status.GOOD
    touch(gw1, a)
    await gw2.reset(c)
    assert gw1.reservation is None is gw2.reservation
    assert pending_uas(gw1, a) == [Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED]
    assert pending_uas(gw2, c) == [Asc.BUS_DEVICE_RESET_FUNCTION_OCCURRED]
    assert (await execute(gw2, c, RESERVE6)).status == Status.GOOD


@run_async
async def test_registrations_survive_nexus_loss_and_a_gateway_restart(
        tmp_path: Path, shared: SharedObject,
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a = nexus(NAME_A)
    await register(gw1, a, 0xA)
    assert (await reserve(gw1, a, 0xA, WE)).status == Status.GOOD
    gw1.nexus_lost(a)
    gw1.close()
    again = gateway(tmp_path / "lun0.img", shared.handle("gw1 again"))
    assert await read_keys(again) == (1, [0xA])
    assert await read_reservation(again) == (0xA, WE)
    assert await read_keys(gw2) == (1, [0xA])
    document = json.loads(shared.document or b"")
    assert document["format"] == "pytarget-shared-reservations"
    assert document["generation"] == 1 and document["spc2"] is None


@run_async
async def test_report_capabilities_offers_aptpl_and_records_it(
        gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, gw2 = gateways
    a = nexus(NAME_A)
    caps = await execute(gw2, a, bytes((0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0)))
    assert caps.status == Status.GOOD and caps.data_in is not None
    assert bytes(caps.data_in)[2] & 0x01  # PTPL_C
    await register(gw1, a, 0xA, aptpl=True)
    caps = await execute(gw2, a, bytes((0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0)))
    assert caps.data_in is not None and bytes(caps.data_in)[3] & 0x01  # PTPL_A


@run_async
async def test_corrupt_shared_document_is_not_acted_on(
        shared: SharedObject, gateways: tuple[LogicalUnit, LogicalUnit]) -> None:
    gw1, _ = gateways
    shared.document = b'{"format": "something else"}'
    shared.version = 7
    task = await execute(gw1, nexus(NAME_C), write10(), b"\0" * BLOCK)
    assert sense_of(task)[:2] == (SenseKey.NOT_READY,
                                  Asc.LUN_NOT_ACCESSIBLE_TARGET_PORT_UNAVAILABLE)
