"""Retry with backoff: outages are waited out with capped exponential delays, bugs escalate."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from adapters.retry import until_available
from domain.ports import Unavailable


def failing(times: int, error: Exception) -> tuple[list[int], Callable[[], str]]:
    """An action that raises ``error`` ``times`` times, then returns "done"; and its calls."""
    calls: list[int] = []

    def action() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return calls, action


def test_delays_double_up_to_the_cap_and_stay_there() -> None:
    calls, action = failing(8, Unavailable("down"))
    slept: list[float] = []
    result = until_available(action, "store", first_delay=0.1, max_delay=1.0, sleep=slept.append)
    assert result == "done"
    assert len(calls) == 9
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_the_defaults_cap_at_five_seconds() -> None:
    _, action = failing(10, Unavailable("down"))
    slept: list[float] = []
    until_available(action, "store", sleep=slept.append)
    assert slept[0] == pytest.approx(0.1)
    assert max(slept) == pytest.approx(5.0)
    assert slept[-3:] == pytest.approx([5.0, 5.0, 5.0])


def test_only_outages_are_retried() -> None:
    calls, action = failing(1, ValueError("a bug, not an outage"))
    slept: list[float] = []
    with pytest.raises(ValueError, match="a bug"):
        until_available(action, "store", sleep=slept.append)
    assert calls == [1]
    assert slept == []


def test_success_first_time_does_not_sleep() -> None:
    slept: list[float] = []
    assert until_available(lambda: 42, "store", sleep=slept.append) == 42
    assert slept == []
