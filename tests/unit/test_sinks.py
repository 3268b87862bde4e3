"""What the trade sink logs per decided request."""

from __future__ import annotations

import logging

import pytest
import structlog
from structlog.testing import LogCapture

from domain.status import Outcome, ReasonCode, RequestState
from sinks.stores import log_outcomes

OUTCOMES = [
    Outcome("r1", "T1", 2, RequestState.SUCCESS),
    Outcome("r2", "T1", 1, RequestState.FAILED, ReasonCode.STALE_VERSION, "lower"),
]


def capture(monkeypatch: pytest.MonkeyPatch, level: int) -> LogCapture:
    cap = LogCapture()
    logger = structlog.wrap_logger(
        None, processors=[cap], wrapper_class=structlog.make_filtering_bound_logger(level)
    )
    monkeypatch.setattr("sinks.stores.log", logger)
    return cap


def test_failed_requests_are_logged_with_their_correlation_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = capture(monkeypatch, logging.INFO)
    log_outcomes(OUTCOMES, {"r1": "c1", "r2": "c2"})
    assert [(e["request_id"], e["correlation_id"], e["reason_code"]) for e in cap.entries] == [
        ("r2", "c2", "STALE_VERSION")
    ]


def test_successes_are_logged_only_at_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    cap = capture(monkeypatch, logging.DEBUG)
    log_outcomes(OUTCOMES, {"r1": "c1", "r2": "c2"})
    assert [(e["request_id"], e["log_level"]) for e in cap.entries] == [
        ("r1", "debug"),
        ("r2", "info"),
    ]
