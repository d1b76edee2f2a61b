"""The bounded pool of I/O threads that runs blocking backstore calls off the event loop.

One pool serves every logical unit. `run_blocking` is how a backstore (or the device server)
hands blocking work to it; a backstore whose media complete I/O on threads of their own (librbd
callbacks) counts that work with `io_started`/`io_finished`, so that `io_threads_busy` tells the
event loop's polling selector when a result is on its way from another thread
(docs/performance.md, "Polling before sleeping").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

IO_THREADS = 8

_executor: ThreadPoolExecutor | None = None
_io_jobs = 0  # handed to other threads and not yet handed back to the event loop


def io_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="pytarget-io")
    return _executor


def io_threads_busy() -> bool:
    """Whether other threads hold work whose result the event loop is waiting for."""
    return _io_jobs > 0


def io_started() -> None:
    """Count one piece of work another thread will complete for the event loop."""
    global _io_jobs
    _io_jobs += 1


def io_finished(_: object = None) -> None:
    """The work counted by `io_started` is back on the event loop (a done callback)."""
    global _io_jobs
    _io_jobs -= 1


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on an I/O thread; a cancelled caller still waits for it to end, since
    the work may be using the caller's buffers."""
    global _io_jobs
    fut = asyncio.get_running_loop().run_in_executor(io_executor(), fn, *args)
    _io_jobs += 1
    fut.add_done_callback(io_finished)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        raise
