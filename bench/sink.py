"""The processor's sink rate against the storage ceiling.

The workload (deterministic for a seed): the trade store is seeded with ``E`` existing
trades at versions 1 and 2; the queue is pre-loaded with N messages, shuffled but in order
per trade_id:

* ~50 % brand-new trade_ids (version 1)                        → SUCCESS, new row
* ~46 % new versions of existing trades (3, then 4)             → SUCCESS, new row
* ~4 %  stale versions of existing trades (version 1 < head)    → FAILED STALE_VERSION

Then the processor is started on the pre-loaded queue and timed until every request is
terminal; the store is verified (row count, a sample of every version of 1,000 trades,
decision-log counts, every status terminal and as expected). The ceiling writes the same
rows and the same final statuses straight into a fresh, identically migrated set of stores.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from bench.profiles import Stage, TerminalRow, TradeRow
from bench.stack import log

STALE_SHARE = 0.04
CEILING_BATCH = 1000
# (processes, workers per process) of the scale phase: threads of one process against
# processes of one cluster, at the same total of two workers (issue 13)
SCALE_SHAPES = ((1, 1), (1, 2), (2, 1))


@dataclass
class SinkPlan:
    messages: list[Any]  # domain.message.TradeMessage, in queue order
    expected: list[TerminalRow]  # one per message, same order
    rows: list[TradeRow]  # the rows the run adds, in queue order
    seed: list[TradeRow]
    versions: dict[str, list[int]]  # every trade's expected versions after the run
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def expected_rows(self) -> int:
        return len(self.seed) + len(self.rows)


def make_plan(n: int, run_id: str, seed: int = 4) -> SinkPlan:
    """Build the workload described in the module docstring."""
    from domain.message import TradeMessage
    from domain.trade import Trade

    rng = random.Random(seed)
    n_new = n // 2
    n_stale = round(n * STALE_SHARE)
    n_update = n - n_new - n_stale
    n_existing = (n_update + 1) // 2
    today = datetime.now(UTC).date()
    now = datetime.now(UTC)
    old = today - timedelta(days=30)

    def maturity(i: int) -> date:
        return today + timedelta(days=30 + i % 1500)

    existing = [f"X{run_id}-{i:07d}" for i in range(n_existing)]
    seed_rows = [
        TradeRow(tid, v, f"CP-{i % 97}", f"B-{i % 13}", maturity(i), old)
        for i, tid in enumerate(existing)
        for v in (1, 2)
    ]
    kinds = ["new"] * n_new + ["update"] * n_update + ["stale"] * n_stale
    rng.shuffle(kinds)
    head = dict.fromkeys(existing, 2)
    versions = {tid: [1, 2] for tid in existing}
    update_queue = [tid for tid in existing for _ in (3, 4)][:n_update]
    rng.shuffle(update_queue)
    messages, expected, rows = [], [], []
    new_i = 0
    for i, kind in enumerate(kinds):
        rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if kind == "new":
            tid, version = f"N{run_id}-{new_i:07d}", 1
            new_i += 1
        elif kind == "update":
            tid = update_queue.pop()
            version = head[tid] + 1
        else:
            tid, version = existing[rng.randrange(n_existing)], 1
        trade = Trade(tid, version, f"CP-{i % 97}", f"B-{i % 13}", maturity(i), today)
        messages.append(TradeMessage(rid, rid, today, now, trade))
        if kind == "stale":
            expected.append(
                TerminalRow(
                    rid,
                    tid,
                    version,
                    "FAILED",
                    "STALE_VERSION",
                    f"version {version} is lower than stored version {head[tid]}",
                    now,
                )
            )
            continue
        head[tid] = version
        versions.setdefault(tid, []).append(version)
        rows.append(
            TradeRow(
                tid,
                version,
                trade.counterparty_id,
                trade.book_id,
                trade.maturity_date,
                trade.created_date,
            )
        )
        expected.append(TerminalRow(rid, tid, version, "SUCCESS", None, None, now))
    counts = {"new": n_new, "update": n_update, "stale": n_stale, "existing_ids": n_existing}
    return SinkPlan(messages, expected, rows, seed_rows, versions, counts)


def _progress(what: str, total: int) -> Callable[[int], None]:
    started = time.monotonic()

    def show(done: int) -> None:
        el = time.monotonic() - started
        rate = done / el if el > 0 else 0
        log(f"  {what}: {done:,}/{total:,} ({rate:,.0f}/s)")

    return show


def preload(stage: Stage, plan: SinkPlan) -> dict[str, Any]:
    t0 = time.monotonic()
    stage.seed(plan.seed)
    seeded = time.monotonic() - t0
    t1 = time.monotonic()
    stage.preload(plan.messages, _progress("preload", len(plan.messages)))
    loaded = time.monotonic() - t1
    return {"seed_s": round(seeded, 2), "preload_s": round(loaded, 2)}


def _parse_ts(value: str) -> float:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def verify(
    stage: Stage, plan: SinkPlan, sample: int = 1000, full_status: bool = True, wait_s: float = 60.0
) -> dict[str, Any]:
    """Check the stores against the plan; returns the findings (ok=True when all match)."""
    rng = random.Random(7)
    problems: list[str] = []
    rows = int(stage.scalar("SELECT count(*) FROM trades"))
    if rows != plan.expected_rows:
        problems.append(f"trades rows {rows:,} != expected {plan.expected_rows:,}")
    states = dict(stage.rows("SELECT state, count(*) FROM request_outcomes GROUP BY state"))
    want_failed = sum(1 for e in plan.expected if e.state == "FAILED")
    want = {"SUCCESS": len(plan.expected) - want_failed, "FAILED": want_failed}
    got = {"SUCCESS": int(states.get("SUCCESS", 0)), "FAILED": int(states.get("FAILED", 0))}
    if got != want:
        problems.append(f"decision log {got} != expected {want}")
    ids = rng.sample(sorted(plan.versions), min(sample, len(plan.versions)))
    found: dict[str, list[int]] = {}
    for tid, version in stage.rows(
        "SELECT trade_id, version FROM trades WHERE trade_id IN :ids ORDER BY trade_id, version",
        ids=ids,
    ):
        found.setdefault(tid, []).append(int(version))
    wrong = [t for t in ids if found.get(t) != plan.versions[t]]
    if wrong:
        problems.append(
            f"{len(wrong)} of {len(ids)} sampled trades have wrong versions, e.g. {wrong[0]}:"
            f" {found.get(wrong[0])} != {plan.versions[wrong[0]]}"
        )
    # statuses: all of them (or a sample), waiting a little for the last batch
    expected = (
        plan.expected if full_status else rng.sample(plan.expected, min(2000, len(plan.expected)))
    )
    by_id = {e.request_id: e.state for e in expected}
    todo = list(by_id)
    last_update = 0.0
    seen: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + wait_s
    while True:
        got_statuses = stage.statuses(todo)
        for rid, (state, updated) in got_statuses.items():
            if state in ("SUCCESS", "FAILED"):
                seen[rid] = (state, updated)
        todo = [rid for rid in todo if rid not in seen]
        if not todo or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if todo:
        problems.append(f"{len(todo):,} requests not terminal (e.g. {todo[0]})")
    mismatched = [rid for rid, (state, _) in seen.items() if by_id[rid] != state]
    if mismatched:
        problems.append(f"{len(mismatched):,} statuses differ from the expected outcome")
    if seen:
        last_update = max(_parse_ts(u) for _, u in seen.values())
    return {
        "ok": not problems,
        "problems": problems,
        "trade_rows": rows,
        "expected_trade_rows": plan.expected_rows,
        "decision_log": got,
        "sampled_trades": len(ids),
        "statuses_checked": len(by_id),
        "statuses_terminal": len(seen),
        "last_status_update": last_update,
    }


def ceiling_batches(plan: SinkPlan) -> list[tuple[list[TradeRow], list[TerminalRow]]]:
    """The plan in queue order, cut into batches of CEILING_BATCH messages."""
    out = []
    for i in range(0, len(plan.expected), CEILING_BATCH):
        terminal = plan.expected[i : i + CEILING_BATCH]
        rows = [
            TradeRow(
                m.trade.trade_id,
                m.trade.version,
                m.trade.counterparty_id,
                m.trade.book_id,
                m.trade.maturity_date,
                m.trade.created_date,
            )
            for m, t in zip(plan.messages[i : i + CEILING_BATCH], terminal, strict=True)
            if t.state == "SUCCESS"
        ]
        out.append((rows, list(terminal)))
    return out


def drain_progress(
    stage: Stage,
    total: int,
    timeout: float,
    alive: Callable[[], bool],
    stall_s: float = 45,
    label: str = "sink",
) -> dict[str, Any]:
    """Poll the decision log until every message is decided, time runs out, or nothing has
    been decided for ``stall_s`` seconds (the processor is stuck: no point waiting)."""
    started = time.monotonic()
    last_n, last_t = 0, started
    progressed = started
    first_seen: float | None = None
    while True:
        time.sleep(1.0)
        try:
            n = stage.decided()
        except Exception as exc:  # the store may be busy for a moment
            log(f"  {label}: progress query failed ({exc}); retrying")
            continue
        now = time.monotonic()
        if n and first_seen is None:
            first_seen = time.time()
        rate = (n - last_n) / (now - last_t)
        if n > last_n:
            progressed = now
        log(f"  {label}: {n:,}/{total:,} decided ({rate:,.0f}/s now, {now - started:.0f}s)")
        last_n, last_t = n, now
        if n >= total:
            return {"drained": True, "decided": n, "first_seen": first_seen}
        if now - started > timeout:
            return {"drained": False, "decided": n, "first_seen": first_seen}
        if not alive():
            return {"drained": False, "decided": n, "first_seen": first_seen, "died": True}
        if now - progressed > stall_s:
            log(f"  {label}: nothing decided for {stall_s:.0f}s: the processor is stuck")
            return {"drained": False, "decided": n, "first_seen": first_seen, "stalled": True}


def processor_started_at(log_text: str) -> float | None:
    """The wall time of the processor's "processor started" log line, if it logged one."""
    import json

    for line in log_text.splitlines():
        if "processor started" in line:
            try:
                record = json.loads(line)
                return _parse_ts(record["timestamp"])
            except (ValueError, KeyError):
                return None
    return None


def cluster_started_at(log_texts: list[str]) -> float | None:
    """When the last process of a cluster logged "processor started" (one process: its own
    start); None when any did not log it."""
    starts = [processor_started_at(text) for text in log_texts]
    if not starts or None in starts:
        return None
    return max(s for s in starts if s is not None)


def shape_label(processes: int, workers: int) -> str:
    return f"{processes}x{workers}"


def scale_summary(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each shape's sink_rate, its ratio to one process of one worker, and the processor CPU
    it spent per trade."""
    rates = {label: run.get("sink_rate") for label, run in runs.items()}
    base = rates.get(shape_label(1, 1))
    return {
        "sink_rates": rates,
        "cpu_us_per_trade": {
            label: run.get("processor_cpu_us_per_trade") for label, run in runs.items()
        },
        "speedup": {
            label: round(value / base, 2) if value and base else None
            for label, value in rates.items()
        },
        "verified": all(run["verification"]["ok"] for run in runs.values()) if runs else None,
    }


def per_trade_us(cpu_s: float, n: int) -> float | None:
    return round(cpu_s * 1e6 / n, 1) if n else None


def rate(n: int, seconds: float | None) -> float | None:
    return round(n / seconds, 1) if seconds and seconds > 0 else None


def expected_summary(plan: SinkPlan) -> dict[str, Any]:
    return {
        "messages": len(plan.messages),
        **plan.counts,
        "seeded_rows": len(plan.seed),
        "rows_added": len(plan.rows),
    }


def log_problems(log_text: str, limit: int = 5) -> list[str]:
    """Distinct warning/error events of a JSON-lines log (first occurrences, with counts)."""
    import json

    seen: dict[str, int] = {}
    for line in log_text.splitlines():
        if not line.startswith("{"):
            if "panicked" in line or line.startswith("Traceback"):
                seen[line.strip()] = seen.get(line.strip(), 0) + 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") in ("warning", "error", "critical"):
            key = f"{record.get('event')}: {record.get('error') or record.get('reason') or ''}"
            seen[key] = seen.get(key, 0) + 1
    return [f"{text} (x{count})" for text, count in list(seen.items())[:limit]]
