"""The replay phase's arithmetic: what ``trade-store replay`` reported in its ``replay
finished`` log line, and whether its target ended up as the live store the sink phase built.

The phase replays the sink phase's drained queue (``--from beginning``) into a fresh trade
store seeded with the sink's seed: the trades the live store held before the queue (which a
real topic would have dropped by retention). The same messages on the same rows must give
the same decisions and as many rows as the live store.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from bench.sink import SinkPlan, per_trade_us, rate

FINISHED = "replay finished"


def finished(log_text: str) -> dict[str, Any] | None:
    """The fields of the replay's ``replay finished`` JSON log line; None without one (it
    was interrupted, or failed before its end)."""
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == FINISHED:
            return record
    return None


def expected_decisions(plan: SinkPlan) -> dict[str, int]:
    """The plan's outcomes keyed as the replay's log line counts them: ``STATE`` or
    ``STATE/REASON_CODE``."""
    return dict(
        Counter(f"{e.state}/{e.reason_code}" if e.reason_code else e.state for e in plan.expected)
    )


def check(
    report: dict[str, Any] | None,
    exit_code: int | None,
    messages: int,
    decisions: dict[str, int],
    target_rows: int,
    live_rows: int,
) -> list[str]:
    """What is wrong with a replay of ``messages`` queued records that should have decided
    ``decisions`` and left the target with the live store's ``live_rows``; empty when nothing."""
    problems = []
    if exit_code != 0:
        problems.append(f"exit status {exit_code} (0: reached the end)")
    if report is None:
        problems.append(f"no {FINISHED!r} log line")
    else:
        if report.get("read") != messages or report.get("planned") != messages:
            problems.append(
                f"read {report.get('read')} of {report.get('planned')} planned records,"
                f" {messages:,} queued"
            )
        if report.get("decisions") != decisions:
            problems.append(f"decisions {report.get('decisions')} != expected {decisions}")
    if target_rows != live_rows:
        problems.append(f"target trades rows {target_rows:,} != live store's {live_rows:,}")
    return problems


def figures(report: dict[str, Any] | None, wall_s: float, cpu_s: float) -> dict[str, Any]:
    """The replay's rates. ``replay_rate`` is the replay's own: records read ÷ the
    ``elapsed_s`` it logs, from just before its dataflow starts to its end (start-up and the
    target's migration left out, as ``sink_rate`` leaves out the processor's start-up);
    ``replay_rate_incl_startup`` is records ÷ the process's wall time, launch to exit."""
    wall = round(wall_s, 2)
    if report is None:  # what it read is unknown
        return {
            "replay_rate": None,
            "replay_rate_incl_startup": None,
            "records": None,
            "elapsed_s": None,
            "wall_s": wall,
            "replay_cpu_us_per_record": None,
        }
    read = int(report["read"])
    return {
        "replay_rate": rate(read, report["elapsed_s"]),
        "replay_rate_incl_startup": rate(read, wall_s),
        "records": read,
        "elapsed_s": report["elapsed_s"],
        "wall_s": wall,
        "replay_cpu_us_per_record": per_trade_us(cpu_s, read),
    }
