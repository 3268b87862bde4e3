"""The replay phase's arithmetic and report: the figures come from the replay's own
``replay finished`` log line, the replay is verified against the sink's plan and the live
store's row count, and the table and the exit status carry the verdict."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.replay import check, expected_decisions, figures, finished
from bench.report import markdown, targets_for
from bench.run import failed
from bench.sink import make_plan

PLAN = make_plan(400, "t")
DECISIONS = {"SUCCESS": len(PLAN.rows), "FAILED/STALE_VERSION": PLAN.counts["stale"]}


def finished_line(**fields: Any) -> str:
    record = {
        "event": "replay finished",
        "level": "info",
        "read": 400,
        "planned": 400,
        "elapsed_s": 0.5,
        "decisions": DECISIONS,
        **fields,
    }
    return json.dumps(record)


def test_the_finished_line_is_found_among_the_plan_progress_and_summary() -> None:
    log = "\n".join(
        [
            "replay plan: inbound log /tmp/x -> sqlite:////tmp/t.db (statuses: skip)",
            json.dumps({"event": "replay progress", "done": 200, "total": 400}),
            "{not json",
            "replay finished in 0.5 s: 400 of 400 records read (800/s)",
            finished_line(elapsed_s=0.25),
        ]
    )
    report = finished(log)
    assert report is not None
    assert report["elapsed_s"] == 0.25
    assert report["decisions"] == DECISIONS


def test_an_interrupted_or_failed_replay_has_no_finished_line() -> None:
    interrupted = json.dumps({"event": "replay interrupted", "read": 10, "planned": 400})
    assert finished(interrupted + "\nTraceback (most recent call last):") is None
    assert finished("") is None


def test_the_plan_expects_its_successes_and_stale_versions() -> None:
    assert expected_decisions(PLAN) == DECISIONS
    assert sum(DECISIONS.values()) == 400
    assert PLAN.counts["stale"] > 0


def test_a_whole_replay_with_the_live_row_count_is_verified() -> None:
    rows = PLAN.expected_rows
    assert check(finished(finished_line()), 0, 400, DECISIONS, rows, rows) == []


@pytest.mark.parametrize(
    ("report", "exit_code", "target_rows", "wrong"),
    [
        (finished_line(), 130, 100, "exit status 130"),
        (finished_line(), None, 100, "exit status None"),
        ("", 0, 100, "no 'replay finished' log line"),
        (finished_line(read=399), 0, 100, "read 399 of 400 planned records, 400 queued"),
        (finished_line(planned=300, read=300), 0, 100, "read 300 of 300"),
        (finished_line(decisions={"SUCCESS": 400}), 0, 100, "decisions {'SUCCESS': 400} !="),
        (finished_line(), 0, 99, "target trades rows 99 != live store's 100"),
    ],
)
def test_each_way_a_replay_can_go_wrong_is_named(
    report: str, exit_code: int | None, target_rows: int, wrong: str
) -> None:
    problems = check(finished(report), exit_code, 400, DECISIONS, target_rows, 100)
    assert len(problems) == 1
    assert problems[0].startswith(wrong)


def test_the_rate_is_the_replays_own_and_the_wall_rate_includes_start_up() -> None:
    got = figures(finished(finished_line(read=20_000, elapsed_s=2.0)), wall_s=8.0, cpu_s=4.0)
    assert got == {
        "replay_rate": 10_000.0,
        "replay_rate_incl_startup": 2_500.0,
        "records": 20_000,
        "elapsed_s": 2.0,
        "wall_s": 8.0,
        "replay_cpu_us_per_record": 200.0,
    }


def test_a_replay_without_its_finished_line_has_no_rate() -> None:
    got = figures(None, wall_s=3.0, cpu_s=1.0)
    assert got["replay_rate"] is None
    assert got["replay_rate_incl_startup"] is None
    assert got["replay_cpu_us_per_record"] is None
    assert got["records"] is None
    assert got["wall_s"] == 3.0


def document(**fields: Any) -> dict[str, Any]:
    doc = {"profile": "embedded", "mode": "quick", "generator": {"name": "vegeta"}, **fields}
    doc["targets"] = targets_for(doc)
    return doc


def test_the_table_shows_the_ratio_against_its_target_and_the_verdict() -> None:
    table = markdown(
        document(replay_rate=9_000.0, replay_vs_sink=0.9, replay_verified=True, phases={})
    )
    assert "| replay_rate (÷ sink_rate) | 9,000/s (0.9) | ≥ 0.8 (issue 13) | yes |" in table
    assert "| replay store verified (rows = live store's) | yes |" in table
    failed = markdown(document(replay_rate=5_000.0, replay_vs_sink=0.5, replay_verified=False))
    assert "| 5,000/s (0.5) | ≥ 0.8 (issue 13) | **no** |" in failed
    assert "| replay store verified (rows = live store's) | **NO** |" in failed


def test_a_replay_that_did_not_verify_fails_the_run() -> None:
    assert failed({"errors": [], "sink_verified": True, "replay_verified": False})
    assert not failed({"errors": [], "sink_verified": True, "replay_verified": True})
    assert not failed({"errors": [], "replay_verified": None})  # the phase did not run
    assert failed({"errors": ["replay: RuntimeError: ..."]})
