"""Live reconfiguration of a running `pytarget serve` (`pytarget reload` and SIGHUP) while a
session of pytarget's own initiator keeps doing I/O.

Unit attentions are what a real initiator retries (SAM-5 5.14): the I/O loop records each one
and sends the command again; any other failure, a wrong byte read back or a lost connection
fails the test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytarget.initiator.client import CommandResult, Initiator

from ..conftest import INITIATOR1, TARGET_IQN, LiveTarget, child_env, start_target, write_config

BS = 512
MiB = 1 << 20
UNIT_ATTENTION = 0x6
REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
CAPACITY_CHANGED = (0x2A, 0x09)


def cli_env() -> dict[str, str]:
    return child_env()


async def pytarget(*args: str) -> tuple[int, str]:
    """Run the pytarget command line without blocking the event loop; (status, output)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytarget", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=cli_env())
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def set_luns(config: Path, luns: list[dict[str, Any]], **extra: Any) -> None:
    doc = yaml.safe_load(config.read_text())
    doc["targets"][0]["luns"] = luns
    doc.update(extra)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def report_luns_cdb() -> bytes:
    return bytes((0xA0, 0, 0, 0, 0, 0)) + (4096).to_bytes(4, "big") + bytes(2)


async def report_luns(ini: Initiator, lun: int = 0) -> list[int]:
    data = (await ini.command(lun, report_luns_cdb(), read_length=4096)).check().data
    length = struct.unpack_from(">I", data)[0]
    return sorted(data[8 + i + 1] | ((data[8 + i] & 0x3F) << 8) for i in range(0, length, 8))


async def capacity(ini: Initiator, lun: int) -> int:
    cdb = bytes((0x9E, 0x10)) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)
    data = (await ini.command(lun, cdb, read_length=32)).check().data
    last, block = struct.unpack_from(">QI", data)
    return (last + 1) * block


class IoLoop:
    """Write, read back and compare 8 blocks at a time on one LUN until stopped."""

    def __init__(self, ini: Initiator, lun: int) -> None:
        self.ini = ini
        self.lun = lun
        self.rounds = 0
        self.unit_attentions: list[tuple[int, int]] = []
        self.failures: list[str] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _command(self, make: Any) -> CommandResult:
        for _ in range(16):
            result: CommandResult = await make()
            if result.sense_key != UNIT_ATTENTION:
                return result
            self.unit_attentions.append((result.asc or 0, result.ascq or 0))
        return result

    async def run(self) -> None:
        lba = 0
        try:
            while not self.stop.is_set():
                data = os.urandom(8 * BS)
                wrote = await self._command(partial(self.ini.write, self.lun, lba, data))
                if not wrote.good:
                    self.failures.append(f"WRITE at {lba}: {wrote.sense_triplet}")
                read = await self._command(partial(self.ini.read, self.lun, lba, 8))
                if not read.good:
                    self.failures.append(f"READ at {lba}: {read.sense_triplet}")
                elif read.data != data:
                    self.failures.append(f"data read back at LBA {lba} differs")
                self.rounds += 1
                lba = (lba + 8) % 65536
        except Exception as exc:  # a lost session or protocol error fails the test
            self.failures.append(repr(exc))

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def rounds_past(self, n: int, timeout: float = 30.0) -> None:
        goal = self.rounds + n
        deadline = asyncio.get_running_loop().time() + timeout
        while self.rounds < goal:
            assert not self.failures, self.failures
            assert asyncio.get_running_loop().time() < deadline, "I/O loop stalled"
            await asyncio.sleep(0.01)

    async def finish(self) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task
        assert not self.failures, self.failures


async def session(target: LiveTarget, luns: tuple[int, ...]) -> Initiator:
    ini = await Initiator.connect(target.host, target.port)
    await ini.login(TARGET_IQN, initiator_name=INITIATOR1)
    for lun in luns:
        await ini.clear_unit_attentions(lun)
    return ini


@pytest.fixture
def two_lun_target(tmp_path: Path) -> Iterator[LiveTarget]:
    target = start_target(write_config(tmp_path, luns=[
        {"id": 0, "path": "lun0.img", "size": "64MiB"},
        {"id": 2, "path": "lun2.img", "size": "16MiB"}]))
    yield target
    target.stop()


def test_reload_adds_and_removes_a_lun_during_io(two_lun_target: LiveTarget) -> None:
    """Acceptance: `pytarget reload` adds LUN 1 and removes LUN 2 while LUN 0 does I/O; the
    session sees REPORTED LUNS DATA HAS CHANGED, REPORT LUNS changes, and no I/O on LUN 0 fails.
    Then SIGHUP brings LUN 2 back the same way."""
    target = two_lun_target
    config = target.config

    async def go() -> None:
        ini = await session(target, (0, 2))
        assert await report_luns(ini) == [0, 2]
        io = IoLoop(ini, 0)
        io.start()
        await io.rounds_past(20)

        set_luns(config, [{"id": 0, "path": "lun0.img", "size": "64MiB"},
                          {"id": 1, "path": "lun1.img", "size": "32MiB"}])
        status, out = await pytarget("reload", "--config", str(config))
        assert status == 0, out
        assert f"target {TARGET_IQN} LUN 1 added" in out and f"{TARGET_IQN} LUN 2 removed" in out
        await io.rounds_past(20)
        assert REPORTED_LUNS_CHANGED in io.unit_attentions, io.unit_attentions
        assert await report_luns(ini) == [0, 1]
        gone = await ini.test_unit_ready(2)
        assert gone.sense_triplet == (0x5, 0x25, 0x00)  # LOGICAL UNIT NOT SUPPORTED
        (await ini.clear_unit_attentions(1)).check()
        payload = os.urandom(16 * BS)
        (await ini.write(1, 100, payload)).check()
        assert (await ini.read(1, 100, 16)).check().data == payload
        assert await capacity(ini, 1) == 32 * MiB
        assert (config.parent / "lun1.img").stat().st_size == 32 * MiB

        seen = len(io.unit_attentions)
        set_luns(config, [{"id": 0, "path": "lun0.img", "size": "64MiB"},
                          {"id": 1, "path": "lun1.img", "size": "32MiB"},
                          {"id": 2, "path": "lun2.img", "size": "16MiB"}])
        target.process.send_signal(signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 20
        while REPORTED_LUNS_CHANGED not in io.unit_attentions[seen:]:
            assert asyncio.get_running_loop().time() < deadline, "no unit attention after SIGHUP"
            await asyncio.sleep(0.02)
        await io.rounds_past(10)
        await io.finish()
        assert await report_luns(ini) == [0, 1, 2]
        assert io.rounds > 50
        await ini.logout()
        await ini.close()

    asyncio.run(go())
    log = target.log_text()
    assert "reload: target iqn.2026-11.io.pytarget:test LUN 2 added" in log
    assert "Traceback" not in log


def test_invalid_configuration_is_refused_whole(two_lun_target: LiveTarget) -> None:
    """A new LUN next to an unknown key: nothing is applied, the file is not created, the
    session goes on, and `pytarget reload` says why with exit status 1."""
    target = two_lun_target
    config = target.config
    good = config.read_text()

    async def go() -> None:
        ini = await session(target, (0, 2))
        set_luns(config, [{"id": 0, "path": "lun0.img", "size": "64MiB"},
                          {"id": 3, "path": "lun3.img", "size": "8MiB"}], bogus=1)
        status, out = await pytarget("reload", "--config", str(config))
        assert status == 1
        assert "reload refused, the running configuration stays" in out
        assert "bogus: unknown key" in out
        # a LUN that would shrink is refused in the same way
        config.write_text(good)
        set_luns(config, [{"id": 0, "path": "lun0.img", "size": "32MiB"},
                          {"id": 3, "path": "lun3.img", "size": "8MiB"}])
        status, out = await pytarget("reload", "--config", str(config))
        assert status == 1 and "LUNs never shrink" in out, out
        assert not (config.parent / "lun3.img").exists()
        assert await report_luns(ini) == [0, 2]
        (await ini.test_unit_ready(0)).check()
        (await ini.test_unit_ready(2)).check()
        config.write_text(good)
        status, out = await pytarget("reload", "--config", str(config))
        assert status == 0 and "no changes" in out, out
        await ini.logout()
        await ini.close()

    asyncio.run(go())
    assert target.log_text().count("reload refused") == 2


def test_refused_during_prepare_rolls_back(two_lun_target: LiveTarget, tmp_path: Path) -> None:
    """A portal that cannot be bound is only found out while preparing: the backing file
    made for the new LUN in the same reload is removed again and nothing else changes."""
    import socket

    target = two_lun_target
    config = target.config
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        set_luns(config, [{"id": 0, "path": "lun0.img", "size": "64MiB"},
                          {"id": 2, "path": "lun2.img", "size": "16MiB"},
                          {"id": 5, "path": "lun5.img", "size": "8MiB"}],
                 portals=["127.0.0.1:0", f"127.0.0.1:{port}"])
        status, out = asyncio.run(pytarget("reload", "--config", str(config)))
    assert status == 1 and "reload refused" in out, out
    assert not (tmp_path / "lun5.img").exists()
    status, out = asyncio.run(pytarget("status", "--json", "--config", str(config)))
    assert status == 0, out
    assert '"lun": 5' not in out and len(yaml.safe_load(out)["portals"]) == 1


def test_grow_lun_gives_capacity_data_has_changed(two_lun_target: LiveTarget) -> None:
    """Raising a LUN's size grows its backing file at the reload (starting never resizes)."""
    target = two_lun_target
    config = target.config
    image = config.parent / "lun2.img"

    async def go() -> None:
        ini = await session(target, (0, 2))
        assert await capacity(ini, 2) == 16 * MiB
        status, out = await pytarget("lun", "resize", "2", "--size", "48MiB", "--config",
                                     str(config))
        assert status == 0, out
        assert "LUN 2 grown from 16MiB to 48MiB" in out
        assert image.stat().st_size == 48 * MiB
        result = await ini.test_unit_ready(2)
        assert result.sense_triplet == (UNIT_ATTENTION, *CAPACITY_CHANGED)
        assert await capacity(ini, 2) == 48 * MiB
        (await ini.write(2, 48 * MiB // BS - 8, bytes(range(256)) * 16)).check()
        await ini.logout()
        await ini.close()

    asyncio.run(go())


def test_portals_target_and_acl_changes(tmp_path: Path) -> None:
    """A second portal comes and goes (its open sessions stay); a second target is added and
    removed (its session ends, the first target's does not); an ACL edit keeps the logged-in
    session and masks its LUN at once, with REPORTED LUNS DATA HAS CHANGED."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port2 = probe.getsockname()[1]
    config = write_config(tmp_path, luns=[{"id": 0, "path": "a.img", "size": "8MiB"},
                                          {"id": 1, "path": "b.img", "size": "8MiB"}])
    target = start_target(config)
    other = "iqn.2026-11.io.pytarget:other"
    try:
        async def go() -> None:
            first = await session(target, (0, 1))
            doc = yaml.safe_load(config.read_text())
            doc["portals"].append(f"127.0.0.1:{port2}")
            doc["targets"].append({"name": other, "luns": [
                {"id": 0, "path": "c.img", "size": "8MiB"}]})
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            status, out = await pytarget("reload", "--config", str(config))
            assert status == 0, out
            assert f"portal 127.0.0.1:{port2} added" in out and f"target {other} added" in out
            second = await Initiator.connect("127.0.0.1", port2)
            await second.login(other, initiator_name=INITIATOR1)
            (await second.clear_unit_attentions(0)).check()
            disc = await Initiator.connect("127.0.0.1", port2)
            found = await disc.discover()
            assert set(found) == {TARGET_IQN, other}
            assert f"127.0.0.1:{port2},1" in found[other]
            await disc.close()

            doc["portals"] = doc["portals"][:1]
            doc["targets"] = doc["targets"][:1]
            doc["targets"][0]["acl"] = [{"initiator": INITIATOR1, "luns": [0]}]
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            status, out = await pytarget("reload", "--config", str(config))
            assert status == 0, out
            assert f"target {other} removed (1 session(s) ended)" in out
            assert f"portal 127.0.0.1:{port2} removed" in out
            assert "acl changed" in out
            await second.wait_closed(10)
            with pytest.raises(OSError):
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port2), 5)
            ua = await first.test_unit_ready(0)
            assert ua.sense_triplet == (UNIT_ATTENTION, *REPORTED_LUNS_CHANGED)
            assert await report_luns(first) == [0]
            (await first.test_unit_ready(0)).check()
            assert (await first.test_unit_ready(1)).sense_triplet == (0x5, 0x25, 0x00)
            await first.logout()
            await first.close()

        asyncio.run(go())
    finally:
        target.stop()


def test_chap_change_applies_to_new_logins(tmp_path: Path) -> None:
    """A new CHAP secret: the logged-in session keeps working, a login with the old secret is
    refused, one with the new secret succeeds; the log never shows either secret."""
    from pytarget.initiator.chap import ChapAuthenticator
    from pytarget.initiator.client import LoginFailedError

    old, new = "first-s3cret-value", "second-s3cret-value"
    config = write_config(tmp_path, targets=[{
        "name": TARGET_IQN, "auth": {"chap": {"user": "host", "secret": old}},
        "luns": [{"id": 0, "path": "lun0.img", "size": "8MiB"}]}])
    target = start_target(config)
    try:
        async def login(secret: str) -> Initiator:
            ini = await Initiator.connect(target.host, target.port)
            await ini.login(TARGET_IQN, initiator_name=INITIATOR1,
                            authenticator=ChapAuthenticator("host", secret))
            return ini

        async def go() -> None:
            first = await login(old)
            await first.clear_unit_attentions(0)
            doc = yaml.safe_load(config.read_text())
            doc["targets"][0]["auth"]["chap"]["secret"] = new
            config.write_text(yaml.safe_dump(doc, sort_keys=False))
            status, out = await pytarget("reload", "--config", str(config))
            assert status == 0, out
            assert f"target {TARGET_IQN}: auth changed" in out
            assert old not in out and new not in out
            (await first.test_unit_ready(0)).check()
            with pytest.raises(LoginFailedError) as failed:
                await login(old)
            assert failed.value.status == 0x0201
            second = await login(new)
            (await second.clear_unit_attentions(0)).check()
            for ini in (first, second):
                await ini.logout()
                await ini.close()

        asyncio.run(go())
    finally:
        target.stop()
    assert old not in target.log_text() and new not in target.log_text()


def test_busy_poll_window_changes_at_reload(live_target: LiveTarget) -> None:
    config = live_target.config
    doc = yaml.safe_load(config.read_text())
    doc["busy_poll_us"] = 0
    config.write_text(yaml.safe_dump(doc, sort_keys=False))

    async def go() -> None:
        status, out = await pytarget("reload", "--config", str(config))
        assert status == 0 and "busy polling window now 0 µs" in out, out
        ini = await Initiator.connect(live_target.host, live_target.port)
        await ini.login(live_target.iqn, initiator_name=INITIATOR1)
        await ini.clear_unit_attentions(0)
        data = os.urandom(64 * 1024)
        (await ini.write(0, 0, data, block_size=BS)).check()
        assert (await ini.read(0, 0, len(data) // BS, BS)).check().data == data
        await ini.logout()
        await ini.close()

    asyncio.run(go())
