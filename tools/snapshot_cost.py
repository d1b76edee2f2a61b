#!/usr/bin/env python3
"""What taking a snapshot costs: the time writes are held back while the device server takes a
snapshot of a 1 GiB LUN with some data, on a filesystem with reflink, one without, and an RBD
image (docs/snapshots.md).

    tools/snapshot_cost.py --dir DIR [--runs 5] [--data-mib 256]
    tools/snapshot_cost.py --xfs [--runs 5]          (mounts a throw-away XFS, reflink=1; root)
    tools/snapshot_cost.py --ceph [--runs 5]         (starts a throw-away Ceph cluster)

A LUN of 1 GiB gets `--data-mib` of data scattered in 1 MiB runs (the rest are holes); each run
takes a snapshot through `scsi.snapshots.take` (quiesce, snapshot, release), then deletes it.
Prints one Markdown table row: median, min and max of the time writes were held, and how the
snapshot was made. The page cache is written back before each run (`fdatasync`), so the figure
is the snapshot's own cost, not that of flushing earlier writes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytarget.backstore.base import Backstore  # noqa: E402
from pytarget.backstore.file import FileBackstore  # noqa: E402
from pytarget.scsi import snapshots  # noqa: E402
from pytarget.scsi.device import LogicalUnit, LuConfig  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


class _Directory:
    def visible_luns(self, nexus: object) -> list[int]:
        return [0]


def fill(store: Backstore, data_mib: int) -> None:
    chunk = memoryview(os.urandom(MiB))
    stride = store.size // MiB // max(data_mib, 1)
    for i in range(data_mib):
        store.write(chunk, i * stride * MiB)
    store.flush()


def measure(store: Backstore, runs: int) -> tuple[list[float], str]:
    lu = LogicalUnit(LuConfig(lun=0), store, _Directory())
    held: list[float] = []
    method = ""

    async def once(name: str) -> None:
        nonlocal method
        methods, elapsed = await snapshots.take([(lu, name)])
        method = methods[0]
        held.append(elapsed)

    for i in range(runs):
        store.flush()
        name = f"cost{i}"
        asyncio.run(once(name))
        store.delete_snapshot(name)
    return held, method


def row(where: str, data_mib: int, held: list[float], method: str) -> str:
    ms = [h * 1000 for h in held]
    return (f"| {where} | 1 GiB, {data_mib} MiB data | {method} | {statistics.median(ms):.1f} | "
            f"{min(ms):.1f} | {max(ms):.1f} | {len(ms)} |")


def on_directory(directory: Path, runs: int, data_mib: int, where: str) -> str:
    path = directory / f"cost-{uuid.uuid4().hex[:8]}.img"
    FileBackstore.create(str(path), GiB)
    store = FileBackstore(str(path))
    try:
        fill(store, data_mib)
        held, method = measure(store, runs)
    finally:
        store.close()
        path.unlink()
    return row(where, data_mib, held, method)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", type=Path, help="a directory on the filesystem to measure")
    where.add_argument("--xfs", action="store_true", help="a throw-away XFS with reflink=1")
    where.add_argument("--ceph", action="store_true", help="a throw-away Ceph cluster")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data-mib", type=int, default=256)
    args = parser.parse_args()
    print("| medium | LUN | how | held median ms | min | max | runs |")
    print("|---|---|---|---|---|---|---|")
    if args.dir is not None:
        kind = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(args.dir)],
                              capture_output=True, text=True).stdout.strip() or "?"
        print(on_directory(args.dir, args.runs, args.data_mib, kind))
        return 0
    with tempfile.TemporaryDirectory(prefix="snapshot-cost-") as tmp:
        if args.xfs:
            sys.path.insert(0, str(REPO))
            from tests.xfs import xfs_mount

            with xfs_mount(Path(tmp), 2 * GiB) as mount:
                print(on_directory(mount, args.runs, args.data_mib, "xfs reflink=1"))
            return 0
        from pytarget.backstore.rbd import RbdBackstore, remove_image
        from tests.ceph_cluster import running

        with running(Path(tmp)) as cluster:
            params = {"pool": cluster.pool, "image": "cost", "conf": str(cluster.conf),
                      "keyring": str(cluster.keyring), "client_id": cluster.client_id}
            RbdBackstore.provision(params, GiB)
            store = RbdBackstore.open(params)
            try:
                fill(store, args.data_mib)
                held, method = measure(store, args.runs)
            finally:
                store.close()
                asyncio.run(remove_image(cluster.pool, "cost", conf=str(cluster.conf),
                                         keyring=str(cluster.keyring)))
            print(row("rbd (single-OSD test cluster)", args.data_mib, held, method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
