"""The Linux kernel initiator (open-iscsi, sg3_utils, ext4) against a live pytarget.

Each script of tests/interop/guest/ here has its own target, started on an ephemeral loopback
port with fresh sparse backing files in a directory of its own; they run one after the other in
the one boot of the linux-initiator guest that every guest test shares (lane.py, run.py), and
each test asserts on its own script's exit status; a failure message carries the script's
stdout tail, the guest kernel log tail of its run and the target log tail.  Outputs stay in the
boot's directory, one subdirectory per script.  Under TCG emulation the fs, unmap and caw
scripts take about three minutes together; the copy-offload and reservation ones (xcopy.sh,
odx.sh, pr.sh) about four more: they move 128 MiB of random data through the emulated guest,
which is what costs the time.

Skipped when ../shared/interop/linux-initiator is missing or cannot run here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from ..conftest import LiveTarget, start_target, write_config
from ..xfs import xfs_mount
from .lane import GUEST, PartContext, PartOutcome, PartPlan
from .run import GuestPart, GuestRun

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20


@contextmanager
def running(directory: Path, luns: list[dict[str, Any]]) -> Iterator[LiveTarget]:
    target = start_target(write_config(directory, luns=luns))
    try:
        yield target
    finally:
        target.stop()


def target_part(name: str, script: str, luns: list[dict[str, Any]], timeout: int,
                env: Mapping[str, str] | None = None) -> Any:
    """A part of the shared boot: SCRIPT against a target of its own with `luns` (paths
    relative to the part's directory); the test gets the `LiveTarget` as the outcome's state."""
    @contextmanager
    def setup(context: PartContext) -> Iterator[PartPlan]:
        with running(context.directory, luns) as target:
            yield PartPlan(GuestPart(name, script, [target.port], target.iqn, timeout,
                                     env=env or {}, target_log=target.log), target)
    return GUEST.part(name, setup)


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


guest_fs = target_part("fs", "fs.sh", FS_LUNS, timeout=360)


def test_ext4_without_and_with_digests(guest_fs: PartOutcome) -> None:
    """Foundation acceptance: discovery, login, 200 MiB of files on ext4 verified across a
    cold remount, fsck; then a CRC32C header+data digest session re-reads them and writes
    and verifies a smaller round on the second LUN."""
    run, fs_target = guest_fs.run, guest_fs.state
    _assert_passed(run, fs_target)
    if "negotiated DataDigest: CRC32C" not in run.stdout:
        pytest.fail("the digest round did not run\n" + run.report(), pytrace=False)


# -------------------------------------------------------------------------------- unmap.sh
UNMAP_FS_MB = 100
UNMAP_LUNS = [
    {"id": 0, "path": "thin-fs.img", "size": "384MiB"},   # ext4 + fstrim
    {"id": 1, "path": "thin-raw.img", "size": "64MiB"},   # sg_unmap, WRITE SAME, blkdiscard
]


@contextmanager
def _unmap(context: PartContext) -> Iterator[PartPlan]:
    backing = context.directory / "thin-fs.img"
    with running(context.directory, UNMAP_LUNS) as target:
        sizes = {"before": allocated(backing)}

        def at_written() -> None:
            sizes["written"] = allocated(backing)
        yield PartPlan(GuestPart("unmap", "unmap.sh", [target.port], target.iqn, 300,
                                 env={"UNMAP_MB": str(UNMAP_FS_MB)},
                                 marks={"written": at_written}, target_log=target.log),
                       (target, sizes))


guest_unmap = GUEST.part("unmap", _unmap)


def test_thin_provisioning(guest_unmap: PartOutcome) -> None:
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
    run, (unmap_target, sizes) = guest_unmap.run, guest_unmap.state
    sizes["after"] = allocated(unmap_target.config.parent / "thin-fs.img")
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


guest_caw = target_part("caw", "caw.sh", CAW_LUNS, timeout=240)


def test_compare_and_write(guest_caw: PartOutcome) -> None:
    """sg_compare_and_write: a matching compare writes; a stale one fails with MISCOMPARE
    (exit status 14), sense INFORMATION = offset of the first differing byte, block intact."""
    _assert_passed(guest_caw.run, guest_caw.state)


# -------------------------------------------------------------------------------- xcopy.sh
COPY_MB = 128        # random data per copy test: written once, read back after the big copies
XCOPY_SMALL_MB = 128  # the in-LUN and ddpt copies: 128 MiB each, like the LUN-to-LUN ones
XCOPY_LUNS = [
    {"id": 0, "path": "xcopy-a.img", "size": "512MiB", "thin": True},   # source + in-LUN copy
    {"id": 1, "path": "xcopy-b.img", "size": "768MiB", "thin": True},   # three destinations
]


guest_xcopy = target_part("xcopy", "xcopy.sh", XCOPY_LUNS, timeout=420,
                          env={"XCOPY_MB": str(COPY_MB), "XCOPY_SMALL_MB": str(XCOPY_SMALL_MB)})


def test_extended_copy(guest_xcopy: PartOutcome) -> None:
    """EXTENDED COPY(LID1): sg_xcopy copies 128 MiB of random data LUN to LUN with --on_dst and
    with --on_src, 128 MiB within one LUN, and ddpt --xcopy 128 MiB LUN to LUN; every destination
    range reads back equal to the source (cmp, O_DIRECT).  VPD 8Fh and RECEIVE COPY OPERATING
    PARAMETERS are shown and checked for the descriptors the tools use."""
    _assert_passed(guest_xcopy.run, guest_xcopy.state)


# -------------------------------------------------------------------------------- odx.sh
ODX_LUNS = [
    {"id": 0, "path": "odx-a.img", "size": f"{COPY_MB}MiB", "thin": True},       # the source
    {"id": 1, "path": "odx-b.img", "size": f"{2 * COPY_MB}MiB", "thin": True},   # destinations
]


guest_odx = target_part("odx", "odx.sh", ODX_LUNS, timeout=360,
                        env={"ODX_MB": str(COPY_MB), "ODX_ZERO_MB": "64"})


def test_odx_token_copy(guest_odx: PartOutcome) -> None:
    """ODX: POPULATE TOKEN of 128 MiB of random data on one LUN, WRITE USING TOKEN into the
    other, RECEIVE ROD TOKEN INFORMATION after each; the destination reads back equal, the
    deleted token is refused (TOKEN DELETED) and the block device zero ROD token writes zeros.
    The guest's ddpt --odx is tried too; ddpt 0.97's misplaced range descriptors (see odx.sh)
    must be rejected with LOGICAL BLOCK ADDRESS OUT OF RANGE."""
    _assert_passed(guest_odx.run, guest_odx.state)


# -------------------------------------------------------------------------------- pr.sh
PR_LUNS = [{"id": 0, "path": "pr.img", "size": "64MiB"}]


guest_pr = target_part("pr", "pr.sh", PR_LUNS, timeout=240)


def test_persistent_reservations(guest_pr: PartOutcome) -> None:
    """sg_persist over three I_T nexuses (three open-iscsi ifaces, three initiator names):
    register, Write Exclusive - Registrants Only, writes allowed to the holder and a registrant
    and refused (RESERVATION CONFLICT) to an unregistered nexus that may still read, preempt with
    REGISTRATIONS PREEMPTED to the preempted nexus, clear; keys, PRGENERATION and the reservation
    checked after every step."""
    _assert_passed(guest_pr.run, guest_pr.state)


# -------------------------------------------------------------------------------- sanitize.sh
@contextmanager
def _sanitize(context: PartContext) -> Iterator[PartPlan]:
    with ExitStack() as stack:
        xfs = stack.enter_context(xfs_mount(context.directory))
        target = stack.enter_context(running(context.directory, [
            {"id": 0, "path": "sanitize.img", "size": "64MiB", "sanitize_rate": "4MiB"},
            {"id": 1, "path": str(xfs / "atomic.img"), "size": "64MiB"},
        ]))
        yield PartPlan(GuestPart("sanitize", "sanitize.sh", [target.port], target.iqn, 540,
                                 target_log=target.log), target)


guest_sanitize = GUEST.part("sanitize", _sanitize)


def test_sanitize_and_write_atomic(guest_sanitize: PartOutcome) -> None:
    """sg_sanitize OVERWRITE (waiting, and --early polled to completion with sg_requests
    --progress, a READ meanwhile refused with SANITIZE IN PROGRESS) and BLOCK ERASE (both ways),
    the data read back as the pattern / as zeros, CRYPTOGRAPHIC ERASE rejected; sg_raw WRITE
    ATOMIC(16) within the advertised length succeeds and beyond it is rejected."""
    _assert_passed(guest_sanitize.run, guest_sanitize.state)
