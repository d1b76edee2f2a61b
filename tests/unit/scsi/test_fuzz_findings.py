"""Regression tests for what tools/fuzz found in the device server (docs/security.md)."""

from __future__ import annotations

from pathlib import Path

from pytarget.core.sense import Asc, SenseKey, Status

from .harness import make_lu, run


def test_request_sense_without_a_pending_condition(tmp_path: Path) -> None:
    """REQUEST SENSE read an attribute no logical unit has: HARDWARE ERROR instead of NO SENSE."""
    lu = make_lu(tmp_path)
    result = run(lu, bytes((0x03, 0, 0, 0, 252, 0)))
    assert result.status == Status.GOOD
    assert result.data[0] == 0x70 and result.data[2] & 0x0F == SenseKey.NO_SENSE


def test_request_sense_with_the_medium_removed(tmp_path: Path) -> None:
    lu = make_lu(tmp_path, removable=True)
    assert run(lu, bytes((0x1B, 0, 0, 0, 0x02, 0))).ok()  # eject
    result = run(lu, bytes((0x03, 0, 0, 0, 252, 0)))
    assert result.status == Status.GOOD and result.data[2] & 0x0F == SenseKey.NOT_READY
    assert (result.data[12] << 8 | result.data[13]) == Asc.MEDIUM_NOT_PRESENT


def test_range_lock_release_racing_a_cancelled_waiter() -> None:
    """A waiter cancelled (ABORT TASK, a dropped connection) just before the holder released:
    the release set the result of the cancelled future (InvalidStateError) after granting it,
    leaving a holder that never releases and a range locked for good."""
    import asyncio

    from pytarget.core.locks import RangeLock

    async def go() -> None:
        lock = RangeLock()
        holder = await lock.acquire(0, 8, exclusive=True)
        waiter = asyncio.ensure_future(lock.acquire(0, 8, exclusive=False))
        await asyncio.sleep(0)  # the waiter is queued
        waiter.cancel()  # its future is cancelled now; its handler runs later
        lock.release(holder)  # must not grant the cancelled request
        await asyncio.gather(waiter, return_exceptions=True)
        assert waiter.cancelled() and not lock.busy
        again = await asyncio.wait_for(lock.acquire(0, 8, exclusive=True), 1)
        lock.release(again)

    asyncio.run(go())
