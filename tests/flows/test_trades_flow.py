"""The dataflow's decisions, ordering, dead letters and recovery, without external services."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main

from dataflows.trades import KEY_SLOTS, WithHead, decide_in_order
from domain.message import decode
from domain.ports import Unavailable
from domain.status import ReasonCode, RequestState, RequestStatus
from domain.trade import Trade
from tests.fakes import FakeDecisionLog
from tests.flows.conftest import TODAY, Pipeline, Record, Runner, record
from tests.support import upsert


def states(p: Pipeline) -> dict[str, tuple[str, str | None]]:
    return {
        rid: (s.state.value, s.reason_code.value if s.reason_code else None)
        for rid, s in p.statuses.items.items()
    }


def test_specification_rules(pipeline: Pipeline, runner: Runner) -> None:
    items = [
        record("r1", "T1", 1),
        record("r2", "T2", 2),
        record("r3", "T2", 1),  # lower than stored: stale
        record("r4", "T2", 2, counterparty="CP-9"),  # same: replaces
        record("r5", "T3", 3, maturity=TODAY - timedelta(days=1)),  # matured
        record("r6", "T1", 5),  # higher: new row
    ]
    runner(pipeline.flow(items))
    assert states(pipeline) == {
        "r1": ("SUCCESS", None),
        "r2": ("SUCCESS", None),
        "r3": ("FAILED", "STALE_VERSION"),
        "r4": ("SUCCESS", None),
        "r5": ("FAILED", "MATURITY_PASSED"),
        "r6": ("SUCCESS", None),
    }
    assert sorted(pipeline.trades.rows) == [("T1", 1), ("T1", 5), ("T2", 2)]
    assert pipeline.trades.rows[("T2", 2)].trade.counterparty_id == "CP-9"


def test_decision_uses_accepted_date_not_today(pipeline: Pipeline, runner: Runner) -> None:
    """Replaying a message later gives the decision it got when accepted."""
    long_ago = TODAY - timedelta(days=400)
    runner(pipeline.flow([record("r1", "T1", 1, maturity=long_ago, accepted_on=long_ago)]))
    assert states(pipeline) == {"r1": ("SUCCESS", None)}


def test_per_trade_order_across_batches_and_workers(pipeline: Pipeline, runner: Runner) -> None:
    versions = [1, 2, 2, 1, 3, 2, 4, 4, 1, 5]
    items = []
    for n in range(20):
        items += [record(f"{n}-{i}", f"T{n}", v) for i, v in enumerate(versions)]
    runner(pipeline.flow(items, batch_size=7))
    for n in range(20):
        got = [pipeline.statuses.items[f"{n}-{i}"].state for i in range(len(versions))]
        assert got == [
            RequestState.SUCCESS if ok else RequestState.FAILED
            for ok in [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
        ]
        assert [v for t, v in pipeline.trades.rows if t == f"T{n}"] == [1, 2, 3, 4, 5]


def test_unseen_trade_ids_are_decided_against_the_store(pipeline: Pipeline, runner: Runner) -> None:
    """Lost recovery state: the store is the truth for a trade_id the flow has not seen."""
    upsert(pipeline.trades, [Trade("T1", 3, "CP", "B", TODAY, TODAY)])
    looked_up: list[list[str]] = []
    original = pipeline.trades.heads

    def spy(trade_ids: Collection[str]) -> dict[str, int]:
        looked_up.append(sorted(trade_ids))
        return original(trade_ids)

    pipeline.trades.heads = spy  # type: ignore[method-assign]
    items = [record("r1", "T1", 2), record("r2", "T1", 3), record("r3", "T9", 1)]
    runner(pipeline.flow(items, batch_size=3))
    assert states(pipeline) == {
        "r1": ("FAILED", "STALE_VERSION"),
        "r2": ("SUCCESS", None),
        "r3": ("SUCCESS", None),
    }
    # One bulk lookup per batch, not one per message, however many workers: the batch is
    # looked up where the source read it, before it is routed to workers by trade_id.
    assert looked_up == [["T1", "T9"]]


def test_store_guard_overrides_a_diverged_decision(
    pipeline: Pipeline, runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the store gained a higher version behind the flow's back, the request is FAILED."""
    original_upsert = FakeDecisionLog.upsert

    def sneaky_upsert(log: FakeDecisionLog, trades: Sequence[Trade]) -> set[tuple[str, int]]:
        original_upsert(log, [Trade("T1", 9, "CP", "B", TODAY, TODAY)])
        return original_upsert(log, trades)

    monkeypatch.setattr(FakeDecisionLog, "upsert", sneaky_upsert)
    runner(pipeline.flow([record("r1", "T1", 1)]))
    assert states(pipeline) == {"r1": ("FAILED", "STALE_VERSION")}


def pending(p: Pipeline, rid: str, trade_id: str = "k", version: int = 1) -> None:
    """A PENDING record as the API writes it before queueing."""
    at = datetime(2026, 11, 28, tzinfo=UTC)
    p.statuses.items[rid] = RequestStatus(rid, RequestState.PENDING, trade_id, version, at, at)


def test_bad_data_goes_to_dead_letters_and_flow_continues(
    pipeline: Pipeline, runner: Runner
) -> None:
    pending(pipeline, "bad-1", "k", 4)
    items = [
        Record(b"k", b"not json", [("request_id", b"bad-1"), ("correlation_id", b"c")], "in", 3, 7),
        Record(None, None, []),
        Record(b"k", b"{", [("request_id", b"never-issued")]),
        record("r1", "T1", 1),
    ]
    runner(pipeline.flow(items))
    assert [d.reason for d in pipeline.dead] == [
        "value is not JSON",
        "value is not a JSON object",
        "value is not JSON",
    ]
    assert pipeline.dead[0].kafka_headers() == [
        ("request_id", b"bad-1"),
        ("correlation_id", b"c"),
        ("dlq_reason", b"value is not JSON"),
        ("__connect.errors.topic", b"in"),
        ("__connect.errors.partition", b"3"),
        ("__connect.errors.offset", b"7"),
    ]
    assert pipeline.dead[0].correlation_id == "c"
    # Only the PENDING record turns FAILED, keeping its trade and version; no record is
    # created for an id the API never issued.
    assert states(pipeline) == {
        "bad-1": ("FAILED", ReasonCode.INVALID_MESSAGE.value),
        "r1": ("SUCCESS", None),
    }
    failed = pipeline.statuses.items["bad-1"]
    assert (failed.trade_id, failed.version) == ("k", 4)
    assert pipeline.trades.log["never-issued"].reason_code is ReasonCode.INVALID_MESSAGE


def test_dead_letter_naming_a_decided_request_changes_nothing(
    pipeline: Pipeline, runner: Runner
) -> None:
    """A record forging the request_id of a request already SUCCESS, with a body that
    cannot be read, goes to the dead letters; the request stays SUCCESS, in the log too."""
    runner(pipeline.flow([record("r1", "T1", 1)]))
    before = pipeline.statuses.items["r1"]
    forged = Record(b"T1", b"{", [("request_id", b"r1")])
    runner(pipeline.flow([forged, record("r2", "T1", 2)]))
    assert [d.reason for d in pipeline.dead] == ["value is not JSON"]
    assert pipeline.statuses.items["r1"] == before
    assert pipeline.trades.log["r1"].state is RequestState.SUCCESS
    assert states(pipeline)["r2"] == ("SUCCESS", None)


def test_outage_is_retried_not_dropped(pipeline: Pipeline) -> None:
    """A store that fails twice then recovers: the flow waits, then writes everything."""
    failures = {"left": 2}
    original = pipeline.trades.transaction

    def flaky() -> AbstractContextManager[FakeDecisionLog]:
        if failures["left"]:
            failures["left"] -= 1
            raise Unavailable("fake trade store is down")
        return original()

    pipeline.trades.transaction = flaky  # type: ignore[method-assign]
    run_main(pipeline.flow([record("r1", "T1", 1), record("r2", "T1", 2)]))
    assert failures["left"] == 0
    assert states(pipeline) == {"r1": ("SUCCESS", None), "r2": ("SUCCESS", None)}


def test_abort_and_resume_is_idempotent(pipeline: Pipeline, tmp_path: Path) -> None:
    """Crash mid-stream, resume from the snapshot: same store, same statuses, nothing twice."""
    init_db_dir(tmp_path, 1)
    recovery = RecoveryConfig(tmp_path)
    items = [
        record("r1", "T1", 1),
        record("r2", "T1", 2),
        TestingSource.ABORT(),
        record("r3", "T1", 1),
        record("r4", "T1", 3),
    ]
    flow = pipeline.flow(items, batch_size=1)
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    assert "r3" not in pipeline.statuses.items
    run_main(flow, epoch_interval=timedelta(0), recovery_config=recovery)
    assert states(pipeline) == {
        "r1": ("SUCCESS", None),
        "r2": ("SUCCESS", None),
        "r3": ("FAILED", "STALE_VERSION"),
        "r4": ("SUCCESS", None),
    }
    assert sorted(pipeline.trades.rows) == [("T1", 1), ("T1", 2), ("T1", 3)]


def test_crash_between_commit_and_status_then_replay(pipeline: Pipeline) -> None:
    """Rows committed, statuses never written, recovery state lost: the replay must still
    report what was decided the first time (the decision log), not re-decide against a
    store that already holds later versions."""
    items = [record("r1", "T1", 1), record("r2", "T1", 2), record("r3", "T1", 1)]
    original = pipeline.statuses.write_outcomes

    def crash(_: object) -> None:
        raise RuntimeError("killed before the status write")

    pipeline.statuses.write_outcomes = crash  # type: ignore[assignment,method-assign]
    with pytest.raises(RuntimeError):
        run_main(pipeline.flow(items, batch_size=3))
    assert sorted(pipeline.trades.rows) == [("T1", 1), ("T1", 2)]
    assert pipeline.statuses.items == {}

    pipeline.statuses.write_outcomes = original  # type: ignore[method-assign]
    run_main(pipeline.flow(items, batch_size=1))
    assert states(pipeline) == {
        "r1": ("SUCCESS", None),
        "r2": ("SUCCESS", None),
        "r3": ("FAILED", "STALE_VERSION"),
    }


def test_large_batches_are_written_in_pipelined_chunks(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk n+1 is committed while chunk n's outcomes are written; all land, in order."""
    monkeypatch.setattr("sinks.stores.CHUNK", 3)
    items = [record(f"r{v}", "T1", v) for v in range(1, 11)] + [record("stale", "T1", 2)]
    run_main(pipeline.flow(items, batch_size=11))
    assert {rid: s for rid, (s, _) in states(pipeline).items()} == {
        **{f"r{v}": "SUCCESS" for v in range(1, 11)},
        "stale": "FAILED",
    }


def test_decisions_chain_through_a_batch_per_trade_id() -> None:
    """Each message is decided against what its trade_id's earlier messages left, never
    against another trade_id's, and never below a head the store reported."""

    def item(rid: str, trade_id: str, version: int, head: int | None) -> WithHead:
        return WithHead(decode(record(rid, trade_id, version).value), head)

    decided = decide_in_order(
        [
            item("a", "T1", 2, None),
            item("b", "T2", 1, None),
            item("c", "T1", 1, None),  # below T1's accepted 2
            item("d", "T2", 1, None),  # same as T2's accepted 1: replaces
            item("e", "T1", 3, 4),  # a later lookup saw 4 stored
        ]
    )
    assert [(d.message.request_id, d.accepted) for d in decided] == [
        ("a", True),
        ("b", True),
        ("c", False),
        ("d", True),
        ("e", False),
    ]


def test_recovery_state_does_not_grow_with_trade_ids(pipeline: Pipeline, tmp_path: Path) -> None:
    """The decide step keeps nothing between batches: its recovery rows are bounded by the
    key slots, whatever the number of trade_ids, and hold no state."""
    init_db_dir(tmp_path, 1)
    items = [record(f"r{i}", f"T{i}", 1) for i in range(2 * KEY_SLOTS + 100)]
    run_main(
        pipeline.flow(items, batch_size=100),
        epoch_interval=timedelta(0),
        recovery_config=RecoveryConfig(tmp_path),
    )
    assert len(pipeline.trades.rows) == len(items)
    (part,) = tmp_path.iterdir()
    with sqlite3.connect(part) as db:
        rows, states = db.execute(
            "SELECT count(DISTINCT state_key), count(ser_change) FROM snaps"
            " WHERE step_id LIKE 'trades.decide%'"
        ).fetchone()
    assert 0 < rows <= KEY_SLOTS
    assert states == 0
