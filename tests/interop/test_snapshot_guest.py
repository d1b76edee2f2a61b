"""Snapshots of a LUN the Linux guest is writing to, in one guest boot (guest/snapshot.sh).

The LUN lives on a throw-away XFS with reflink (tests/xfs.py), so its snapshots are FICLONEs
and the space a deleted snapshot gives back can be read off the filesystem. The guest puts ext4
on the LUN and runs fio with verify on it; at its marks the host, through the command line an
operator would use:

  snap-a  `snapshot create A`, `expose 0@A --lun 1` and `--nbd`, and the full backup:
          `qemu-img convert` of A's NBD export into a file
  snap-b  `snapshot create B`, `expose 0@B --nbd`; the full backup must be byte-identical to
          snapshot A
  after   (nothing writes any more) the incremental backup: `qemu-img map` of B's export with
          `x-dirty-bitmap=qemu:dirty-bitmap:A` (the checkpoint snapshot A started) lists what
          changed between A and B; those extents, read from B's export over a copy of the full
          backup, must give B's contents exactly (`qemu-img compare` with B's export), having
          read far less than the LUN. Then A is unexposed and deleted, and the filesystem must
          get back at least the MiB the guest overwrote between A and B (blocks only A held)

Between the marks the guest logs in a second time (another initiator name), mounts A's LUN
read-only, finds the files synced before A intact and A's file system clean after its journal
replay. fio's own verify pass must succeed at the end. The script is a part of lane.py's shared
boot; on its own boot it took 165 s at a load average of 3.5 to 7 on the 2-core TCG machine,
180 s at 8, 275 s at 10.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..conftest import TARGET_IQN, LiveTarget, start_target, write_config
from ..e2e.test_snapshots import free_bytes, nbd_port, qemu, snapshot_cli
from ..xfs import xfs_mount
from .lane import GUEST, PartContext, PartOutcome, PartPlan
from .run import GuestPart
from .test_linux_initiator import _assert_passed

pytestmark = [pytest.mark.interop, pytest.mark.slow]

MiB = 1 << 20
LUN_SIZE = 48 * MiB  # small: the guest reads all of snapshot A (3.5 MiB/s at load 8)
OVERWRITTEN = 1 * MiB  # keep/k0, rewritten in place by the guest after snapshot A


@dataclass
class Snapshots:
    """The part's target on its XFS and what the host did at the guest's marks."""

    target: LiveTarget
    xfs: Path
    port: int  # the NBD server's
    full: Path  # the full backup of snapshot A
    took: dict[str, float] = field(default_factory=dict)
    found: dict[str, bool] = field(default_factory=dict)

    @property
    def export(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{TARGET_IQN}/0"

    def timed(self, what: str, *command: str) -> str:
        start = time.monotonic()
        out = (snapshot_cli(self.target.config, *command) if command[0] != "qemu-img"
               else qemu(*command))
        self.took[what] = time.monotonic() - start
        return out

    def at_snap_a(self) -> None:
        out = self.timed("create A", "create", "A", "0")
        assert "(reflink)" in out, out
        self.timed("expose A as LUN 1", "expose", "0@A", "--lun", "1")
        self.timed("expose A over NBD", "expose", "0@A", "--nbd")
        self.timed("full backup of A", "qemu-img", "convert", "-f", "raw", "-O", "raw",
                   f"{self.export}@A", str(self.full))

    def at_snap_b(self) -> None:
        self.timed("create B", "create", "B", "0")
        self.timed("expose B over NBD", "expose", "0@B", "--nbd")
        self.found["full equals A"] = filecmp.cmp(
            self.full, self.xfs / "live.img.snapshots" / "A", shallow=False)


@contextmanager
def _snapshots(context: PartContext) -> Iterator[PartPlan]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-utils (qemu-img) not installed")
    with xfs_mount(context.directory, 768 * MiB) as xfs:
        config = write_config(context.directory, luns=[
            {"id": 0, "path": str(xfs / "live.img"), "size": f"{LUN_SIZE // MiB}MiB"}],
            nbd="127.0.0.1:0")
        target = start_target(config)
        try:
            state = Snapshots(target, xfs, nbd_port(target), context.directory / "full-A.raw")
            yield PartPlan(GuestPart("snapshot", "snapshot.sh", [target.port], target.iqn, 420,
                                     marks={"snap-a": state.at_snap_a,
                                            "snap-b": state.at_snap_b},
                                     target_log=target.log), state)
        finally:
            target.stop()


guest_snapshot = GUEST.part("snapshot", _snapshots)


def nbd_opts(port: int, snapshot: str, **extra: str) -> str:
    return ",".join([f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
                     f"export={TARGET_IQN}/0@{snapshot}", *(f"{k}={v}" for k, v in extra.items())])


def dirty_extents(port: int, snapshot: str, checkpoint: str) -> list[tuple[int, int]]:
    """(offset, length) of what changed from `checkpoint` to `snapshot`, as the snapshot's
    export serves the checkpoint's bitmap ("data": false under x-dirty-bitmap)."""
    extents = json.loads(qemu("qemu-img", "map", "--output=json", "--image-opts", nbd_opts(
        port, snapshot, **{"x-dirty-bitmap": f"qemu:dirty-bitmap:{checkpoint}"})))
    return [(e["start"], e["length"]) for e in extents if not e["data"]]


def copy_extent(port: int, snapshot: str, offset: int, length: int, image: Path) -> None:
    """Read [offset, offset+length) of the snapshot's export into the same place of `image`
    (docs/guides/backup.md's way)."""
    source = "driver=raw,offset={},size={},file.{}".format(
        offset, length, nbd_opts(port, snapshot).replace(",", ",file."))
    target = f"driver=raw,offset={offset},size={length},file.driver=file,file.filename={image}"
    qemu("qemu-img", "convert", "-n", "--image-opts", source, "--target-image-opts", target)


def holds(target: LiveTarget, path: Path) -> bool:
    """Whether the target process has `path` open (unlinked or not)."""
    fds = Path(f"/proc/{target.process.pid}/fd")
    names = []
    for fd in fds.iterdir():
        try:
            names.append(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile
    return any(name.removesuffix(" (deleted)") == str(path) for name in names)


def test_snapshots_of_a_guest_writing_ext4(guest_snapshot: PartOutcome, tmp_path: Path) -> None:
    run, state = guest_snapshot.run, guest_snapshot.state
    target, xfs, port, full = state.target, state.xfs, state.port, state.full
    config, export, took, found, timed = (target.config, state.export, state.took, state.found,
                                          state.timed)
    snapshot_a = xfs / "live.img.snapshots" / "A"
    if set(run.marks) != {"snap-a", "snap-b"} or run.mark_errors:
        pytest.fail(f"the guest reached the marks {sorted(run.marks)}; "
                    f"{'; '.join(run.mark_errors)}\n{run.report()}", pytrace=False)
    # the incremental backup: what changed between A and B (checkpoint A, which snapshot A
    # started, as B's export serves it), read from B's export onto a copy of the full backup
    started = time.monotonic()
    extents = dirty_extents(port, "B", "A")
    restored = tmp_path / "restored-B.raw"
    subprocess.run(["cp", "--sparse=always", str(full), str(restored)], check=True)
    for offset, length in extents:
        copy_extent(port, "B", offset, length, restored)
    took["incremental backup A..B"] = time.monotonic() - started
    incremental = sum(length for _, length in extents)
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored),
                               f"{export}@B"], capture_output=True, text=True, timeout=300)
    found["full + incremental equals B"] = compared.returncode == 0
    # the script is over, nothing writes: what deleting A gives back is what only A held
    timed("unexpose A", "unexpose", "0@A")
    snapshot_cli(config, "unexpose", "0@A", "--nbd")
    before = free_bytes(xfs)
    timed("delete A", "delete", "0@A")
    found["A removed"] = not snapshot_a.exists()
    # an unlinked file's blocks are freed when its last descriptor closes: the LUN that showed
    # A retires in the background (server.retire, up to RETIRE_GRACE for commands in flight)
    start = time.monotonic()
    while holds(target, snapshot_a) and time.monotonic() - start < 60:
        time.sleep(0.1)
    took["A's descriptors closed after delete"] = time.monotonic() - start
    found["target let go of A"] = not holds(target, snapshot_a)
    freed = 0
    for _ in range(200):  # XFS may free an unlinked file's blocks in the background
        os.sync()
        freed = free_bytes(xfs) - before
        if freed >= OVERWRITTEN:
            break
        time.sleep(0.05)
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in took.items())
    print(f"snapshot.sh: {run.wall:.0f}s; marks at {run.marks}; host steps: {steps}; {found}; "
          f"incremental read {incremental / MiB:.2f} MiB in {len(extents)} extents; "
          f"deleting A gave back {freed / MiB:.1f} MiB")
    problems = []
    if found.get("full equals A") is not True:
        problems.append("the full backup read from A's NBD export differs from snapshot A")
    if found.get("full + incremental equals B") is not True:
        problems.append("the full backup of A with the extents dirty between A and B copied "
                        f"over it differs from B's export: {compared.stdout}{compared.stderr}")
    if not 0 < incremental <= LUN_SIZE // 2:
        problems.append(f"the incremental backup read {incremental} bytes in {extents}: the "
                        "guest wrote between A and B, and far less than the LUN")
    if found.get("A removed") is not True:
        problems.append("snapshot A's file is still there after `snapshot delete`")
    if not found["target let go of A"]:
        problems.append("60 s after `snapshot delete` the target still has snapshot A's file "
                        "open (a page-cache mapping of it that outlived the retired LUN?), so "
                        "its blocks are not given back")
    elif freed < OVERWRITTEN:
        problems.append(f"deleting A gave back {freed} bytes, expected at least "
                        f"the {OVERWRITTEN} the guest overwrote between A and B")
    if problems:
        pytest.fail("; ".join(problems) + "\n" + run.report(), pytrace=False)
    _assert_passed(run, target)
