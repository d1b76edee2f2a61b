"""The device server's side of storage QoS: which commands a policy throttles and what each
costs, and the asyncio driver of a target's `core.qos.Scheduler` (its one timer, the futures
held commands wait on, and their withdrawal on abort, reset or nexus loss).

What counts (docs/qos.md): READ and VERIFY count the blocks they read; WRITE, WRITE AND
VERIFY, ORWRITE and COMPARE AND WRITE the blocks they write; WRITE SAME the blocks it writes,
or one normalized IO and no bytes with UNMAP set; UNMAP one normalized IO and no bytes;
EXTENDED COPY, POPULATE TOKEN and WRITE USING TOKEN one normalized IO each, and the data the
copy manager then moves is charged as it moves, as a read on the source LU and a write on the
destination LU, under the requesting I_T nexus (`charge_copy`). Every other command (INQUIRY,
TEST UNIT READY, REPORT LUNS, MODE SENSE, SYNCHRONIZE CACHE, reservations, RECEIVE COPY
RESULTS, COPY OPERATION ABORT...) is never held.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from ..core.qos import Item, Scheduler, TargetPolicy, normalized_ios
from ..core.table import Cdb, Opcode, OpSpec, ThirdPartyCopyOut
from ..core.task import Nexus, ScsiTask

log = logging.getLogger("pytarget.qos")

_READ, _WRITE, _WRITE_SAME, _ONE_IO = range(4)
_KINDS: dict[int, int] = {
    **dict.fromkeys((Opcode.READ_6, Opcode.READ_10, Opcode.READ_12, Opcode.READ_16,
                     Opcode.VERIFY_10, Opcode.VERIFY_12, Opcode.VERIFY_16), _READ),
    **dict.fromkeys((Opcode.WRITE_6, Opcode.WRITE_10, Opcode.WRITE_12, Opcode.WRITE_16,
                     Opcode.WRITE_AND_VERIFY_10, Opcode.WRITE_AND_VERIFY_12,
                     Opcode.WRITE_AND_VERIFY_16, Opcode.ORWRITE, Opcode.COMPARE_AND_WRITE),
                    _WRITE),
    **dict.fromkeys((Opcode.WRITE_SAME_10, Opcode.WRITE_SAME_16), _WRITE_SAME),
    Opcode.UNMAP: _ONE_IO,
}
_COPY_ACTIONS = frozenset({ThirdPartyCopyOut.EXTENDED_COPY_LID1,
                           ThirdPartyCopyOut.EXTENDED_COPY_LID4,
                           ThirdPartyCopyOut.POPULATE_TOKEN, ThirdPartyCopyOut.WRITE_USING_TOKEN})
WRITE_SAME_UNMAP = 0x08  # byte 1 (SBC-3 5.42, 5.43)


def command_cost(spec: OpSpec, cdb: Cdb, block_size: int,
                 nblocks: int) -> tuple[int, bool] | None:
    """(bytes, is a write) a command is charged, or None when QoS never holds it."""
    kind = _KINDS.get(spec.opcode)
    if kind is None:
        if spec.opcode == Opcode.EXTENDED_COPY and spec.sa in _COPY_ACTIONS:
            return 0, True
        return None
    if kind == _READ:
        return cdb.transfer_length * block_size, False
    if kind == _WRITE:
        return cdb.transfer_length * block_size, True
    if kind == _WRITE_SAME:
        if cdb[1] & WRITE_SAME_UNMAP:
            return 0, True
        blocks = cdb.transfer_length or max(0, nblocks - cdb.lba)  # 0: to the end (SBC-3 5.43)
        return blocks * block_size, True
    return 0, True


class QosGate:
    """A target's scheduler on the event loop: `admit` holds commands over their budget and a
    timer releases them, in the order the scheduler gives."""

    def __init__(self, target: str, policy: TargetPolicy) -> None:
        self.target = target
        self.scheduler = Scheduler(policy)
        self._timer: asyncio.TimerHandle | None = None
        self._when: float | None = None

    @property
    def policy(self) -> TargetPolicy:
        return self.scheduler.policy

    def admit(self, lun: int, block_size: int, nblocks: int, task: ScsiTask, spec: OpSpec,
              cdb: Cdb) -> Awaitable[None] | None:
        """None when `task` may start now, else what to await before it starts."""
        cost = command_cost(spec, cdb, block_size, nblocks)
        if cost is None:
            return None
        return self._request(lun, task.nexus, cost[0], cost[1], task)

    async def charge_copy(self, lun: int, nexus: Nexus, nbytes: int, write: bool) -> None:
        """Wait until the copy manager may move `nbytes` on `lun` for `nexus`."""
        wait = self._request(lun, nexus, nbytes, write, None)
        if wait is not None:
            await wait

    def _request(self, lun: int, nexus: Nexus, nbytes: int, write: bool,
                 task: ScsiTask | None) -> asyncio.Future[None] | None:
        scheduler = self.scheduler
        q = scheduler.queue_of(lun, nexus)
        if q is None:
            return None
        loop = asyncio.get_running_loop()
        item = Item(normalized_ios(nbytes, scheduler.policy.normalize), nbytes, write)
        mine = False
        for started in scheduler.request(q, item, loop.time()):
            if started is item:
                mine = True
            else:
                _release(started)
        if mine:
            self._arm(loop)
            return None
        fut: asyncio.Future[None] = loop.create_future()
        item.payload = (fut, task)
        fut.add_done_callback(lambda f: self._withdrawn(item, f))
        self._arm(loop)
        return fut

    def _withdrawn(self, item: Item, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() and self.scheduler.cancel(item):
            loop = asyncio.get_running_loop()
            self._poll(loop, loop.time())

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        when = self.scheduler.next_wakeup()
        if when == self._when and (when is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._when = when
        if when is not None:
            self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._when is not None:
            now = max(now, self._when)  # call_at may run a clock resolution early
        self._when = None
        self._poll(loop, now)

    def _poll(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        for item in self.scheduler.poll(now):
            _release(item)
        self._arm(loop)

    def nexus_lost(self, nexus: Nexus) -> None:
        """End every command of `nexus` still held (as aborted)."""
        for item in list(self.scheduler.waiting()):
            q = item.queue
            if q is not None and q.nexus_key == nexus.key:
                fut, task = item.payload
                if task is not None:
                    task.aborted = True
                fut.cancel()

    def set_policy(self, policy: TargetPolicy) -> None:
        """A reload's new policy, applied to held commands too."""
        loop = asyncio.get_running_loop()
        for item in self.scheduler.set_policy(policy, loop.time()):
            _release(item)
        self._arm(loop)

    def close(self) -> None:
        """Release everything held (the policy is gone) and stop the timer."""
        for item in list(self.scheduler.waiting()):
            self.scheduler.cancel(item)
            _release(item)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._when = None

    def snapshot(self) -> list[dict[str, Any]]:
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            now = self.scheduler.now
        return self.scheduler.snapshot(now)


def _release(item: Item) -> None:
    fut = item.payload[0] if item.payload is not None else None
    if fut is not None and not fut.done():
        fut.set_result(None)
