"""What until_available and the watchdog log, on a fake clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import pairwise

import pytest
import structlog
from structlog.testing import LogCapture

from adapters.retry import Watchdog, until_available
from domain.ports import Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def cap(monkeypatch: pytest.MonkeyPatch) -> LogCapture:
    cap = LogCapture()
    monkeypatch.setattr("adapters.retry.log", structlog.wrap_logger(None, processors=[cap]))
    return cap


def failing(times: int) -> Callable[[], str]:
    calls = 0

    def action() -> str:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise Unavailable(f"down ({calls})")
        return "done"

    return action


def test_an_outage_logs_its_start_then_at_most_one_line_per_10_s_then_its_end(
    cap: LogCapture,
) -> None:
    clock = Clock()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.sleep(seconds)

    action = failing(60)
    assert until_available(action, "trade store", sleep=sleep, clock=clock) == "done"

    # Backoff doubles from 0.1 s and is capped at 5 s.
    assert sleeps[:7] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert set(sleeps[7:]) == {5.0}
    outage = sum(sleeps)
    events = [e["event"] for e in cap.entries]
    assert events[0] == "dependency unavailable, retrying"
    assert cap.entries[0]["error"] == "down (1)"
    assert events[-1] == "dependency available again"
    assert cap.entries[-1]["attempts"] == 61
    assert cap.entries[-1]["outage_s"] == round(outage, 1)
    middle = cap.entries[1:-1]
    assert {e["event"] for e in middle} == {"dependency still unavailable"}
    # 60 failures over ~290 s: one line per 10 s, not one per attempt.
    assert len(middle) <= outage / 10
    assert len(middle) >= outage / 10 - 2
    stamps = [e["outage_s"] for e in middle]
    assert all(b - a > 9.9 for a, b in pairwise(stamps))
    assert all(e["what"] == "trade store" for e in cap.entries)


def test_a_call_that_succeeds_logs_nothing(cap: LogCapture) -> None:
    assert until_available(lambda: 7, "trade store", sleep=pytest.fail) == 7
    assert cap.entries == []


def test_other_errors_escalate_at_once(cap: LogCapture) -> None:
    def broken() -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        until_available(broken, "trade store", sleep=pytest.fail)
    assert cap.entries == []


def test_a_blocked_call_is_logged_after_5_s_then_every_10_s_and_when_it_ends(
    cap: LogCapture,
) -> None:
    clock = Clock()
    watchdog = Watchdog(clock, check_every_s=None)
    with watchdog.watching("status store"):
        for now in (1004.9, 1005.0, 1014.9, 1015.0, 1016.0):
            clock.now = now
            watchdog.check()
        clock.now = 1017.0
    assert [(e["event"], e.get("blocked_s")) for e in cap.entries] == [
        ("dependency call blocked", 5.0),
        ("dependency call blocked", 15.0),
        ("dependency call ended", 17.0),
    ]
    watchdog.check()  # nothing in flight any more
    assert len(cap.entries) == 3


def test_calls_blocked_in_turn_on_one_dependency_give_one_line_per_10_s(
    cap: LogCapture,
) -> None:
    """A frozen dependency: each attempt blocks until its own timeout, then is retried."""
    clock = Clock()
    watchdog = Watchdog(clock, check_every_s=None)
    for _ in range(10):  # 10 attempts of 6 s each
        with watchdog.watching("trade store"):
            for _ in range(6):
                clock.now += 1
                watchdog.check()
    blocked = [e["blocked_s"] for e in cap.entries if e["event"] == "dependency call blocked"]
    assert blocked == [5.0] * 5  # at 5, 17, 29, 41 and 53 s of the 60
    assert [e["event"] for e in cap.entries].count("dependency call ended") == 5
    with watchdog.watching("status store"):  # another dependency has its own limit
        clock.now += 5
        watchdog.check()
    assert [(e["event"], e["what"]) for e in cap.entries[-2:]] == [
        ("dependency call blocked", "status store"),
        ("dependency call ended", "status store"),
    ]


def test_until_available_tells_the_watchdog_what_it_waits_on(cap: LogCapture) -> None:
    clock = Clock()
    watchdog = Watchdog(clock, check_every_s=None)

    def hangs_for_a_while() -> str:
        clock.now += 6
        watchdog.check()
        return "late"

    assert until_available(hangs_for_a_while, "trade store", watchdog=watchdog) == "late"
    assert [(e["event"], e["what"]) for e in cap.entries] == [
        ("dependency call blocked", "trade store"),
        ("dependency call ended", "trade store"),
    ]


def test_quick_calls_are_never_reported(cap: LogCapture) -> None:
    clock = Clock()
    watchdog = Watchdog(clock, check_every_s=None)
    for _ in range(3):
        with watchdog.watching("trade store"):
            clock.now += 4.9
            watchdog.check()
    assert cap.entries == []


def test_the_watchdog_thread_reports_a_real_blocked_call(cap: LogCapture) -> None:
    watchdog = Watchdog(check_every_s=0.01, blocked_after_s=0.05)
    until_available(lambda: time.sleep(0.3), "trade store", watchdog=watchdog)
    assert [e["event"] for e in cap.entries] == [
        "dependency call blocked",
        "dependency call ended",
    ]


def test_the_outage_counts_from_the_start_of_the_call_that_failed(cap: LogCapture) -> None:
    """A frozen store's first call blocks until its timeout before it fails."""
    clock = Clock()
    calls = 0

    def times_out_once() -> str:
        nonlocal calls
        calls += 1
        clock.now += 7
        if calls == 1:
            raise Unavailable("no reply in 7 s")
        return "done"

    until_available(times_out_once, "trade store", sleep=clock.sleep, clock=clock)
    assert cap.entries[-1]["event"] == "dependency available again"
    assert cap.entries[-1]["outage_s"] == 14.1  # 7 s blocked, 0.1 s backoff, 7 s to answer
