"""iSCSI sessions end to end: pytarget's own asyncio initiator against a live `pytarget serve`
on an ephemeral loopback port (discovery, login/logout, many sessions, digests, reinstatement,
task management, large multi-R2T writes)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytarget.initiator.client import (
    ConnectionLost,
    Initiator,
    LoginFailedError,
    TaskAborted,
    rw_cdb,
)
from pytarget.iscsi.pdu import TmfFunction, TmfResponse

from ..conftest import (
    INITIATOR1,
    INITIATOR2,
    TARGET_IQN,
    LiveTarget,
    run,
    start_target,
    until,
    write_config,
)

BLOCK = 512
UNIT_ATTENTION = 0x6


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("sessions")
    live = start_target(write_config(directory, luns=[
        {"id": 0, "path": "lun0.img", "size": "64MiB"},
        {"id": 1, "path": "lun1.img", "size": "16MiB"},
    ]))
    yield live
    live.stop()


async def session(live: LiveTarget, initiator: str = INITIATOR1, **options: Any) -> Initiator:
    ini = await Initiator.connect(live.host, live.port)
    await ini.login(live.iqn, initiator_name=initiator, **options)
    result = await ini.clear_unit_attentions(0)
    assert result.good, result
    return ini


def within(live: LiveTarget, body: Callable[[], Awaitable[None]]) -> None:
    try:
        run(body())
    except BaseException:
        print(live.log_text()[-4000:])
        raise


# ---------------------------------------------------------------------------------- sessions
def test_discovery(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await Initiator.connect(target.host, target.port)
        found = await ini.discover()
        assert found == {TARGET_IQN: [f"{target.host}:{target.port},1"]}
        assert (await ini.logout()).response == 0
        await ini.wait_closed()
        await ini.close()
    within(target, body)


def test_login_and_logout(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await Initiator.connect(target.host, target.port)
        done = await ini.login(target.iqn, initiator_name=INITIATOR1)
        assert done.tsih != 0 and done.unanswered == ()
        assert done.params.target_portal_group_tag == 1
        assert await ini.nop(b"are you there") == b"are you there"
        assert (await ini.text([("SendTargets", "")])) == [
            ("TargetName", TARGET_IQN), ("TargetAddress", f"{target.host}:{target.port},1")]
        logout = await ini.logout()
        assert logout.response == 0
        await ini.wait_closed()
        assert ini.closed
        await ini.close()
    within(target, body)


def test_login_to_an_unknown_target(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await Initiator.connect(target.host, target.port)
        with pytest.raises(LoginFailedError) as info:
            await ini.login("iqn.2026-11.io.pytarget:nonesuch", initiator_name=INITIATOR1)
        assert info.value.status == 0x0203
        await ini.close()
    within(target, body)


def test_many_sessions_at_once(target: LiveTarget) -> None:
    async def one(n: int) -> None:
        ini = await session(target, f"{INITIATOR1}-{n}")
        data = os.urandom(64 * BLOCK)
        assert (await ini.write(0, 1000 + n * 64, data)).good
        assert (await ini.read(0, 1000 + n * 64, 64)).data == data
        assert (await ini.logout()).response == 0
        await ini.close()

    async def body() -> None:
        await asyncio.gather(*(one(n) for n in range(24)))
    within(target, body)


@pytest.mark.parametrize("header_digest,data_digest", [(True, True), (True, False),
                                                       (False, True)])
def test_digests(target: LiveTarget, header_digest: bool, data_digest: bool) -> None:
    async def body() -> None:
        ini = await session(target, header_digest=header_digest, data_digest=data_digest,
                            MaxBurstLength=131072, FirstBurstLength=65536)
        params = ini.login_event.params if ini.login_event else None
        assert params is not None
        assert (params.header_digest, params.data_digest) == (header_digest, data_digest)
        data = os.urandom(1 << 20)
        assert (await ini.write(0, 4096, data)).good
        assert (await ini.read(0, 4096, len(data) // BLOCK)).data == data
        assert await ini.nop(b"digest") == b"digest"
        await ini.logout()
        await ini.close()
    within(target, body)


def test_session_reinstatement_closes_the_old_connection(target: LiveTarget) -> None:
    isid = bytes.fromhex("80123456789a")

    async def body() -> None:
        old = await session(target, isid=isid)
        old_tsih = old.login_event.tsih if old.login_event else 0
        new = await session(target, isid=isid)
        await old.wait_closed(timeout=10)
        assert old.closed
        with pytest.raises(ConnectionLost):
            await old.nop()
        assert new.login_event is not None and new.login_event.tsih != old_tsih
        assert await new.nop(b"still here") == b"still here"
        other = await session(target, isid=bytes.fromhex("80123456789b"))
        assert await new.nop() == b"" and await other.nop() == b""  # another ISID coexists
        for ini in (new, other):
            await ini.logout()
            await ini.close()
        await old.close()
    within(target, body)


def test_pipelined_commands_beyond_the_window(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await session(target)
        assert (await ini.clear_unit_attentions(1)).good
        data = os.urandom(512 * BLOCK)
        assert (await ini.write(1, 0, data)).good
        results = await asyncio.gather(*(ini.read(1, n, 1) for n in range(512)))
        assert b"".join(r.data for r in results) == data
        assert all(r.good for r in results)
        await ini.logout()
        await ini.close()
    within(target, body)


# ---------------------------------------------------------------------------------- data
@pytest.mark.parametrize("keys,r2ts", [
    ({"InitialR2T": True, "ImmediateData": False, "MaxBurstLength": 65536,
      "MaxOutstandingR2T": 4}, 64),
    ({"InitialR2T": False, "ImmediateData": True, "MaxBurstLength": 262144,
      "FirstBurstLength": 65536, "MaxOutstandingR2T": 1}, 16),
    ({"InitialR2T": False, "ImmediateData": False, "MaxBurstLength": 16384,
      "FirstBurstLength": 8192, "MaxRecvDataSegmentLength": 4096}, 256),
])
def test_large_multi_r2t_writes_read_back(target: LiveTarget, keys: dict[str, Any],
                                          r2ts: int) -> None:
    async def body() -> None:
        ini = await session(target, **keys)
        params = ini.login_event.params if ini.login_event else None
        assert params is not None and params.initial_r2t == keys["InitialR2T"]
        data = os.urandom(4 << 20)
        lba = 16384
        written = await ini.write(0, lba, data)
        assert written.good and written.r2ts == r2ts
        back = await ini.read(0, lba, len(data) // BLOCK)
        assert back.good and back.data == data
        chunks = [os.urandom(256 * 1024) for _ in range(8)]
        writes = await asyncio.gather(*(ini.write(0, 32768 + n * 512, c)
                                        for n, c in enumerate(chunks)))
        assert all(w.good for w in writes)
        reads = await asyncio.gather(*(ini.read(0, 32768 + n * 512, 512) for n in range(8)))
        assert [r.data for r in reads] == chunks
        await ini.logout()
        await ini.close()
    within(target, body)


def test_residuals(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await session(target)
        short = await ini.command(0, rw_cdb(False, 0, 8), read_length=16 * BLOCK)
        assert short.good and short.underflow and short.residual == 8 * BLOCK
        assert len(short.data) == 8 * BLOCK
        long = await ini.command(0, rw_cdb(False, 0, 8), read_length=4 * BLOCK)
        assert long.overflow and long.residual == 4 * BLOCK
        await ini.logout()
        await ini.close()
    within(target, body)


def test_check_condition_sense(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await session(target)
        beyond = await ini.read(0, (64 << 20) // BLOCK, 1)
        assert beyond.status == 0x02 and beyond.sense_key == 0x5
        assert (beyond.asc, beyond.ascq) == (0x21, 0x00)  # LBA OUT OF RANGE
        await ini.logout()
        await ini.close()
    within(target, body)


# ---------------------------------------------------------------------------------- TMF
def test_abort_task(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await session(target, InitialR2T=True, ImmediateData=False)
        itt, pending = ini.submit(0, rw_cdb(True, 0, 64), os.urandom(64 * BLOCK),
                                  manual_r2t=True)
        for _ in range(100):  # the write waits for the Data-Out its R2T asked for
            if ini.r2ts.get(itt):
                break
            await asyncio.sleep(0.01)
        assert ini.r2ts.get(itt)
        assert await ini.tmf(TmfFunction.ABORT_TASK, 0, itt) == TmfResponse.FUNCTION_COMPLETE
        with pytest.raises(TaskAborted):
            await pending
        assert await ini.tmf(TmfFunction.ABORT_TASK, 0, 0x12345) == \
            TmfResponse.TASK_DOES_NOT_EXIST
        assert (await ini.test_unit_ready(0)).good
        await ini.logout()
        await ini.close()
    within(target, body)


def test_lun_reset(target: LiveTarget) -> None:
    async def body() -> None:
        issuer = await session(target, INITIATOR1)
        bystander = await session(target, INITIATOR2)
        assert (await issuer.clear_unit_attentions(1)).good
        assert (await bystander.clear_unit_attentions(1)).good
        assert await issuer.tmf(TmfFunction.LOGICAL_UNIT_RESET, 1) == \
            TmfResponse.FUNCTION_COMPLETE
        seen = await bystander.test_unit_ready(1)
        assert seen.sense_key == UNIT_ATTENTION and seen.asc == 0x29  # reset occurred
        assert (await bystander.test_unit_ready(1)).good
        assert (await bystander.test_unit_ready(0)).good  # other LUNs are untouched
        assert await issuer.tmf(TmfFunction.LOGICAL_UNIT_RESET, 7) == \
            TmfResponse.LUN_DOES_NOT_EXIST
        for ini in (issuer, bystander):
            await ini.logout()
            await ini.close()
    within(target, body)


# ---------------------------------------------------------------------------------- keep-alive
def test_target_pings_idle_connections(tmp_path: Path) -> None:
    live = start_target(write_config(tmp_path), "--nop-interval", "0.2")

    async def body() -> None:
        ini = await session(live)
        await until(lambda: ini.pings >= 2 or ini.closed, "two pings")
        assert ini.pings >= 2 and not ini.closed
        assert await ini.nop(b"awake") == b"awake"
        await ini.logout()
        await ini.close()
    try:
        within(live, body)
    finally:
        live.stop()
