"""The scale phase's arithmetic and report: a cluster's clock starts when its last process
is up, each shape's sink_rate is set against one process of one worker beside the CPU it
spent per trade, and the markdown table carries every shape and the replay ratio's place."""

from __future__ import annotations

import json
from typing import Any

from bench.report import markdown, targets_for
from bench.sink import SCALE_SHAPES, cluster_started_at, per_trade_us, scale_summary


def started_line(timestamp: str) -> str:
    return json.dumps({"event": "processor started", "timestamp": timestamp, "level": "info"})


def run(rate: float | None, ok: bool = True, cpu_us: float | None = None) -> dict[str, Any]:
    return {
        "sink_rate": rate,
        "processor_cpu_us_per_trade": cpu_us,
        "verification": {"ok": ok, "problems": []},
    }


def test_the_issue_shapes_at_two_workers_in_all() -> None:
    assert SCALE_SHAPES == ((1, 1), (1, 2), (2, 1))


def test_cpu_per_trade_in_microseconds() -> None:
    assert per_trade_us(12.0, 60_000) == 200.0
    assert per_trade_us(1.0, 0) is None


def test_a_cluster_starts_when_its_last_process_has_started() -> None:
    early = "noise\n" + started_line("2026-12-02T01:00:00.000000Z")
    late = started_line("2026-12-02T01:00:02.500000Z") + "\n{}"
    assert cluster_started_at([early, late]) - cluster_started_at([early]) == 2.5  # type: ignore[operator]


def test_a_cluster_with_a_process_that_never_started_has_no_start() -> None:
    assert cluster_started_at([started_line("2026-12-02T01:00:00Z"), "Traceback ..."]) is None
    assert cluster_started_at([]) is None


def test_each_shape_against_one_process_of_one_worker() -> None:
    summary = scale_summary(
        {"1x1": run(4000.0, cpu_us=180.0), "1x2": run(3000.0), "2x1": run(5000.0, cpu_us=350.0)}
    )
    assert summary["sink_rates"] == {"1x1": 4000.0, "1x2": 3000.0, "2x1": 5000.0}
    assert summary["speedup"] == {"1x1": 1.0, "1x2": 0.75, "2x1": 1.25}
    assert summary["cpu_us_per_trade"] == {"1x1": 180.0, "1x2": None, "2x1": 350.0}
    assert summary["verified"] is True


def test_an_unmeasured_base_or_shape_gives_no_ratio_and_one_bad_store_fails() -> None:
    summary = scale_summary({"1x1": run(None), "2x1": run(5000.0, ok=False)})
    assert summary["speedup"] == {"1x1": None, "2x1": None}
    assert summary["verified"] is False
    assert scale_summary({})["verified"] is None


def document(**fields: Any) -> dict[str, Any]:
    doc = {
        "profile": "services",
        "mode": "quick",
        "generator": {"name": "vegeta"},
        "phases": {"scale": scale_summary({"1x1": run(4000.0, cpu_us=185.0), "2x1": run(6000.0)})},
        "scale_1x1_sink_rate": 4000.0,
        "scale_1x2_sink_rate": None,
        "scale_2x1_sink_rate": 6000.0,
        "scale_verified": True,
        **fields,
    }
    doc["targets"] = targets_for(doc)
    return doc


def test_the_table_shows_every_shape_with_its_ratio() -> None:
    table = markdown(document())
    shape = "| sink_rate, {} process(es) × {} worker(s) (÷ 1 × 1; CPU/trade) | {} |"
    assert shape.format(1, 1, "4,000/s (1.0×; 185 µs)") in table
    assert shape.format(1, 2, "– (–; –)") in table
    assert shape.format(2, 1, "6,000/s (1.5×; –)") in table
    assert "| scale stores verified | yes |" in table


def test_replay_is_held_to_four_fifths_of_the_sink_rate() -> None:
    def replay_target(doc: dict[str, Any]) -> dict[str, Any]:
        return next(t for t in doc["targets"] if t["metric"] == "replay_vs_sink")

    assert replay_target(document(replay_vs_sink=0.79))["met"] is False
    assert replay_target(document(replay_vs_sink=0.8))["met"] is True
    missing = document()
    assert replay_target(missing)["met"] is None
    assert "| replay_rate (÷ sink_rate) | – (–) | ≥ 0.8 (issue 13) | – |" in markdown(missing)
