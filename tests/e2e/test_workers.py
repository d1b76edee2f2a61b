"""A live target with `workers: 2`: consecutive new sessions land in different worker
processes (the status document names each session's worker pid), and the logical unit
behaves as one across them: a persistent reservation taken through one worker fences a write
through the other, a PREEMPT through the other reaches the first session's nexus as a unit
attention, ROD tokens made through one worker are used and cancelled through the other, COMPARE AND
WRITE stays atomic with counter sessions spread over both workers, and a reload and a
LOGICAL UNIT RESET reach every worker. libiscsi families run against it too."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytarget.initiator.client import Initiator

from ..caw_stress import run_stress
from ..conftest import (
    INITIATOR1,
    INITIATOR2,
    LiveTarget,
    child_env,
    run,
    start_target,
    write_config,
)
from ..libiscsi import ISCSI_TEST_CU, assert_clean, run_suite
from .test_odx import populate, write_using_token

RESERVATION_CONFLICT = 0x18
UNIT_ATTENTION = 0x06
PREEMPTED = (0x2A, 0x05)  # REGISTRATIONS PREEMPTED
RESET_OCCURRED = (0x29, 0x03)  # BUS DEVICE RESET FUNCTION OCCURRED
WRITE_EXCLUSIVE = 1
LOGICAL_UNIT_RESET = 5  # RFC 7143 11.5.1


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("workers")
    config = write_config(directory, luns=[
        {"id": 0, "path": "lun0.img", "size": "64MiB"},
        {"id": 1, "path": "lun1.img", "size": "64MiB"},
        {"id": 2, "path": "lun2.img", "size": "64MiB"},
        {"id": 4, "path": "lun4.img", "size": "64MiB"},  # MultipathIO's, never written before
    ], workers=2)
    target = start_target(config)
    try:
        yield target
    finally:
        assert target.stop() == 0, target.log_text()[-3000:]


def status(target: LiveTarget) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "pytarget", "status", "--json", "--config",
                          str(target.config)], capture_output=True, text=True, check=True,
                         env=child_env(), timeout=60)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def prout(sa: int, key: int, sa_key: int = 0, rtype: int = 0) -> tuple[bytes, bytes]:
    data = struct.pack(">QQ", key, sa_key) + bytes(8)
    return bytes((0x5F, sa, rtype, 0, 0)) + len(data).to_bytes(4, "big") + b"\0", data


def isid_of(n: int) -> bytes:
    return bytes([0x80, 0, 0, 0]) + n.to_bytes(2, "big")


async def login(target: LiveTarget, n: int, initiator: str) -> Initiator:
    ini = await Initiator.connect(target.host, target.port)
    await ini.login(target.iqn, initiator_name=initiator, isid=isid_of(n))
    for lun in range(3):
        await ini.clear_unit_attentions(lun)
    return ini


def test_sessions_land_in_different_workers_and_reservations_hold_across(
        workers: LiveTarget) -> None:
    async def go() -> None:
        a = await login(workers, 0, INITIATOR1)
        b = await login(workers, 1, INITIATOR2)
        try:
            doc = status(workers)
            assert len(set(doc["workers"])) == 2 and os.getpid() not in doc["workers"]
            by_isid = {s["isid"]: s["worker"] for s in doc["sessions"]}
            assert by_isid[isid_of(0).hex()] != by_isid[isid_of(1).hex()]
            assert doc["targets"][0]["sessions"] == 2
            text = subprocess.run([sys.executable, "-m", "pytarget", "status", "--config",
                                   str(workers.config)], capture_output=True, text=True,
                                  check=True, env=child_env(),
                                  timeout=60).stdout
            assert "WORKER" in text and all(str(pid) in text for pid in by_isid.values())

            # Write Exclusive through worker 0 fences the unregistered nexus on worker 1.
            (await a.command(0, *prout(0x00, 0, 0xA))).check()  # REGISTER key A
            (await a.command(0, *prout(0x01, 0xA, rtype=WRITE_EXCLUSIVE))).check()  # RESERVE
            fenced = await b.write(0, 8, b"b" * 512)
            assert fenced.status == RESERVATION_CONFLICT
            assert (await b.read(0, 8, 1)).good  # reads stay allowed under Write Exclusive
            assert (await a.write(0, 8, b"a" * 512)).good
            assert status(workers)["reservations"][0]["type"] is not None

            # PREEMPT through worker 1: the nexus on worker 0 is told and is fenced in turn.
            (await b.command(0, *prout(0x00, 0, 0xB))).check()
            (await b.command(0, *prout(0x04, 0xB, 0xA, WRITE_EXCLUSIVE))).check()
            told = await a.test_unit_ready(0)
            assert told.sense_key == UNIT_ATTENTION and (told.asc, told.ascq) == PREEMPTED
            assert (await a.write(0, 8, b"a" * 512)).status == RESERVATION_CONFLICT
            assert (await b.write(0, 8, b"b" * 512)).good
            assert (await a.read(0, 8, 1)).check().data == b"b" * 512

            # A LOGICAL UNIT RESET through worker 1 resets the unit for the nexus on worker 0.
            await b.tmf(LOGICAL_UNIT_RESET, 1)
            told = await a.test_unit_ready(1)
            assert told.sense_key == UNIT_ATTENTION and (told.asc, told.ascq) == RESET_OCCURRED
        finally:
            (await b.command(0, *prout(0x03, 0xB, rtype=WRITE_EXCLUSIVE))).check()  # CLEAR
            await a.close()
            await b.close()

    run(go(), timeout=120)


def test_sanitize_is_not_offered_by_workers(workers: LiveTarget) -> None:
    """Its in-progress state fences every command of the unit, and is not shared between the
    workers: the command does not exist there (and REPORT SUPPORTED OPERATION CODES says so)."""
    async def go() -> None:
        ini = await login(workers, 6, INITIATOR1)
        try:
            block_erase = bytes((0x48, 0x02)) + bytes(8)
            r = await ini.command(1, block_erase)
            assert (r.sense_key, r.asc, r.ascq) == (0x05, 0x20, 0x00)
            one = bytes((0xA3, 0x0C, 0x01, 0x48)) + bytes(2) + (512).to_bytes(4, "big") \
                + bytes(2)  # REPORT SUPPORTED OPERATION CODES, SANITIZE: not supported
            assert (await ini.command(1, one, read_length=512)).check().data[1] & 0x07 == 0x01
        finally:
            await ini.close()

    run(go())


def test_rod_tokens_work_across_workers(workers: LiveTarget) -> None:
    """POPULATE TOKEN through one worker, WRITE USING TOKEN through the other; a write through
    the other worker cancels a token the first one made (SBC-3 4.29.4)."""
    async def go() -> None:
        a = await login(workers, 4, INITIATOR1)
        b = await login(workers, 5, INITIATOR1)
        try:
            by_isid = {s["isid"]: s["worker"] for s in status(workers)["sessions"]}
            assert by_isid[isid_of(4).hex()] != by_isid[isid_of(5).hex()]
            data = os.urandom(64 * 512)
            (await a.write(0, 4000, data)).check()
            token = await populate(a, 0, 1, (4000, 64))
            (await write_using_token(b, 1, 2, token, (100, 64))).check()
            assert (await a.read(1, 100, 64)).check().data == data

            token = await populate(a, 0, 3, (6000, 16))
            (await b.write(0, 6008, b"\x01" * 512)).check()
            cancelled = await write_using_token(a, 1, 4, token, (200, 16))
            assert (cancelled.sense_key, cancelled.asc, cancelled.ascq) == (0x05, 0x23, 0x08)
        finally:
            await a.close()
            await b.close()

    run(go(), timeout=120)


def test_compare_and_write_is_exact_across_workers(workers: LiveTarget) -> None:
    outcome = run_stress([workers], lun=2, sessions=8, loops=60, writers=2, writes=80,
                         caw_blocks=1)
    assert outcome.counter == outcome.expected == 480


def test_reload_reaches_every_worker(workers: LiveTarget) -> None:
    doc = yaml.safe_load(workers.config.read_text())
    doc["targets"][0]["luns"].append({"id": 3, "path": "lun3.img", "size": "16MiB"})
    workers.config.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "pytarget", "reload", "--config",
                          str(workers.config)], capture_output=True, text=True,
                         env=child_env(), timeout=60)
    assert out.returncode == 0, out.stderr

    async def go() -> None:
        sessions = [await login(workers, n, INITIATOR1) for n in (2, 3)]
        try:
            for ini in sessions:
                await ini.clear_unit_attentions(3)
                assert (await ini.read(3, 0, 1)).good
        finally:
            for ini in sessions:
                await ini.close()

    run(go())
    assert {lun["lun"] for lun in status(workers)["targets"][0]["luns"]} == {0, 1, 2, 3, 4}


@pytest.mark.libiscsi
@pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed")
@pytest.mark.parametrize("suite", ["PrinReadKeys", "PrinReportCapabilities", "ProutRegister",
                                   "ProutReserve", "ProutClear", "ProutPreempt", "Reserve6",
                                   "CompareAndWrite", "Read10", "Write10"])
def test_libiscsi_against_two_workers(workers: LiveTarget, suite: str) -> None:
    """Each suite's two initiators log in one after the other: one session per worker."""
    assert_clean(run_suite(suite, workers.url(1), INITIATOR1, INITIATOR2))


@pytest.mark.libiscsi
@pytest.mark.skipif(ISCSI_TEST_CU is None, reason="iscsi-test-cu (libiscsi-bin) not installed")
def test_libiscsi_multipath_across_workers(workers: LiveTarget) -> None:
    """MultipathIO (plain I/O, COMPARE AND WRITE, LOGICAL UNIT RESET) with its two paths in the
    two workers: the reset reaches the other worker's nexus, unlike two gateways without a
    shared store (tests/e2e/test_libiscsi_gateways.py)."""
    assert_clean(run_suite("MultipathIO", workers.url(4), INITIATOR1, INITIATOR2,
                           urls=[workers.url(4)]))


def test_workers_key_is_checked(tmp_path: Path) -> None:
    for value, key in ((0, "workers"), ("two", "workers"), (65, "workers")):
        config = write_config(tmp_path, workers=value)
        out = subprocess.run([sys.executable, "-m", "pytarget", "serve", "--config",
                              str(config)], capture_output=True, text=True, timeout=60,
                             env=child_env())
        assert out.returncode != 0 and key in out.stderr, out.stderr
    config = write_config(tmp_path, workers=2, metrics="127.0.0.1:0")
    out = subprocess.run([sys.executable, "-m", "pytarget", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60,
                         env=child_env())
    assert out.returncode != 0 and "metrics" in out.stderr, out.stderr


def test_single_worker_is_the_one_process(tmp_path: Path) -> None:
    target = start_target(write_config(tmp_path, workers=1))
    try:
        doc = status(target)
        assert doc["pid"] == target.process.pid and "workers" not in doc

        async def go() -> None:
            ini = await login(target, 0, INITIATOR1)
            try:
                assert (await ini.write(0, 0, b"z" * 512)).good
            finally:
                await ini.close()

        asyncio.run(go())
    finally:
        assert target.stop() == 0


def test_a_connection_that_does_not_log_in_is_closed(workers: LiveTarget) -> None:
    """The parent hands a first PDU that is not a Login Request to worker 0, which drops the
    connection as one process would; a connection stuck in its first header holds up no
    other login."""
    with socket.create_connection((workers.host, workers.port), timeout=30) as sock:
        sock.sendall(bytes([0x00, 0x80]) + bytes(46))  # a NOP-Out before any login
        assert sock.recv(1024) == b""

    async def go() -> None:
        _, writer = await asyncio.open_connection(workers.host, workers.port)
        ini = await Initiator.connect(workers.host, workers.port)
        try:
            writer.write(bytes([0x43]))  # a first byte of a login, then nothing more
            await writer.drain()
            await ini.login(workers.iqn, initiator_name=INITIATOR1, isid=isid_of(9))
            assert (await ini.test_unit_ready(0)).status is not None  # not held up by it
        finally:
            writer.close()
            await ini.close()

    run(go())
