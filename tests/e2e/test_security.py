"""Access control, CHAP and bounds over the wire, against a live `pytarget serve`: CHAP one-way,
mutual and for discovery (pytarget's initiator and libiscsi's URL form), access lists in
SendTargets, REPORT LUNS and commands, third-party copy naming a masked LUN, session limits, a
corrupted data digest, and the timers that cut off idle, trickling and non-reading peers.

No test here times the target: outcomes and the order of events are checked over the wire,
and how long each timer runs is unit-tested with time as an argument (tests/unit/iscsi)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import subprocess
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pytarget.assembly import lu_identity
from pytarget.initiator import pdus
from pytarget.initiator.chap import ChapAuthenticator
from pytarget.initiator.client import (
    CommandResult,
    ConnectionLost,
    Initiator,
    LoginFailedError,
    random_isid,
    rw_cdb,
)
from pytarget.iscsi import digest as dg
from pytarget.iscsi.auth import CHAP_MD5, CHAP_SHA256
from pytarget.iscsi.pdu import RejectReason

from ..conftest import (
    INITIATOR1,
    INITIATOR2,
    LiveTarget,
    run,
    start_target,
    until,
    write_config,
)
from ..libiscsi import ISCSI_TEST_CU, assert_clean, run_suite

T = TypeVar("T")
CHAP_T = "iqn.2026-11.io.pytarget:chap"  # mutual CHAP, INITIATOR1 only
ONEWAY_T = "iqn.2026-11.io.pytarget:oneway"  # one-way CHAP, for libiscsi
ACL_T = "iqn.2026-11.io.pytarget:acl"  # INITIATOR1: LUNs 0 and 1; INITIATOR2: LUN 1
PRIVATE_T = "iqn.2026-11.io.pytarget:private"  # INITIATOR1 only, one session
STRANGER = "iqn.2026-11.io.pytarget.test:stranger"
USER, SECRET = "alice", "alice-secret-1"
TUSER, TSECRET = "storage", "storage-secret-2"
DELAY = 0.3
BS = 512


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    directory: Path = tmp_path_factory.mktemp("security")
    chap = {"chap": {"user": USER, "secret": SECRET}}
    config = write_config(directory, targets=[
        {"name": CHAP_T, "luns": [{"id": 0, "path": "chap0.img", "size": "4MiB"}],
         "auth": {**chap, "mutual": {"user": TUSER, "secret": TSECRET}},
         "acl": [{"initiator": INITIATOR1}]},
        {"name": ONEWAY_T, "luns": [{"id": 0, "path": "oneway0.img", "size": "64MiB"}],
         "auth": chap},
        {"name": ACL_T, "luns": [{"id": 0, "path": "acl0.img", "size": "4MiB"},
                                 {"id": 1, "path": "acl1.img", "size": "4MiB"}],
         "acl": [{"initiator": INITIATOR1}, {"initiator": INITIATOR2, "luns": [1]}]},
        {"name": PRIVATE_T, "luns": [{"id": 0, "path": "private0.img", "size": "4MiB"}],
         "acl": [{"initiator": INITIATOR1}], "max_sessions": 1},
    ], discovery_auth=chap, limits={
        "auth_failure_delay": DELAY, "login_timeout": 3, "pdu_timeout": 1.5,
        "nop_interval": 1, "nop_timeout": 1, "send_timeout": 2, "output_high_water": "1MiB"})
    live = start_target(config)
    yield live
    live.stop()
    log = live.log_text()
    assert SECRET not in log and TSECRET not in log  # secrets are never logged


def within(live: LiveTarget, coro: Awaitable[T]) -> T:
    try:
        return run(coro)
    except BaseException:
        print(live.log_text()[-4000:])
        raise


def mutual(**options: Any) -> ChapAuthenticator:
    return ChapAuthenticator(USER, SECRET, target_user=TUSER, target_secret=TSECRET, **options)


async def login(live: LiveTarget, target: str | None, initiator: str = INITIATOR1,
                **options: Any) -> Initiator:
    ini = await Initiator.connect(live.host, live.port, timeout=10)
    try:
        await ini.login(target, initiator_name=initiator, **options)
    except BaseException:
        await ini.close()
        raise
    return ini


async def login_status(live: LiveTarget, target: str | None, initiator: str = INITIATOR1,
                       **options: Any) -> int:
    with pytest.raises(LoginFailedError) as info:
        await login(live, target, initiator, **options)
    return info.value.status


async def logged(live: LiveTarget, text: str, times: int = 1) -> None:
    """Until the target's log holds `text` `times` times."""
    await until(lambda: live.log_text().count(text) >= times, f"{text!r} logged {times} times")


# ---------------------------------------------------------------------------------- CHAP
@pytest.mark.parametrize("algorithms", [(CHAP_SHA256, CHAP_MD5), (CHAP_MD5,)])
def test_mutual_chap(target: LiveTarget, algorithms: tuple[int, ...]) -> None:
    async def body() -> None:
        auth = mutual(algorithms=algorithms)
        ini = await login(target, CHAP_T, authenticator=auth)
        assert auth.verified and auth.algorithm == algorithms[0]
        assert (await ini.clear_unit_attentions(0)).good
        await ini.logout()
        await ini.close()
    within(target, body())


def test_one_way_chap(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await login(target, ONEWAY_T, authenticator=ChapAuthenticator(USER, SECRET))
        assert (await ini.clear_unit_attentions(0)).good
        await ini.close()
    within(target, body())


@pytest.mark.parametrize("options", [
    {"authenticator": ChapAuthenticator(USER, "wrong-secret-00", target_user=TUSER,
                                        target_secret=TSECRET)},
    {"authenticator": ChapAuthenticator("mallory", SECRET, target_user=TUSER,
                                        target_secret=TSECRET)},
    {"authenticator": ChapAuthenticator(USER, SECRET)},  # mutual is required here
    {"security_stage": True},  # AuthMethod=None
    {},  # straight to the operational stage
])
def test_failed_authentication(target: LiveTarget, options: dict[str, Any]) -> None:
    status = within(target, login_status(target, CHAP_T, **options))
    assert status == 0x0201


def test_target_must_prove_itself(target: LiveTarget) -> None:
    async def body() -> None:
        auth = ChapAuthenticator(USER, SECRET, target_user=TUSER, target_secret="expected-else")
        with pytest.raises(ConnectionLost, match="mutual CHAP"):
            await login(target, CHAP_T, authenticator=auth)
    within(target, body())


def test_reflected_challenge(target: LiveTarget) -> None:
    class Reflecting(ChapAuthenticator):
        def mutual_challenge(self, length: int) -> bytes:
            return self.target_challenge

    status = within(target, login_status(
        target, CHAP_T, authenticator=Reflecting(USER, SECRET, target_user=TUSER,
                                                 target_secret=TSECRET)))
    assert status == 0x0201


def test_discovery_needs_chap_and_lists_what_the_initiator_may_reach(target: LiveTarget) -> None:
    async def body() -> None:
        status = await login_status(target, None, security_stage=True)
        assert status == 0x0201
        found: dict[str, set[str]] = {}
        for initiator in (INITIATOR1, INITIATOR2, STRANGER):
            ini = await login(target, None, initiator,
                              authenticator=ChapAuthenticator(USER, SECRET))
            found[initiator] = set(await ini.discover())
            await ini.close()
        assert found[INITIATOR1] == {CHAP_T, ONEWAY_T, ACL_T, PRIVATE_T}
        assert found[INITIATOR2] == {ONEWAY_T, ACL_T}
        assert found[STRANGER] == {ONEWAY_T}
    within(target, body())


# ---------------------------------------------------------------------------------- ACLs
def test_acl_denies_login(target: LiveTarget) -> None:
    status = within(target, login_status(target, PRIVATE_T, INITIATOR2))
    assert status == 0x0202
    status = within(target, login_status(target, ACL_T, STRANGER))
    assert status == 0x0202


@pytest.fixture(scope="module")
def holding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveTarget]:
    """A target that holds its refusals back for an hour, far longer than any test runs."""
    directory: Path = tmp_path_factory.mktemp("holding")
    config = write_config(directory, targets=[
        {"name": CHAP_T, "luns": [{"id": 0, "path": "chap0.img", "size": "4MiB"}],
         "auth": {"chap": {"user": USER, "secret": SECRET},
                  "mutual": {"user": TUSER, "secret": TSECRET}}},
        {"name": PRIVATE_T, "luns": [{"id": 0, "path": "private0.img", "size": "4MiB"}],
         "acl": [{"initiator": INITIATOR1}]},
    ], limits={"auth_failure_delay": 3600})
    live = start_target(config)
    yield live
    live.stop()


@pytest.mark.parametrize(("name", "initiator", "options", "status"), [
    (CHAP_T, INITIATOR1, {"authenticator": ChapAuthenticator(
        USER, "wrong-secret-00", target_user=TUSER, target_secret=TSECRET)}, 0x0201),
    (PRIVATE_T, INITIATOR2, {}, 0x0202),
], ids=["authentication", "authorization"])
def test_refusals_are_held_back(holding: LiveTarget, name: str, initiator: str,
                                options: dict[str, Any], status: int) -> None:
    """An authentication or authorization failure is decided (and logged) at once, and its
    answer waits for auth_failure_delay, against guessing: after the target has logged its
    decision and then served a whole login and logout on another connection, the refused
    initiator still has no answer. The length of the wait is unit-tested with an injected clock
    (tests/unit/iscsi/test_bounds.py)."""
    async def body() -> None:
        refusal = f"failed (status {status:04x})"
        seen = holding.log_text().count(refusal)
        attempt = asyncio.ensure_future(login(holding, name, initiator, **options))
        await logged(holding, refusal, seen + 1)
        other = await login(holding, PRIVATE_T, INITIATOR1)
        await other.logout()
        await other.close()
        answered = attempt.done()
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, LoginFailedError):
            await attempt
        assert not answered
    within(holding, body())


async def report_luns(ini: Initiator, lun: int = 0) -> list[int]:
    result = (await ini.command(lun, bytes((0xA0, 0, 0, 0, 0, 0)) + (4096).to_bytes(4, "big")
                                + bytes(2), read_length=4096)).check()
    count = struct.unpack_from(">I", result.data)[0] // 8
    return [struct.unpack_from(">H", result.data, 8 + 8 * i)[0] & 0x3FFF for i in range(count)]


def test_masked_luns_are_invisible_and_unreachable(target: LiveTarget) -> None:
    async def body() -> None:
        one = await login(target, ACL_T, INITIATOR1)
        two = await login(target, ACL_T, INITIATOR2)
        assert await report_luns(one) == [0, 1]
        assert await report_luns(two) == [1]  # through LUN 0, which it may not reach
        await two.clear_unit_attentions(1)
        tur = await two.test_unit_ready(0)
        assert (tur.status, tur.sense_key, tur.asc, tur.ascq) == (2, 0x5, 0x25, 0x00)
        inquiry = await two.command(0, bytes((0x12, 0, 0, 0, 96, 0)), read_length=96)
        assert inquiry.good and inquiry.data[0] == 0x7F  # PQ 011b: no logical unit here
        write = await two.write(0, 0, bytes(BS))
        assert write.sense_key == 0x5 and write.asc == 0x25
        await one.close()
        await two.close()
    within(target, body())


def naa(lun: int) -> bytes:
    return lu_identity(ACL_T, lun, None)[1]


def e4(lun: int) -> bytes:
    """Identification CSCD descriptor naming a LUN of ACL_T by its NAA designator."""
    desc = bytearray(32)
    desc[0] = 0xE4
    desc[4], desc[5], desc[7] = 0x01, 0x03, 8
    desc[8:16] = naa(lun)
    desc[29:32] = BS.to_bytes(3, "big")
    return bytes(desc)


def xcopy(src: int, dst: int, blocks: int) -> tuple[bytes, bytes]:
    cscds = e4(0) + e4(1)
    segment = struct.pack(">BBHHH2xHQQ", 0x02, 0, 0x18, src, dst, blocks, 0, 0)
    params = struct.pack(">BBH4xII", 1, 0, len(cscds), len(segment), 0) + cscds + segment
    cdb = bytes((0x83, 0x00)) + bytes(8) + len(params).to_bytes(4, "big") + bytes(2)
    return cdb, params


def test_extended_copy_naming_a_masked_lun(target: LiveTarget) -> None:
    async def body() -> None:
        one = await login(target, ACL_T, INITIATOR1)
        two = await login(target, ACL_T, INITIATOR2)
        for ini, lun in ((one, 0), (one, 1), (two, 1)):
            await ini.clear_unit_attentions(lun)
        lun0, lun1 = b"\xa0" * (8 * BS), b"\xb1" * (8 * BS)
        (await one.write(0, 0, lun0)).check()
        (await one.write(1, 0, lun1)).check()
        # the owner of both LUNs may copy between them (the descriptors are right)
        cdb, params = xcopy(0, 1, 1)
        (await one.command(1, cdb, params)).check()
        (await one.write(1, 0, lun1)).check()
        # INITIATOR2 may not reach LUN 0: neither as source nor as destination
        for src, dst in ((0, 1), (1, 0)):
            cdb, params = xcopy(src, dst, 8)
            result = await two.command(1, cdb, params)
            assert (result.status, result.sense_key, result.asc, result.ascq) == \
                (2, 0x0A, 0x0D, 0x02), result
        assert (await one.read(0, 0, 8)).check().data == lun0
        assert (await one.read(1, 0, 8)).check().data == lun1
        await one.close()
        await two.close()
    within(target, body())


def test_rod_token_of_a_masked_lun(target: LiveTarget) -> None:
    async def body() -> None:
        one = await login(target, ACL_T, INITIATOR1)
        two = await login(target, ACL_T, INITIATOR2)
        for ini, lun in ((one, 0), (one, 1), (two, 1)):
            await ini.clear_unit_attentions(lun)
        (await one.write(0, 0, b"\xc0" * (8 * BS))).check()
        (await one.write(1, 0, b"\xd1" * (8 * BS))).check()
        desc = struct.pack(">QI4x", 0, 8)
        body_ = struct.pack(">BxIIxxH", 0, 0, 0, len(desc)) + desc
        populate = struct.pack(">H", len(body_)) + body_
        token_cdb = bytes((0x83, 0x10)) + bytes(4) + (7).to_bytes(4, "big") \
            + len(populate).to_bytes(4, "big") + bytes(2)
        (await one.command(0, token_cdb, populate)).check()
        rrti = bytes((0x84, 0x07)) + (7).to_bytes(4, "big") + bytes(4) \
            + (4096).to_bytes(4, "big") + bytes(2)
        info = (await one.command(0, rrti, read_length=4096)).check().data
        at = 32 + info[13]
        token = info[at + 6:at + 6 + 512]
        wut_body = struct.pack(">B5xQ", 0, 0) + token + bytes(6) + struct.pack(">H", 16) + desc
        wut = struct.pack(">H", len(wut_body)) + wut_body
        wut_cdb = bytes((0x83, 0x11)) + bytes(4) + (8).to_bytes(4, "big") \
            + len(wut).to_bytes(4, "big") + bytes(2)
        result = await two.command(1, wut_cdb, wut)
        # to an initiator without access to its data the token does not exist
        assert (result.sense_key, result.asc, result.ascq) == (0x5, 0x23, 0x04), result
        assert (await two.read(1, 0, 8)).check().data == b"\xd1" * (8 * BS)
        await one.close()
        await two.close()
    within(target, body())


def test_session_limit_per_target(target: LiveTarget) -> None:
    async def body() -> None:
        first = await login(target, PRIVATE_T)
        status = await login_status(target, PRIVATE_T)
        assert status == 0x0302
        conn = first.conn
        assert conn is not None
        ended = f"session TSIH {conn.tsih} of {INITIATOR1} ended"
        seen = target.log_text().count(ended)
        await first.logout()
        await first.close()
        await logged(target, ended, seen + 1)
        again = await login(target, PRIVATE_T)
        await again.close()
    within(target, body())


# ---------------------------------------------------------------------------------- digests
def test_data_digest_error_ends_the_command_and_writes_nothing(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await login(target, ONEWAY_T, authenticator=ChapAuthenticator(USER, SECRET),
                          data_digest=True, header_digest=True)
        await ini.clear_unit_attentions(0)
        old = b"\x5a" * (16 * BS)
        (await ini.write(0, 100, old)).check()
        new = b"\xee" * (16 * BS)
        itt, fut = ini.submit(0, rw_cdb(True, 100, 16), new, manual_r2t=True,
                              immediate_length=0, unsolicited=False)
        await ini._drain()
        await until(lambda: ini.r2ts.get(itt), "the R2T")
        [r2t] = ini.r2ts[itt]
        conn = ini.conn
        assert conn is not None
        conn.send_data_out(itt, r2t.ttt, r2t.offset, r2t.length, data=new[:r2t.length])
        digest = conn._out[-1]
        conn._out[-1] = bytes(b ^ 0xFF for b in bytes(digest))  # corrupt the data digest
        result: CommandResult = await ini._wait(fut)
        assert (result.status, result.sense_key, result.asc, result.ascq) == \
            (2, 0x0B, 0x47, 0x05)
        assert any(r.reason == RejectReason.DATA_DIGEST_ERROR for r in ini.rejects)
        assert (await ini.read(0, 100, 16)).check().data == old
        assert dg.crc32c(old) != dg.crc32c(new)
        await ini.close()
    within(target, body())


def test_header_digest_error_drops_the_connection(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await login(target, ACL_T, INITIATOR1, header_digest=True)
        conn = ini.conn
        assert conn is not None
        hdr = pdus.nop_out(itt=0x77, ttt=0xFFFFFFFF, cmd_sn=conn.cmd_sn,
                           exp_stat_sn=conn.exp_stat_sn)
        good = dg.digest((hdr,))
        ini._writer.write(bytes(hdr) + bytes(b ^ 0x01 for b in bytes(good)))
        await ini.wait_closed(10)
        assert ini.closed
        await ini.close()
    within(target, body())
    assert "header digest error" in target.log_text()


# ---------------------------------------------------------------------------------- timers
def test_login_must_finish_in_time(target: LiveTarget) -> None:
    """A connection that never logs in is closed without a word; the socket's own timeout (10 s,
    below the 15 s default login_timeout) guards against a target that never closes it. The
    timer is unit-tested with an injected clock (tests/unit/iscsi/test_connection_login.py)."""
    with socket.create_connection((target.host, target.port), timeout=10) as sock:
        assert sock.recv(1) == b""  # nothing sent: the target closes after login_timeout


def test_trickling_pdu_is_cut_off(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await login(target, ACL_T, INITIATOR1, answer_pings=True)
        hdr = pdus.nop_out(itt=0x1234, ttt=0xFFFFFFFF, cmd_sn=0, exp_stat_sn=0, dsl=4096)
        ini._writer.write(bytes(hdr))  # the header, then the data one byte at a time
        with pytest.raises((ConnectionLost, asyncio.TimeoutError, TimeoutError)):
            for _ in range(40):  # a byte every 0.3 s: the 4096-byte PDU never completes
                ini._writer.write(b"\0")
                await ini._writer.drain()
                await asyncio.sleep(0.3)
                if ini.closed:
                    raise ConnectionLost("closed")
            pytest.fail("the target took 40 bytes of a trickling PDU and kept the connection")
        await ini.close()
    within(target, body())
    assert "PDU receive timeout" in target.log_text() or "took more than" in target.log_text()


def test_unanswered_nop_in_drops_the_connection(target: LiveTarget) -> None:
    async def body() -> None:
        ini = await login(target, ACL_T, INITIATOR1, answer_pings=False)
        await ini.wait_closed(10)
        assert ini.pings >= 1
        healthy = await login(target, ACL_T, INITIATOR1)
        for pings in range(1, 5):  # pings answered: the session lives on past nop_interval+timeout
            await until(lambda n=pings: healthy.pings >= n or healthy.closed, f"ping {pings}")
            assert (await healthy.test_unit_ready(1)).status in (0, 2)
        assert healthy.pings >= 1 and not healthy.closed
        await healthy.close()
    within(target, body())


def test_peer_that_stops_reading_is_dropped(target: LiveTarget) -> None:
    """Reads of 4 MiB each, never read back: the target stops reading once 1 MiB is queued and
    drops the connection after send_timeout, while another session is served as usual."""
    from pytarget.initiator.protocol import InitiatorConnection

    sock = socket.create_connection((target.host, target.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn = InitiatorConnection(INITIATOR1, target_name=ACL_T, isid=random_isid())
    conn.start_login()
    sock.sendall(conn.data_to_send())
    while conn.state.value != "full-feature":
        conn.receive_data(sock.recv(65536))
        conn.events()
        sock.sendall(conn.data_to_send())
    sock.setblocking(False)
    sent = 0
    try:
        for _ in range(64):
            conn.send_command(0, rw_cdb(False, 0, 8192 // 2), read_length=4 << 20)
            out = conn.data_to_send()
            sock.send(out)
            sent += 1
    except (BlockingIOError, ConnectionError):
        pass

    async def healthy() -> None:
        """Reads on another session, from the stall until the target has dropped the peer."""
        ini = await login(target, ACL_T, INITIATOR2)
        await ini.clear_unit_attentions(1)
        while "took none of our output" not in target.log_text():
            assert (await ini.read(1, 0, 8)).good
        assert (await ini.read(1, 0, 8)).good
        await ini.close()
    within(target, healthy())
    sock.close()
    assert "took none of our output" in target.log_text()


# ---------------------------------------------------------------------------------- libiscsi
needs_libiscsi = pytest.mark.skipif(shutil.which("iscsi-ls") is None or ISCSI_TEST_CU is None,
                                    reason="libiscsi-bin is not installed")


@needs_libiscsi
def test_iscsi_ls_with_chap_in_the_url(target: LiveTarget) -> None:
    url = f"iscsi://{USER}%{SECRET}@{target.host}:{target.port}"
    proc = subprocess.run(["iscsi-ls", "-s", "-i", INITIATOR2, url], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = proc.stdout.split("Target:")
    assert sorted(t.split()[0] for t in listed[1:]) == [ACL_T, ONEWAY_T]
    [acl] = [t for t in listed if t.startswith(ACL_T)]
    assert "Lun:1" in acl and "Lun:0" not in acl  # LUN 0 is masked from INITIATOR2
    bad = subprocess.run(["iscsi-ls", "-i", INITIATOR2,
                          f"iscsi://{USER}%not-the-secret@{target.host}:{target.port}"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Authentication failure" in bad.stdout + bad.stderr


@needs_libiscsi
def test_iscsi_inq_with_mutual_chap(target: LiveTarget) -> None:
    base = f"iscsi://{USER}%{SECRET}@{target.host}:{target.port}/{CHAP_T}/0"
    proc = subprocess.run(["iscsi-inq", "-i", INITIATOR1,
                           f"{base}?target_user={TUSER}&target_password={TSECRET}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "DIRECT_ACCESS" in proc.stdout, proc.stdout + proc.stderr
    wrong = subprocess.run(["iscsi-inq", "-i", INITIATOR1,
                            f"{base}?target_user={TUSER}&target_password=not-the-target"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0


@needs_libiscsi
@pytest.mark.libiscsi
def test_iscsi_test_cu_with_chap(target: LiveTarget) -> None:
    url = f"iscsi://{USER}%{SECRET}@{target.host}:{target.port}/{ONEWAY_T}/0"
    for suite in ("TestUnitReady", "Inquiry"):
        assert_clean(run_suite(suite, url, INITIATOR1, INITIATOR2, timeout=300))
