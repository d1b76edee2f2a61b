"""SANITIZE (SBC-4 4.11, 5.30): OVERWRITE and BLOCK ERASE of the whole medium, EXIT FAILURE MODE,
and the sanitize state of a logical unit, which outlives commands, resets and restarts.

A sanitize operation belongs to the logical unit, not to the command that started it: it runs as
a task of its own under an exclusive range lock over the whole medium (every other writer and
reader waits, ROD tokens over the medium are invalidated like for any write), and neither ABORT
TASK, a LOGICAL UNIT RESET, a target reset nor the loss of the I_T nexus stops it (SBC-4 4.11.3).
With IMMED=0 the command waits for it and returns its outcome; with IMMED=1 it returns at once.
While it runs, every command but INQUIRY, REPORT LUNS and REQUEST SENSE ends with NOT READY,
SANITIZE IN PROGRESS and the progress indication (REQUEST SENSE returns the same).

A sanitize that fails, or is interrupted by the target stopping, leaves the unit in failure mode
(SBC-4 4.11.4): commands that access the medium end with MEDIUM ERROR, SANITIZE COMMAND FAILED
until a sanitize completes or EXIT FAILURE MODE is accepted (only after a sanitize requested with
AUSE=1). The state is kept in a small JSON file next to the backing file, written before the
operation starts and removed when it completes, so a restart knows.

OVERWRITE writes the initialization pattern (repeated to fill each block, inverted on every
other pass with INVERT) OVERWRITE COUNT times over every block, each pass made durable. BLOCK
ERASE deallocates every block of a thin LUN whose deallocated blocks read as zeros (reads return
zeros, GET LBA STATUS reports deallocated) and zeroes a fully provisioned LUN in place;
reads after it succeed (WABEREQ 01b, VPD B1h). CRYPTOGRAPHIC ERASE has no meaning for a backstore
that keeps no key, and is rejected as an unsupported service action.

`sanitize_rate` (bytes per second, 0: unlimited) paces OVERWRITE, so a sanitize does not take
the whole disk from the other LUNs on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..core import sense as S
from ..core.cdb import be16
from ..core.sense import SenseError
from ..core.table import SanitizeAction
from ..core.unit import UnitGeometry

if TYPE_CHECKING:
    from ..backstore.base import Backstore, Capabilities
    from ..core.locks import RangeLock
    from ..core.table import Cdb
    from ..core.task import ScsiTask

log = logging.getLogger("pytarget.scsi")

RECOMMENDED_TIMEOUT = 24 * 3600  # seconds (REPORT SUPPORTED OPERATION CODES, RCTD)
CHUNK_BYTES = 1 << 20


class LogicalUnit(UnitGeometry, Protocol):
    """What a sanitize needs of its logical unit (`scsi.device.LogicalUnit` implements it)."""

    @property
    def thin(self) -> bool: ...
    @property
    def caps(self) -> Capabilities: ...
    @property
    def backstore(self) -> Backstore | None: ...
    @property
    def ranges(self) -> RangeLock: ...
    @property
    def sanitize(self) -> SanitizeState: ...

    async def flush(self) -> None: ...
    def io_error(self, exc: OSError, lba: int | None, write: bool) -> SenseError: ...


@dataclass(frozen=True)
class Overwrite:
    """The OVERWRITE parameter list (SBC-4 5.30.3)."""

    pattern: bytes
    count: int
    invert: bool

    def block(self, block_size: int, inverted: bool) -> bytes:
        """One logical block of the pattern, repeated to fill it."""
        reps = -(-block_size // len(self.pattern))
        block = np.tile(np.frombuffer(self.pattern, dtype=np.uint8), reps)[:block_size]
        return (~block if inverted else block).tobytes()


@dataclass(frozen=True)
class BlockErase:
    pass


def parse_overwrite(data: bytes, block_size: int) -> Overwrite:
    """INVERT, TEST, OVERWRITE COUNT and the INITIALIZATION PATTERN (SBC-4 table 105)."""
    invert = bool(data[0] & 0x80)
    test = (data[0] >> 5) & 0x03
    count = data[0] & 0x1F
    length = be16(data, 2)
    if test:
        raise S.invalid_field_in_parameter_list(0, 6)  # vendor-specific tests: none
    if count == 0:
        raise S.invalid_field_in_parameter_list(0, 4)
    if length == 0 or length > block_size or length + 4 != len(data):
        raise S.invalid_field_in_parameter_list(2, 7)
    return Overwrite(bytes(data[4:4 + length]), count, invert)


class SanitizeRun:
    """One sanitize operation in progress: how far it is, and its outcome when it ends."""

    def __init__(self, total: int) -> None:
        self.done = 0
        self.total = total
        self.finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.runner: asyncio.Task[None] | None = None


class SanitizeState:
    """The sanitize state of one logical unit: idle, a run in progress, or failure mode."""

    def __init__(self, path: str | None, rate: int = 0) -> None:
        self.path = path
        self.rate = rate
        self.run: SanitizeRun | None = None
        self.failed = False
        self.ause = False
        self.active = False  # a run in progress or failure mode: `_admit` looks further
        self.completed = 0  # operations that completed since start, for status
        if path is not None:
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("sanitize state %s unreadable (%s): failure mode", path, exc)
            doc = {}
        # In progress when the target stopped: the operation was interrupted (SBC-4 4.11.4).
        self.failed = True
        self.ause = bool(doc.get("ause", False))
        self.active = True
        log.warning("sanitize state %s: %s sanitize was %s; the LUN is in failure mode", path,
                    doc.get("service_action", "a"), doc.get("state", "interrupted"))

    def _save(self, state: str | None, action: str = "") -> None:
        if self.path is None:
            return
        if state is None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"state": state, "service_action": action, "ause": self.ause}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def in_progress(self) -> SenseError:
        run = self.run
        assert run is not None
        return S.sanitize_in_progress(run.done, run.total)

    def blocks(self, during_sanitize: bool, medium: bool, sanitize: bool) -> SenseError | None:
        """What a command meets: SANITIZE IN PROGRESS unless it runs during one; in failure
        mode, SANITIZE COMMAND FAILED for medium access other than a new SANITIZE."""
        if self.run is not None:
            return None if during_sanitize else self.in_progress()
        if self.failed and medium and not sanitize:
            return S.sanitize_failed()
        return None

    def request_sense(self) -> SenseError | None:
        """REQUEST SENSE's answer while a sanitize runs or failed (SBC-4 4.11.3, 4.11.4)."""
        if self.run is not None:
            return self.in_progress()
        if self.failed:
            return S.sanitize_failed()
        return None

    def describe(self) -> dict[str, Any]:
        """For `pytarget status`."""
        run = self.run
        if run is not None:
            return {"state": "running", "progress": run.done / run.total if run.total else 0.0}
        return {"state": "failed" if self.failed else "idle", "completed": self.completed}

    def exit_failure_mode(self) -> None:
        """EXIT FAILURE MODE: allowed only when the failed sanitize was requested with AUSE=1
        (SBC-4 5.30.2); GOOD and nothing to do when no sanitize failed."""
        if not self.failed:
            return
        if not self.ause:
            raise S.invalid_field_in_cdb(1, 4)
        self.failed = self.active = False
        self._save(None)
        log.info("sanitize failure mode exited")

    def start(self, lu: LogicalUnit, job: Overwrite | BlockErase, ause: bool) -> SanitizeRun:
        nbytes = lu.nblocks * lu.block_size
        run = SanitizeRun(nbytes * job.count if isinstance(job, Overwrite) else nbytes)
        action = "OVERWRITE" if isinstance(job, Overwrite) else "BLOCK ERASE"
        self.ause = ause
        self._save("in-progress", action)
        self.run = run
        self.active = True
        log.info("LUN %d: SANITIZE %s started", lu.lun, action,
                 extra={"event": "sanitize", "operation": action, "lun": lu.lun})
        run.runner = asyncio.get_running_loop().create_task(self._operate(lu, run, job, action))
        return run

    async def _operate(self, lu: LogicalUnit, run: SanitizeRun, job: Overwrite | BlockErase,
                       action: str) -> None:
        ok = interrupted = False
        try:
            async with lu.ranges.exclusive(0, lu.nblocks):
                if isinstance(job, Overwrite):
                    await self._overwrite(lu, run, job)
                else:
                    await _block_erase(lu, run)
            ok = True
        except asyncio.CancelledError:
            # The target is stopping: the file keeps saying "in-progress", so the restart
            # finds the operation interrupted.
            interrupted = True
            log.warning("LUN %d: SANITIZE %s interrupted", lu.lun, action)
            raise
        except Exception:
            log.exception("LUN %d: SANITIZE %s failed", lu.lun, action)
        finally:
            self.run = None
            self.failed = self.active = not ok
            try:
                if ok:
                    self.completed += 1
                    self._save(None)
                elif not interrupted:
                    self._save("failed", action)
            except OSError as exc:
                log.error("LUN %d: sanitize state %s: %s", lu.lun, self.path, exc)
            if ok:
                log.info("LUN %d: SANITIZE %s completed", lu.lun, action,
                         extra={"event": "sanitize", "operation": action, "lun": lu.lun})
            if not run.finished.done():
                run.finished.set_result(ok)

    def abandon(self) -> None:
        """The logical unit is closing: stop the operation where it is (it stays interrupted,
        failure mode after a restart)."""
        run = self.run
        if run is not None and run.runner is not None:
            run.runner.cancel()

    async def _overwrite(self, lu: LogicalUnit, run: SanitizeRun, job: Overwrite) -> None:
        backstore = lu.backstore
        assert backstore is not None
        bs = lu.block_size
        per_chunk = max(1, CHUNK_BYTES // bs)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n_pass in range(job.count):
            block = job.block(bs, inverted=job.invert and n_pass % 2 == 1)
            chunk = memoryview(np.tile(np.frombuffer(block, dtype=np.uint8),
                                       min(per_chunk, lu.nblocks)).tobytes())
            lba = 0
            while lba < lu.nblocks:
                n = min(per_chunk, lu.nblocks - lba)
                try:
                    await backstore.awrite(chunk[:n * bs], lba * bs)
                except OSError as exc:
                    raise lu.io_error(exc, lba, write=True) from exc
                lba += n
                run.done += n * bs
                if self.rate:
                    ahead = run.done / self.rate - (loop.time() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            await lu.flush()


async def _block_erase(lu: LogicalUnit, run: SanitizeRun) -> None:
    backstore = lu.backstore
    assert backstore is not None
    nbytes = lu.nblocks * lu.block_size
    try:
        if lu.thin and lu.caps.deallocated_reads_zero:
            await backstore.adeallocate(0, nbytes)
        else:
            await backstore.azero(0, nbytes)
    except OSError as exc:
        raise lu.io_error(exc, 0, write=True) from exc
    run.done = nbytes
    await lu.flush()


async def sanitize(lu: LogicalUnit, task: ScsiTask, cdb: Cdb) -> None:
    """SANITIZE (SBC-4 5.30): start an operation on the whole medium; with IMMED=0, wait for it.

    The command that waits may be aborted (ABORT TASK, a reset, the connection lost): the
    operation carries on, and REQUEST SENSE or any other command tells how far it is.
    """
    immed = bool(cdb[1] & 0x80)
    ause = bool(cdb[1] & 0x20)
    action = cdb[1] & 0x1F
    length = cdb.parameter_list_length
    state = lu.sanitize
    job: Overwrite | BlockErase
    if action == SanitizeAction.EXIT_FAILURE_MODE:
        if length:
            raise S.invalid_field_in_cdb(7, 7)
        state.exit_failure_mode()
        return
    if action == SanitizeAction.BLOCK_ERASE:
        if length:
            raise S.invalid_field_in_cdb(7, 7)
        job = BlockErase()
    else:
        if length < 5 or length > lu.block_size + 4:
            raise S.invalid_field_in_cdb(7, 7)
        data = await task.receive_data_out(length)
        if len(data) < length:
            raise S.parameter_list_length_error()
        job = parse_overwrite(bytes(data), lu.block_size)
    if state.run is not None:  # another SANITIZE started while this one fetched its data
        raise state.in_progress()
    run = state.start(lu, job, ause)
    if immed:
        return
    if not await asyncio.shield(run.finished):
        raise S.sanitize_failed()
