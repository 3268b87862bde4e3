"""The specification's rules as pure functions, and a property test against a reference model."""

from __future__ import annotations

from datetime import date, timedelta

from hypothesis import given
from hypothesis import strategies as st

from domain.status import ReasonCode
from domain.trade import Rejected, Trade, check_maturity, decide, head_after, maturity_passed

TODAY = date(2026, 11, 28)


def trade(version: int, maturity: date = TODAY, trade_id: str = "T1") -> Trade:
    return Trade(trade_id, version, "CP-1", "B1", maturity, TODAY)


def test_first_version_is_stored() -> None:
    assert decide(None, trade(1), TODAY) is None


def test_higher_version_is_stored() -> None:
    assert decide(1, trade(2), TODAY) is None


def test_same_version_is_stored_again() -> None:
    assert decide(2, trade(2), TODAY) is None


def test_lower_version_is_stale() -> None:
    decision = decide(2, trade(1), TODAY)
    assert isinstance(decision, Rejected)
    assert decision.code is ReasonCode.STALE_VERSION
    assert "lower than stored version 2" in decision.message


def test_maturity_before_today_is_rejected() -> None:
    decision = decide(None, trade(1, TODAY - timedelta(days=1)), TODAY)
    assert decision == check_maturity(trade(1, TODAY - timedelta(days=1)), TODAY)
    assert isinstance(decision, Rejected)
    assert decision.code is ReasonCode.MATURITY_PASSED


def test_maturity_today_is_accepted() -> None:
    assert check_maturity(trade(1, TODAY), TODAY) is None
    assert not maturity_passed(TODAY, TODAY)
    assert maturity_passed(TODAY - timedelta(days=1), TODAY)


def test_stale_wins_over_maturity() -> None:
    decision = decide(3, trade(1, TODAY - timedelta(days=1)), TODAY)
    assert isinstance(decision, Rejected)
    assert decision.code is ReasonCode.STALE_VERSION


def test_head_after_keeps_head_on_rejection() -> None:
    stale = trade(1)
    assert head_after(2, stale, decide(2, stale, TODAY)) == 2
    assert head_after(None, trade(3), None) == 3
    assert head_after(3, trade(3), None) == 3
    assert head_after(2, trade(3), None) == 3


submission = st.tuples(st.integers(1, 6), st.integers(-3, 3))


def reference_model(trades: list[Trade]) -> tuple[dict[int, Trade], list[str]]:
    """The specification read literally, over a store of rows by version."""
    store: dict[int, Trade] = {}
    outcomes = []
    for t in trades:
        if store and t.version < max(store):
            outcomes.append("STALE_VERSION")
        elif t.maturity_date < TODAY:
            outcomes.append("MATURITY_PASSED")
        else:
            store[t.version] = t
            outcomes.append("SUCCESS")
    return store, outcomes


@given(st.lists(submission, max_size=40))
def test_matches_reference_model(submissions: list[tuple[int, int]]) -> None:
    """For any sequence of one trade_id's submissions, stored rows and outcomes match a model."""
    trades = [
        Trade("T", version, f"CP-{i}", "B", TODAY + timedelta(days=offset), TODAY)
        for i, (version, offset) in enumerate(submissions)
    ]
    stored: dict[int, Trade] = {}
    outcomes = []
    head: int | None = None
    for t in trades:
        decision = decide(head, t, TODAY)
        head = head_after(head, t, decision)
        if decision is None:
            stored[t.version] = t
            outcomes.append("SUCCESS")
        else:
            outcomes.append(decision.code.value)
    assert (stored, outcomes) == reference_model(trades)
    assert head == (max(stored) if stored else None)
