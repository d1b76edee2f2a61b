"""The Linux kernel initiator (open-iscsi, sg3_utils, ext4) against a live pytarget.

Each test starts its own target on an ephemeral loopback port with fresh sparse backing files
in tmp_path, boots the linux-initiator guest (tests/interop/run.py) with one script from
tests/interop/guest/ and asserts on the script's exit status; a failure message carries the
script's stdout tail, the guest kernel log tail and the target log tail.  All outputs stay in
tmp_path/guest-out.  Under TCG emulation the fs, unmap and caw tests take about three minutes
together; the copy-offload and reservation tests (xcopy.sh, odx.sh, pr.sh) about four more:
they move 128 MiB of random data through the emulated guest, which is what costs the time.

Skipped when ../shared/interop/linux-initiator is missing or cannot run here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import LiveTarget, start_target, write_config
from ..xfs import xfs_mount
from .run import GuestRun, run_guest, unavailable

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _harness_available() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)


def _target(tmp_path: Path, luns: list[dict[str, Any]]) -> Iterator[LiveTarget]:
    target = start_target(write_config(tmp_path, luns=luns))
    try:
        yield target
    finally:
        target.stop()


def allocated(path: Path) -> int:
    """Bytes the host file system has allocated to a backing file."""
    return os.stat(path).st_blocks * 512


def target_trouble(target: LiveTarget) -> list[str]:
    """Tracebacks and ERROR/CRITICAL lines in the target's log (none expected in these runs)."""
    return [line for line in target.log_text().splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]


def _assert_passed(run: GuestRun, target: LiveTarget) -> None:
    if not run.ok:
        pytest.fail(run.report(), pytrace=False)
    trouble = target_trouble(target)
    if trouble:
        pytest.fail(f"{run.verdict()}, but the target logged errors:\n" + "\n".join(trouble[:20])
                    + f"\n(full log: {target.log})", pytrace=False)


# -------------------------------------------------------------------------------- fs.sh
FS_LUNS = [
    {"id": 0, "path": "fs-a.img", "size": "512MiB"},   # 50 x 4 MiB of files need room
    {"id": 1, "path": "fs-b.img", "size": "128MiB"},
]


@pytest.fixture
def fs_target(tmp_path: Path) -> Iterator[LiveTarget]:
    yield from _target(tmp_path, FS_LUNS)


def test_ext4_without_and_with_digests(fs_target: LiveTarget, tmp_path: Path) -> None:
    """Foundation acceptance: discovery, login, 200 MiB of files on ext4 verified across a
    cold remount, fsck; then a CRC32C header+data digest session re-reads them and writes
    and verifies a smaller round on the second LUN."""
    run = run_guest(fs_target, "fs.sh", tmp_path / "guest-out", timeout=360)
    _assert_passed(run, fs_target)
    if "negotiated DataDigest: CRC32C" not in run.stdout:
        pytest.fail("the digest round did not run\n" + run.report(), pytrace=False)


# -------------------------------------------------------------------------------- unmap.sh
UNMAP_FS_MB = 100
UNMAP_LUNS = [
    {"id": 0, "path": "thin-fs.img", "size": "384MiB"},   # ext4 + fstrim
    {"id": 1, "path": "thin-raw.img", "size": "64MiB"},   # sg_unmap, WRITE SAME, blkdiscard
]


@pytest.fixture
def unmap_target(tmp_path: Path) -> Iterator[LiveTarget]:
    yield from _target(tmp_path, UNMAP_LUNS)


def test_thin_provisioning(unmap_target: LiveTarget, tmp_path: Path) -> None:
    """UNMAP / WRITE SAME / GET LBA STATUS / discard limits seen by the Linux initiator, and
    fstrim on ext4 giving the space of deleted files back to the host.

    The host-side arithmetic, on the ext4 LUN's backing file (allocated = st_blocks x 512):
      before   allocation before the guest boots (a fresh sparse file: ~0)
      written  allocation while the guest waits at its `host_sync written` mark: mkfs
               metadata + journal + the UNMAP_FS_MB MiB of files, written, synced and
               fstrim'd once (so free space is already trimmed and nothing else is pending)
      after    allocation after the run: the files were deleted, synced and fstrim'd
      dropped = written - after, must be >= 90% of UNMAP_FS_MB MiB (only the files' blocks
               were freed; metadata and the journal stay allocated)
    """
    backing = tmp_path / "thin-fs.img"
    sizes: dict[str, int] = {"before": allocated(backing)}

    def at_written() -> None:
        sizes["written"] = allocated(backing)

    run = run_guest(unmap_target, "unmap.sh", tmp_path / "guest-out", timeout=300,
                    env={"UNMAP_MB": str(UNMAP_FS_MB)}, marks={"written": at_written})
    sizes["after"] = allocated(backing)
    summary = ", ".join(f"{k}={v / MiB:.1f} MiB" for k, v in sizes.items())
    problems = [] if run.ok else ["guest script failed"]
    if "written" not in sizes:
        problems.append("the guest never reached its 'written' mark"
                        + (f" ({'; '.join(run.mark_errors)})" if run.mark_errors else ""))
    else:
        dropped = sizes["written"] - sizes["after"]
        if sizes["written"] - sizes["before"] < 0.95 * UNMAP_FS_MB * MiB:
            problems.append(f"writing {UNMAP_FS_MB} MiB of files allocated only "
                            f"{(sizes['written'] - sizes['before']) / MiB:.1f} MiB on the host")
        if dropped < 0.9 * UNMAP_FS_MB * MiB:
            problems.append(f"delete + fstrim gave back {dropped / MiB:.1f} MiB on the host, "
                            f"expected >= {0.9 * UNMAP_FS_MB:.0f} MiB")
    print(f"unmap.sh: backing file allocation {summary}")
    if problems:
        pytest.fail(f"{'; '.join(problems)} [backing file allocation: {summary}]\n"
                    + run.report(), pytrace=False)
    _assert_passed(run, unmap_target)


# -------------------------------------------------------------------------------- caw.sh
CAW_LUNS = [
    {"id": 0, "path": "caw-512.img", "size": "64MiB", "block_size": 512},
    {"id": 1, "path": "caw-4k.img", "size": "64MiB", "block_size": 4096},
]


@pytest.fixture
def caw_target(tmp_path: Path) -> Iterator[LiveTarget]:
    yield from _target(tmp_path, CAW_LUNS)


def test_compare_and_write(caw_target: LiveTarget, tmp_path: Path) -> None:
    """sg_compare_and_write: a matching compare writes; a stale one fails with MISCOMPARE
    (exit status 14), sense INFORMATION = offset of the first differing byte, block intact."""
    run = run_guest(caw_target, "caw.sh", tmp_path / "guest-out", timeout=240)
    _assert_passed(run, caw_target)


# -------------------------------------------------------------------------------- xcopy.sh
COPY_MB = 128        # random data per copy test: written once, read back after the big copies
XCOPY_SMALL_MB = 128  # the in-LUN and ddpt copies: 128 MiB each, like the LUN-to-LUN ones
XCOPY_LUNS = [
    {"id": 0, "path": "xcopy-a.img", "size": "512MiB", "thin": True},   # source + in-LUN copy
    {"id": 1, "path": "xcopy-b.img", "size": "768MiB", "thin": True},   # three destinations
]


@pytest.fixture
def xcopy_target(tmp_path: Path) -> Iterator[LiveTarget]:
    yield from _target(tmp_path, XCOPY_LUNS)


def test_extended_copy(xcopy_target: LiveTarget, tmp_path: Path) -> None:
    """EXTENDED COPY(LID1): sg_xcopy copies 128 MiB of random data LUN to LUN with --on_dst and
    with --on_src, 128 MiB within one LUN, and ddpt --xcopy 128 MiB LUN to LUN; every destination
    range reads back equal to the source (cmp, O_DIRECT).  VPD 8Fh and RECEIVE COPY OPERATING
    PARAMETERS are shown and checked for the descriptors the tools use."""
    run = run_guest(xcopy_target, "xcopy.sh", tmp_path / "guest-out", timeout=420,
                    env={"XCOPY_MB": str(COPY_MB), "XCOPY_SMALL_MB": str(XCOPY_SMALL_MB)})
    _assert_passed(run, xcopy_target)


# -------------------------------------------------------------------------------- odx.sh
ODX_LUNS = [
    {"id": 0, "path": "odx-a.img", "size": f"{COPY_MB}MiB", "thin": True},       # the source
    {"id": 1, "path": "odx-b.img", "size": f"{2 * COPY_MB}MiB", "thin": True},   # destinations
]


@pytest.fixture
def odx_target(tmp_path: Path) -> Iterator[LiveTarget]:
    yield from _target(tmp_path, ODX_LUNS)


def test_odx_token_copy(odx_target: LiveTarget, tmp_path: Path) -> None:
    """ODX: POPULATE TOKEN of 128 MiB of random data on one LUN, WRITE USING TOKEN into the
    other, RECEIVE ROD TOKEN INFORMATION after each; the destination reads back equal, the
    deleted token is refused (TOKEN DELETED) and the block device zero ROD token writes zeros.
    The guest's ddpt --odx is tried too; ddpt 0.97's misplaced range descriptors (see odx.sh)
    must be rejected with LOGICAL BLOCK ADDRESS OUT OF RANGE."""
    run = run_guest(odx_target, "odx.sh", tmp_path / "guest-out", timeout=360,
                    env={"ODX_MB": str(COPY_MB), "ODX_ZERO_MB": "64"})
    _assert_passed(run, odx_target)


# -------------------------------------------------------------------------------- pr.sh
PR_LUNS = [{"id": 0, "path": "pr.img", "size": "64MiB"}]


@pytest.fixture
def pr_target(tmp_path: Path) -> Iterator[LiveTarget]:
    yield from _target(tmp_path, PR_LUNS)


def test_persistent_reservations(pr_target: LiveTarget, tmp_path: Path) -> None:
    """sg_persist over three I_T nexuses (three open-iscsi ifaces, three initiator names):
    register, Write Exclusive - Registrants Only, writes allowed to the holder and a registrant
    and refused (RESERVATION CONFLICT) to an unregistered nexus that may still read, preempt with
    REGISTRATIONS PREEMPTED to the preempted nexus, clear; keys, PRGENERATION and the reservation
    checked after every step."""
    run = run_guest(pr_target, "pr.sh", tmp_path / "guest-out", timeout=240)
    _assert_passed(run, pr_target)


# -------------------------------------------------------------------------------- sanitize.sh
@pytest.fixture
def sanitize_target(tmp_path: Path) -> Iterator[LiveTarget]:
    with xfs_mount(tmp_path) as xfs:
        yield from _target(tmp_path, [
            {"id": 0, "path": "sanitize.img", "size": "64MiB", "sanitize_rate": "4MiB"},
            {"id": 1, "path": str(xfs / "atomic.img"), "size": "64MiB"},
        ])


def test_sanitize_and_write_atomic(sanitize_target: LiveTarget, tmp_path: Path) -> None:
    """sg_sanitize OVERWRITE (waiting, and --early polled to completion with sg_requests
    --progress, a READ meanwhile refused with SANITIZE IN PROGRESS) and BLOCK ERASE (both ways),
    the data read back as the pattern / as zeros, CRYPTOGRAPHIC ERASE rejected; sg_raw WRITE
    ATOMIC(16) within the advertised length succeeds and beyond it is rejected."""
    run = run_guest(sanitize_target, "sanitize.sh", tmp_path / "guest-out", timeout=540)
    _assert_passed(run, sanitize_target)
