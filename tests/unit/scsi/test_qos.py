"""Storage QoS in the device server: which commands a policy holds, what they cost, and that
ABORT TASK, ABORT TASK SET, LUN RESET and nexus loss end held commands at once. Policies here
allow one command and then hold the next for about a thousand seconds, so what is held stays
held for the whole test without any clock being read by the test."""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pytarget.core.qos import InitiatorPolicy, Limits, LunPolicy, TargetPolicy
from pytarget.core.sense import Status
from pytarget.core.table import Opcode
from pytarget.core.task import Nexus, ScsiTask
from pytarget.scsi.device import LogicalUnit
from pytarget.scsi.qos import QosGate, command_cost

from .harness import NEXUS_A, NEXUS_B, Directory, make_lu, make_task

STARVED = Limits(iops=0.001, burst=0.0)  # the first command starts, the next waits ~1000 s


def read10(lba: int = 0, blocks: int = 8) -> bytes:
    return bytes((Opcode.READ_10, 0)) + lba.to_bytes(4, "big") + bytes(1) \
        + blocks.to_bytes(2, "big") + bytes(1)


def write10(lba: int = 0, blocks: int = 8) -> bytes:
    return bytes((Opcode.WRITE_10, 0)) + lba.to_bytes(4, "big") + bytes(1) \
        + blocks.to_bytes(2, "big") + bytes(1)


def gate_for(lus: list[LogicalUnit], policy: TargetPolicy) -> QosGate:
    gate = QosGate("iqn.2026-12.io.pytarget:unit", policy)
    for lu in lus:
        lu.qos = gate
        for n in (NEXUS_A, NEXUS_B):
            lu.ua.setdefault(n.key, deque()).clear()
    return gate


def in_loop(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))
    return wrapper


COMPLETED: list[int] = []


class Submitted:
    """A command submitted as a front end would, with its completion recorded."""

    def __init__(self, lu: LogicalUnit, cdb: bytes, nexus: Nexus = NEXUS_A,
                 data: bytes = b"") -> None:
        self.task: ScsiTask = make_task(lu, cdb, data, nexus)
        self.done = False
        lu.submit(self.task, self._finished)

    def _finished(self, task: ScsiTask) -> None:
        self.done = True
        COMPLETED.append(task.tag)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def lu(tmp_path: Path) -> LogicalUnit:
    return make_lu(tmp_path)


def test_costs_by_command(lu: LogicalUnit) -> None:
    def cost(cdb: bytes) -> tuple[int, bool] | None:
        spec = lu.table.lookup(cdb)
        return command_cost(spec, spec.parse(cdb), lu.block_size, lu.nblocks)

    assert cost(read10(0, 16)) == (16 * 512, False)
    assert cost(write10(0, 128)) == (128 * 512, True)
    ws = bytes((Opcode.WRITE_SAME_16, 0)) + (100).to_bytes(8, "big") + (64).to_bytes(4, "big") \
        + bytes(2)
    assert cost(ws) == (64 * 512, True)
    ws_unmap = bytes((Opcode.WRITE_SAME_16, 0x08)) + ws[2:]
    assert cost(ws_unmap) == (0, True)
    unmap = bytes((Opcode.UNMAP, 0, 0, 0, 0, 0, 0, 0, 24, 0))
    assert cost(unmap) == (0, True)
    assert cost(bytes((Opcode.INQUIRY, 0, 0, 0, 96, 0))) is None
    assert cost(bytes(6)) is None  # TEST UNIT READY
    assert cost(bytes((Opcode.SYNCHRONIZE_CACHE_10,)) + bytes(9)) is None


@in_loop
async def test_commands_over_budget_wait_in_order(lu: LogicalUnit) -> None:
    gate = gate_for([lu], TargetPolicy(((0, LunPolicy(STARVED)),)))
    first = Submitted(lu, read10())
    held = [Submitted(lu, read10(8 * i)) for i in range(1, 4)]
    await settle()
    assert first.done and first.task.status == Status.GOOD
    assert not any(h.done for h in held)
    # commands QoS never holds pass the queue
    inquiry = Submitted(lu, bytes((Opcode.INQUIRY, 0, 0, 0, 36, 0)))
    assert inquiry.done and inquiry.task.status == Status.GOOD
    # a policy raised by a reload releases what waits, in arrival order
    COMPLETED.clear()
    gate.set_policy(TargetPolicy(((0, LunPolicy(Limits(iops=1e6))),)))
    await settle()
    assert all(h.done and h.task.status == Status.GOOD for h in held)
    assert COMPLETED == [h.task.tag for h in held]


@in_loop
async def test_abort_task_ends_a_held_command(lu: LogicalUnit) -> None:
    gate = gate_for([lu], TargetPolicy(((0, LunPolicy(STARVED)),)))
    Submitted(lu, read10())
    held = [Submitted(lu, read10(8 * i)) for i in range(1, 4)]
    await settle()
    assert await lu.abort_task(NEXUS_A, held[1].task.tag)
    assert held[1].done and held[1].task.aborted
    assert held[1].task.status == Status.TASK_ABORTED
    assert not held[0].done and not held[2].done
    assert len(list(gate.scheduler.waiting())) == 2


@in_loop
async def test_abort_task_set_and_lun_reset_end_held_commands(lu: LogicalUnit) -> None:
    gate = gate_for([lu], TargetPolicy(((0, LunPolicy(STARVED)),)))
    Submitted(lu, read10())
    a = [Submitted(lu, read10(8 * i)) for i in range(1, 3)]
    b = [Submitted(lu, write10(8 * i), NEXUS_B, bytes(4096)) for i in range(3, 5)]
    await settle()
    await lu.abort_task_set(NEXUS_A)
    assert all(s.done and s.task.status == Status.TASK_ABORTED for s in a)
    assert not any(s.done for s in b)
    await lu.reset(NEXUS_A)
    assert all(s.done and s.task.status == Status.TASK_ABORTED for s in b)
    assert not list(gate.scheduler.waiting())


@in_loop
async def test_nexus_loss_ends_that_nexus_held_commands(lu: LogicalUnit) -> None:
    gate = gate_for([lu], TargetPolicy(((0, LunPolicy(STARVED)),)))
    Submitted(lu, read10())
    a = [Submitted(lu, read10(8 * i)) for i in range(1, 3)]
    b = Submitted(lu, read10(64), NEXUS_B)
    await settle()
    lu.nexus_lost(NEXUS_A)
    await settle()
    assert all(s.done and s.task.aborted for s in a)
    assert not b.done
    assert [it.queue.nexus_key for it in gate.scheduler.waiting()] == [NEXUS_B.key]  # type: ignore[union-attr]
    await lu.abort_task_set(None)


@in_loop
async def test_a_held_flow_does_not_delay_another_lun_or_initiator(tmp_path: Path) -> None:
    directory = Directory()
    lu0 = make_lu(tmp_path, lun=0, directory=directory)
    lu1 = make_lu(tmp_path, lun=1, directory=directory)
    policy = TargetPolicy(((0, LunPolicy(initiators=(
        InitiatorPolicy(NEXUS_A.initiator_name, STARVED),))),))
    gate_for([lu0, lu1], policy)
    Submitted(lu0, read10())
    held = Submitted(lu0, read10(8))
    other_initiator = Submitted(lu0, read10(16), NEXUS_B)
    other_lun = Submitted(lu1, read10(16))
    await settle()
    assert not held.done
    assert other_initiator.done and other_lun.done
    await lu0.abort_task_set(None)


@in_loop
async def test_copies_are_charged_to_the_luns_they_touch(tmp_path: Path) -> None:
    directory = Directory()
    src = make_lu(tmp_path, lun=0, directory=directory)
    dst = make_lu(tmp_path, lun=1, directory=directory)
    gate = gate_for([src, dst], TargetPolicy(((0, LunPolicy(STARVED)),)))
    await dst.copy_blocks_from(src, 0, 100, 8, NEXUS_A)  # the source's budget, spent
    copy = asyncio.ensure_future(dst.copy_blocks_from(src, 0, 0, 8, NEXUS_A))
    await settle()
    assert not copy.done()
    (item,) = gate.scheduler.waiting()
    assert item.nbytes == 8 * 512 and not item.write
    copy.cancel()
    await asyncio.gather(copy, return_exceptions=True)
    assert not list(gate.scheduler.waiting())


def test_no_policy_no_gate(lu: LogicalUnit) -> None:
    assert lu.qos is None
