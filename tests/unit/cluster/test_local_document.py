"""`LocalDocument`, the shared document of the worker processes: versions and stale updates,
a change that returns only once the other subscriber has handled it, trust lost on a notice
and on a lost relay, a damaged file refused, and compare-and-update exclusion between two
real processes."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pytarget.cluster.local import LocalDocument, remove_document
from pytarget.core.reservations import StaleVersion


class Hub:
    """Relays between documents of one process, as the parent relays between workers."""

    def __init__(self) -> None:
        self.ends: list[End] = []

    def end(self) -> End:
        end = End(self)
        self.ends.append(end)
        return end


class End:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.up = True
        self.watchers: dict[str, list[Callable[[], Awaitable[None]]]] = {}

    def connected(self) -> bool:
        return self.up

    def watch(self, key: str, on_notice: Callable[[], Awaitable[None]]) -> None:
        self.watchers.setdefault(key, []).append(on_notice)

    async def announce(self, key: str, version: int) -> None:
        for other in self.hub.ends:
            if other is not self:
                for on_notice in other.watchers.get(key, []):
                    await on_notice()


def test_versions_and_stale_updates(tmp_path: Path) -> None:
    async def go() -> None:
        doc = LocalDocument(tmp_path / "lun0.workers.pr")
        snapshot = await doc.load()
        assert (snapshot.version, snapshot.document) == (0, None)
        assert doc.trusted()
        assert await doc.update(0, b"first") == 1
        assert await doc.update(1, b"second") == 2
        with pytest.raises(StaleVersion):
            await doc.update(1, b"late")
        snapshot = await LocalDocument(tmp_path / "lun0.workers.pr").load()
        assert (snapshot.version, snapshot.document) == (2, b"second")
        doc.close()

    asyncio.run(go())


def test_update_returns_after_the_other_handled_it(tmp_path: Path) -> None:
    async def go() -> None:
        hub = Hub()
        path = tmp_path / "lun0.workers.pr"
        a, b = LocalDocument(path, hub.end()), LocalDocument(path, hub.end())
        seen: list[tuple[int, bytes | None, bool]] = []

        async def b_changed() -> None:
            seen.append((-1, None, b.trusted()))  # untrusted before it re-reads
            snapshot = await b.load()
            seen.append((snapshot.version, snapshot.document, b.trusted()))

        b.subscribe(b_changed)
        a.subscribe(lambda: asyncio.sleep(0))
        await a.load()
        await b.load()
        assert await a.update(0, b"registered") == 1
        assert seen == [(-1, None, False), (1, b"registered", True)]
        assert a.trusted()

    asyncio.run(go())


def test_a_lost_relay_is_not_trusted(tmp_path: Path) -> None:
    async def go() -> None:
        end = Hub().end()
        doc = LocalDocument(tmp_path / "doc", end)
        await doc.load()
        assert doc.trusted()
        end.up = False
        assert not doc.trusted()

    asyncio.run(go())


def test_a_damaged_document_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "doc"
    path.write_bytes(b"\x00\x01")
    with pytest.raises(OSError, match="truncated"):
        asyncio.run(LocalDocument(path).load())
    remove_document(path)
    assert not path.exists() and not Path(f"{path}.lock").exists()


def _count(path: str, times: int) -> None:
    async def go() -> None:
        doc = LocalDocument(path)
        done = 0
        while done < times:
            snapshot = await doc.load()
            value = int(snapshot.document or b"0")
            try:
                await doc.update(snapshot.version, str(value + 1).encode())
            except StaleVersion:
                continue
            done += 1

    asyncio.run(go())


def test_two_processes_never_lose_an_update(tmp_path: Path) -> None:
    path = str(tmp_path / "counter")
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=_count, args=(path, 40)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    snapshot = asyncio.run(LocalDocument(path).load())
    assert (snapshot.version, snapshot.document) == (80, b"80")
