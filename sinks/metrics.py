"""The processor's Prometheus metrics (README "Metrics"), served on
``TRADE_STORE_METRICS_PORT`` from the process's own registry: Bytewax's workers are
threads of this process.

Counted where the dataflow reads (``dataflows.trades.decode_batch``), decides and writes
(``sinks.stores``). How far behind the queue the processor is, and how old its last
recovery snapshot is, are read at each scrape from the recovery store and the queue, so
they are right even while the dataflow is stuck.

The recovery store is read in a child process (``SnapshotReader``), never in this one:
Bytewax links its own copy of SQLite, and closing a connection of Python's copy to the
same file drops the POSIX locks Bytewax's copy holds on it (one lock table per process),
which SQLite documents as a way to corrupt a database.
"""

from __future__ import annotations

import multiprocessing
import pickle
import sqlite3
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from domain.status import Outcome
from domain.trade import Decision

log = structlog.get_logger("processor")
disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: one more per series, read by no query here

RECORDS_READ = Counter(
    "trade_store_processor_records_read", "Records read from the queue (messages and dead letters)"
)
BATCH_SIZE = Histogram(
    "trade_store_processor_batch_size",
    "Decisions per trade-store transaction",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000),
)
COMMIT = Histogram(
    "trade_store_processor_commit_duration_seconds",
    "One trade-store transaction (rows and decision log), each attempt",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DECISIONS = Counter(
    "trade_store_processor_decisions",
    "Outcomes whose status was written, by state and reason_code (empty for SUCCESS)",
    ["state", "reason_code"],
)
DEAD_LETTERS = Counter("trade_store_processor_dead_letters", "Records dead-lettered")
END_TO_END = Histogram(
    "trade_store_processor_end_to_end_seconds",
    "From a request's accepted_at (the API's clock) to its status written",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


def count_decided(outcomes: Iterable[Outcome]) -> None:
    """Count outcomes by state and reason: one increment per kind, not per outcome."""
    kinds = Tally((o.state.value, o.reason_code.value if o.reason_code else "") for o in outcomes)
    for (state, reason), n in kinds.items():
        DECISIONS.labels(state, reason).inc(n)


def observe_written(decisions: Iterable[Decision], now: float) -> None:
    """The end-to-end latency of requests whose statuses were just written."""
    observe = END_TO_END.observe
    for d in decisions:
        observe(now - d.message.accepted_at.timestamp())


def timed_commit(commit: Callable[[], list[Outcome]]) -> list[Outcome]:
    """Run one trade-store transaction, timing it whether it commits or fails."""
    started = time.perf_counter()
    try:
        return commit()
    finally:
        COMMIT.observe(time.perf_counter() - started)


def latest_snapshots(recovery_dir: Path, step_id: str) -> tuple[dict[str, Any], datetime | None]:
    """Per state key of step ``step_id``, its newest snapshot in Bytewax's recovery
    partitions, and when the newest of them was written (Bytewax's ``created_at``, UTC,
    whole seconds). Every epoch snapshots every source partition, so that time is the
    last snapshot's."""
    states: dict[str, tuple[int, Any]] = {}
    newest: datetime | None = None
    for part in sorted(recovery_dir.glob("part-*.sqlite3")):
        conn = sqlite3.connect(f"file:{part}?mode=ro", uri=True, timeout=1)
        try:
            rows = conn.execute(
                "SELECT state_key, snap_epoch, ser_change, created_at FROM snaps AS s"
                " WHERE step_id = ? AND snap_epoch = (SELECT max(snap_epoch) FROM snaps"
                "  WHERE step_id = s.step_id AND state_key = s.state_key)",
                (step_id,),
            ).fetchall()
        finally:
            conn.close()
        for key, epoch, change, created in rows:
            if key not in states or states[key][0] < epoch:
                # Our own recovery files, written by Bytewax with pickle.
                value = pickle.loads(change) if change is not None else None  # noqa: S301
                states[key] = (epoch, value)
            written = datetime.fromisoformat(created).replace(tzinfo=UTC)
            newest = written if newest is None or written > newest else newest
    return {key: value for key, (_, value) in states.items()}, newest


def queue_positions(
    states: Mapping[str, Any], partition_of: Callable[[str], int]
) -> dict[int, int]:
    """Per partition, the position its snapshot resumes from (Kafka's sentinels, such as
    'beginning', and partitions without one are left out)."""
    return {
        partition_of(key): value
        for key, value in states.items()
        if isinstance(value, int) and value >= 0
    }


def log_backlog(path: Path, partitions: int, positions: Mapping[int, int]) -> dict[int, int]:
    """Embedded: per log partition, the entries after its snapshot position. Counted, not
    subtracted: ``seq`` is one sequence over every partition."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    try:
        return {
            p: conn.execute(
                "SELECT count(*) FROM inbound_log WHERE partition = ? AND seq > ?",
                (p, positions.get(p, 0)),
            ).fetchone()[0]
            for p in range(partitions)
        }
    finally:
        conn.close()


def kafka_lag(
    watermarks: Mapping[int, tuple[int, int]], positions: Mapping[int, int]
) -> dict[int, int]:
    """Services: per partition, high watermark − next offset to read. A partition not
    read yet (no snapshot, or Bytewax's 'beginning' sentinel) starts at its low watermark."""
    return {p: high - max(low, positions.get(p, low)) for p, (low, high) in watermarks.items()}


class SnapshotReader:
    """``read`` (by default ``latest_snapshots``) of one step, run in a child process of its
    own (see above): anything in the processor that reads the recovery store reads it so."""

    def __init__(
        self,
        recovery_dir: Path,
        step_id: str,
        timeout_s: float = 5.0,
        read: Callable[[Path, str], Any] = latest_snapshots,
    ) -> None:
        self._args = (recovery_dir, step_id)
        self._timeout_s = timeout_s
        self._read = read
        # Spawned, not forked: this process runs threads (Bytewax's, the HTTP server's).
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self) -> Any:
        return self._pool.submit(self._read, *self._args).result(self._timeout_s)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class QueueLag(Collector):
    """``trade_store_processor_lag_records{partition}`` and
    ``trade_store_processor_snapshot_age_seconds``, computed at each scrape.

    Lag counts the records past each partition's position in the last recovery snapshot,
    as consumer-group lag counts them past the committed offset: what a restart now would
    read again or for the first time. Up to a snapshot interval of traffic while it keeps
    up, then 0 once it has caught up.
    """

    def __init__(
        self,
        snapshots: Callable[[], tuple[dict[str, Any], datetime | None]],
        backlog: Callable[[dict[int, int]], dict[int, int]],
        partition_of: Callable[[str], int],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._snapshots = snapshots
        self._backlog = backlog
        self._partition_of = partition_of
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "trade_store_processor_lag_records",
            "Records queued past the last recovery snapshot's position, per partition",
            labels=["partition"],
        )
        age = GaugeMetricFamily(
            "trade_store_processor_snapshot_age_seconds",
            "Seconds since the last recovery snapshot was written",
        )
        try:
            states, newest = self._snapshots()
            positions = queue_positions(states, self._partition_of)
            for partition, count in sorted(self._backlog(positions).items()):
                lag.add_metric([str(partition)], count)
            if newest is not None:
                age.add_metric([], (self._clock() - newest).total_seconds())
        except Exception as exc:  # a scrape shows what it can; the queue may be down
            log.warning("lag not measured", error=str(exc))
        yield lag
        yield age
