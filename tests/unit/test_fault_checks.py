"""The fault suite's own verdicts, on a hand-made run: a check that misjudges what the
broker did would fail the suite for the wrong reason, or pass it for one."""

from __future__ import annotations

import json
from collections import Counter

from domain.dead_letter import OFFSET_HEADER, PARTITION_HEADER
from tests.faults.harness import (
    LATE,
    Figures,
    Ledger,
    Outcome,
    Record,
    Sent,
    Stored,
    check_exact_503,
    check_no_orphans,
)

DEADLINE = 10_000


def record(offset: int, appended_ms: int, rid: str = "r1") -> Record:
    value = json.dumps({"trade": {"counterparty_id": "C1"}}).encode()
    headers = {"queue_deadline_ms": str(DEADLINE).encode(), "request_id": rid.encode()}
    return Record(0, offset, b"T1", value, headers, appended_ms)


def refused_as_late(copy: Record) -> Record:
    headers = {
        **copy.headers,
        "dlq_reason": LATE + b": appended 500 ms after its deadline",
        PARTITION_HEADER: str(copy.partition).encode(),
        OFFSET_HEADER: str(copy.offset).encode(),
    }
    return Record(0, 0, copy.key, copy.value, headers)


def run(inbound: list[Record], dead_letters: list[Record], stored: bool) -> Outcome:
    ledger = Ledger("F")
    ledger.sent.append(Sent(0, "T1", 1, "C1", False, 0.0, 5.0, 503))
    rows = {("T1", 1): {"counterparty_id": "C1"}} if stored else {}
    statuses = {"r1": {"status": "SUCCESS"}} if stored else {}
    return Outcome(
        ledger,
        None,
        statuses,
        Stored(rows, Counter()),
        inbound,
        dead_letters,
        {},
        set(),  # type: ignore[arg-type]
    )


def test_an_ack_lost_in_time_with_a_late_retry_refused_is_the_admitted_window() -> None:
    """Seen with a killed broker: the first append (in time) lost its ack, the producer's
    retry landed late; the dataflow took the first and refused the second."""
    in_time, retry = record(1, DEADLINE - 100), record(2, DEADLINE + 500)
    out = run([in_time, retry], [refused_as_late(retry)], stored=True)
    figures = Figures(fault="test")
    assert check_exact_503(out, figures) == []
    assert check_no_orphans(out, figures) == []
    assert (figures.ack_lost_after_503, figures.late_after_503) == (1, 1)


def test_a_late_copy_the_dataflow_took_breaks_the_503() -> None:
    late = record(1, DEADLINE + 500)
    out = run([late], [], stored=True)
    assert check_exact_503(out, Figures(fault="test"))


def test_a_late_copy_refused_and_nothing_stored_is_exact() -> None:
    late = record(1, DEADLINE + 500)
    figures = Figures(fault="test")
    assert check_exact_503(run([late], [refused_as_late(late)], stored=False), figures) == []
    assert figures.late_after_503 == 1
