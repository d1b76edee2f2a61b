"""The in-memory harness's event loop ends with the tests: commands a test left waiting (a
held command, a write whose Data-Out never came) are cancelled and the loop closed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from .harness import LOOP


@pytest.fixture(scope="session", autouse=True)
def _close_harness_loop() -> Iterator[None]:
    yield
    pending = asyncio.all_tasks(LOOP)
    for task in pending:
        task.cancel()
    if pending:
        LOOP.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    LOOP.close()
