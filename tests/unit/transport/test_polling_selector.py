"""The event loop's polling selector: it polls before sleeping only while that can pay, and
always returns what epoll reports (real epoll on a socket pair; counts, not timings)."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from pytarget.transport import PollingSelector


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """The timeouts of every epoll wait the selector makes."""
    seen: list[float | None] = []
    real = selectors.EpollSelector.select

    def select(self: selectors.EpollSelector, timeout: float | None = None) -> list:
        seen.append(timeout)
        return real(self, timeout)

    monkeypatch.setattr(selectors.EpollSelector, "select", select)
    return seen


def make(sock: socket.socket, window: float, quiet: bool = True) -> PollingSelector:
    sel = PollingSelector(window, lambda: quiet)
    sel.register(sock, selectors.EVENT_READ)
    return sel


def test_ready_socket_is_returned_by_the_first_poll(pair, calls) -> None:
    a, b = pair
    sel = make(a, 0.001)
    b.send(b"x")
    ready = sel.select(None)
    assert [key.fileobj for key, _ in ready] == [a]
    assert calls == [0] and sel.misses == 0
    sel.close()


def test_polls_then_sleeps_for_the_rest_of_the_timeout(pair, calls) -> None:
    a, _ = pair
    sel = make(a, 0.0005)
    assert sel.select(0.002) == []
    assert len(calls) >= 2 and set(calls[:-1]) == {0}
    assert calls[-1] is not None and 0 <= calls[-1] < 0.002
    assert sel.misses == 1
    sel.close()


def test_stops_polling_after_missed_windows_until_traffic_returns(pair, calls) -> None:
    a, b = pair
    sel = make(a, 0.05)  # wide: the quick sleep below must end within it on a loaded machine
    for _ in range(PollingSelector.MAX_MISSES):
        sel.select(0.06)
    assert sel.misses == PollingSelector.MAX_MISSES
    calls.clear()
    assert sel.select(0.001) == []
    assert calls == [0.001]  # slept at once
    b.send(b"x")  # traffic that a window would have caught: a sleep that ends at once
    calls.clear()
    assert sel.select(1.0)
    assert calls == [1.0] and sel.misses == 0
    a.recv(1)
    calls.clear()
    sel.select(0.001)
    assert calls[0] == 0  # polling again
    sel.close()


@pytest.mark.parametrize("window,quiet", [(0.0, True), (0.001, False)])
def test_no_polling_when_off_or_not_quiet(pair, calls, window: float, quiet: bool) -> None:
    a, b = pair
    sel = make(a, window, quiet)
    assert sel.select(0.001) == []
    b.send(b"x")
    assert sel.select(None)
    assert calls == [0.001, None] and sel.misses == 0
    sel.close()


def test_a_zero_timeout_is_one_plain_poll(pair, calls) -> None:
    a, _ = pair
    sel = make(a, 0.001)
    assert sel.select(0) == []
    assert calls == [0] and sel.misses == 0
    sel.close()
