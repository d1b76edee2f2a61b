#!/usr/bin/env python3
"""The failover of two gateways over one RBD LUN: the stall an initiator with instant path
failover sees, and the time to the new owner (cluster/ownership.py, docs/guides/scale-out.md).

    tools/failover_measure.py [--runs 3] [--timeout 8] [--heartbeat 1] [--pure]
                              [--cluster DIR | --conf C --keyring K --client-id ID --pool P]

The gateways run the data path compiled as `pip install .` compiles it (tools/build-compiled,
built first, as tools/bench does; tools/bench_code.py), or the sources with --pure; called by
tools/bench (through tools/bench_scaleout.py), they run what tools/bench runs.

Without a cluster a throw-away one is started (tests/ceph_cluster.py) and stopped at the end.
Each run: a fresh image, `pytarget serve --gateway gw1` and `gw2` with `failover:` as given,
gw1 the owner; one session per gateway; 4 KiB writes at queue depth 1 through gw1. gw1 is
killed with SIGKILL; the writer moves to gw2 at once (an initiator with instant path
failover) and goes on writing, repeating each write while gw2 answers NOT READY
(transitioning) or a unit attention, until gw2 is active/optimized. Printed per run: the
longest write (the stall such an initiator sees: gw2 serves writes active/non-optimized until
it finds the owner dead, then holds them while it fences and claims), the time from the kill
to active/optimized, and its parts from gw2's log (detection, fencing, claim); then the
spread. A real initiator first waits for its own path timeout (Linux replacement_timeout,
ESXi RecoveryTimeout) before it re-sends on gw2; keep that timeout above
`timeout + heartbeat` (docs/guides/scale-out.md), and its stall is that timeout, plus the
rest of the transition when they overlap.

`measure(..., code=...)` is what tools/bench calls: it returns one dict per run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_code import add_pure_option, child_env, chosen_code  # noqa: E402

from pytarget.backstore.rbd import remove_image  # noqa: E402
from pytarget.initiator.client import Initiator, InitiatorError  # noqa: E402

IQN = "iqn.2026-11.io.pytarget:failover"
NOT_READY, UNIT_ATTENTION = 0x2, 0x6


@dataclass
class Cluster:
    conf: str
    keyring: str | None
    client_id: str
    pool: str


@dataclass
class Gateway:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path


def start_gateway(config: Path, name: str, code: Path) -> Gateway:
    log = config.parent / f"{name}.log"
    env = child_env(code)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytarget", "serve", "--config", str(config), "--gateway",
             name], stdout=out, stderr=subprocess.STDOUT, cwd=config.parent, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = re.search(r"listening on [0-9.]+:(\d+)", log.read_text(errors="replace"))
        if found:
            return Gateway(name, process, int(found.group(1)), log)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{name} did not start")


def stop(gateway: Gateway, sig: int = signal.SIGTERM) -> None:
    if gateway.process.poll() is None:
        gateway.process.send_signal(sig)
        try:
            gateway.process.wait(30)
        except subprocess.TimeoutExpired:
            gateway.process.kill()
            gateway.process.wait()


def log_times(log: Path) -> dict[str, float]:
    """Wall-clock times (seconds) of gw2's takeover events, from its log lines."""
    marks = {"dead": r"owner gw1 silent", "fenced": r"fenced gw1", "claimed": r"gw2 owns the LU",
             "optimized": r"owner is now target port group 2"}
    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
        if not stamp:
            continue
        when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) \
            + int(stamp.group(2)) / 1000
        for key, pattern in marks.items():
            if key not in out and re.search(pattern, line):
                out[key] = when
    return out


async def write_until_good(ini: Initiator, lba: int, data: bytes, deadline: float) -> None:
    while True:
        result = await ini.write(0, lba, data)
        if result.good:
            return
        triplet = result.sense_triplet
        if triplet is None or triplet[0] not in (NOT_READY, UNIT_ATTENTION) \
                or time.monotonic() > deadline:
            result.check()
        await asyncio.sleep(0.005)


async def one_run(gw1: Gateway, gw2: Gateway) -> dict[str, float]:
    block = os.urandom(4096)
    async with await Initiator.connect("127.0.0.1", gw1.port) as ini1, \
            await Initiator.connect("127.0.0.1", gw2.port) as ini2:
        for ini in (ini1, ini2):
            await ini.login(IQN)
            await ini.clear_unit_attentions(0)
        for lba in range(0, 400, 8):  # some writes through the owner before the kill
            (await ini1.write(0, lba, block)).check()
        killed = time.time()
        stop(gw1, signal.SIGKILL)
        with contextlib.suppress(InitiatorError, OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(ini1.write(0, 0, block), 2)
        # Writes go on through gw2 at once (an initiator with instant path failover): they
        # are served active/non-optimized, then wait while gw2 is transitioning, then are
        # served active/optimized.
        deadline = time.monotonic() + 120
        longest = 0.0
        done = False
        lba = 0
        while not done:
            done = "owner is now target port group 2" in gw2.log.read_text(errors="replace")
            started = time.monotonic()
            await write_until_good(ini2, lba, block, deadline)
            longest = max(longest, time.monotonic() - started)
            lba = (lba + 8) % 4096
        optimized = time.time()
    times = log_times(gw2.log)
    out = {"stall": longest, "takeover": optimized - killed}
    if {"dead", "fenced", "optimized"} <= set(times):
        out["takeover"] = times["optimized"] - killed
        out["detect"] = times["dead"] - killed
        out["fence"] = times["fenced"] - times["dead"]
        out["claim"] = times["optimized"] - times["fenced"]
    return out


def measure(cluster: Cluster, runs: int = 3, timeout: float = 8.0, heartbeat: float = 1.0,
            workdir: Path | None = None, *, code: Path) -> list[dict[str, float]]:
    """`runs` failovers on `cluster` with gateways that run `code` (bench_code.pytarget_code);
    one dict per run (seconds): stall (the longest write), takeover (kill to
    active/optimized), detect, fence, claim."""
    results = []
    images: list[str] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for n in range(runs):
            directory = Path(tmp) / f"run{n}"
            directory.mkdir()
            image = f"failover-{uuid.uuid4().hex[:10]}"
            lun = {"id": 0, "backstore": "rbd", "pool": cluster.pool, "image": image,
                   "conf": cluster.conf, "client_id": cluster.client_id, "size": "64MiB"}
            if cluster.keyring:
                lun["keyring"] = cluster.keyring
            config = directory / "pytarget.yaml"
            config.write_text(yaml.safe_dump({
                "gateways": [{"name": "gw1", "portals": ["127.0.0.1:0"]},
                             {"name": "gw2", "portals": ["127.0.0.1:0"]}],
                "failover": {"timeout": timeout, "heartbeat": heartbeat},
                "targets": [{"name": IQN, "luns": [lun]}]}, sort_keys=False))
            gateways = [start_gateway(config, "gw1", code), start_gateway(config, "gw2", code)]
            try:
                wait_claimed(gateways[0], time.monotonic() + 60)
                results.append(asyncio.run(one_run(*gateways)))
            finally:
                for gateway in gateways:
                    stop(gateway)
                images.append(image)
        remove_images(cluster, images)
    return results


def remove_images(cluster: Cluster, images: list[str]) -> None:
    """Remove the runs' images; a killed gateway's watch on an image keeps it busy until the
    OSD times the watch out (30 s)."""
    for image in images:
        deadline = time.monotonic() + 90
        while True:
            try:
                asyncio.run(remove_image(cluster.pool, image, conf=cluster.conf,
                                         keyring=cluster.keyring, client_id=cluster.client_id))
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    print(f"image {cluster.pool}/{image} left behind: {exc}", file=sys.stderr)
                    break
                time.sleep(2)


def wait_claimed(gw1: Gateway, deadline: float) -> None:
    """Until gw1 has claimed the LU (epoch 1 in its log)."""
    while "gw1 owns the LU from epoch 1" not in gw1.log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError("gw1 never claimed the LU")
        time.sleep(0.05)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    from tests.ceph_cluster import running
    with tempfile.TemporaryDirectory(prefix="pytarget-failover-") as tmp, \
            running(Path(tmp) / "ceph") as cluster:
        yield Cluster(str(cluster.conf), str(cluster.keyring), cluster.client_id,
                      cluster.pool)


def summary(results: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("stall", "takeover", "detect", "fence", "claim"):
        values = [r[key] for r in results if key in r]
        if values:
            out[key] = {"min": min(values), "median": statistics.median(values),
                        "max": max(values)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=8.0, help="failover.timeout")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="failover.heartbeat")
    parser.add_argument("--cluster", type=Path, help="a tools/ceph-cluster directory")
    parser.add_argument("--conf")
    parser.add_argument("--keyring")
    parser.add_argument("--client-id", default="admin")
    parser.add_argument("--pool", default="rbd")
    parser.add_argument("--json", action="store_true")
    add_pure_option(parser)
    args = parser.parse_args()
    code = chosen_code(parser, args)
    with contextlib.ExitStack() as stack:
        if args.conf:
            cluster = Cluster(args.conf, args.keyring, args.client_id, args.pool)
        elif args.cluster:
            cluster = Cluster(str(args.cluster / "ceph.conf"), str(args.cluster / "keyring"),
                              args.client_id, args.pool)
        else:
            cluster = stack.enter_context(throwaway_cluster())
        results = measure(cluster, args.runs, args.timeout, args.heartbeat, code=code)
    if args.json:
        print(json.dumps({"runs": results, "summary": summary(results)}, indent=2))
        return 0
    print(f"failover.timeout {args.timeout:g} s, heartbeat {args.heartbeat:g} s, pytarget's "
          f"data path {'pure Python' if args.pure else 'compiled (mypyc)'}")
    print("| run | longest write (s) | kill to active/optimized (s) | detection (s) | "
          "fencing (s) | claim (s) |")
    print("|---|---|---|---|---|---|")
    nan = float("nan")
    for n, r in enumerate(results, 1):
        print(f"| {n} | {r['stall']:.2f} | {r['takeover']:.2f} | {r.get('detect', nan):.2f} | "
              f"{r.get('fence', nan):.2f} | {r.get('claim', nan):.2f} |")
    for key, what in (("stall", "longest write"), ("takeover", "kill to active/optimized")):
        spread = summary(results)[key]
        print(f"{what}: min {spread['min']:.2f} s, median {spread['median']:.2f} s, "
              f"max {spread['max']:.2f} s over {len(results)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
