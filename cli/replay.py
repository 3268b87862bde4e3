"""``trade-store replay``: the trade dataflow over a bounded stretch of the queue, into a
target trade store (a backfill, a table rebuilt after a schema change, a reporting copy).

The stretch is planned first: per partition, a start (the beginning, the first record at
or after a time, or an offsets file) and an end pinned to the high watermark (or the first
record at or after ``--until``), so a replay always ends. It runs the live processor's
dataflow (``dataflows.trades.build_flow``) in this process, on a recovery folder of its
own that is removed afterwards: the live processor and its recovery state are untouched.
Decisions depend only on the messages (invariant 6), so replaying the whole queue into an
empty store rebuilds the live one, and replaying into the live store changes nothing (the
decision log answers every request it has decided already).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog
from bytewax import operators as op
from bytewax.errors import BytewaxRuntimeError
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig
from bytewax.run import cli_main
from prometheus_client import REGISTRY
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.prompt import Confirm
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from structlog.typing import EventDict

from adapters import wiring
from adapters.kafka import admin_client, kafka_watermarks, offsets_since
from adapters.sql import SqlTradeStore, make_engine
from adapters.tables import trades
from cli.migrate import upgrade
from cli.processor import ensure_recovery_dir, interrupted
from config.runtime import tune_gc
from config.settings import Settings
from dataflows.trades import build_flow
from domain.dead_letter import DeadLetter
from domain.ports import OutcomeWriter
from domain.status import Outcome
from sinks.metrics import DECISIONS
from sources.kafka import BoundedKafkaSource
from sources.sqlite_log import LogExtent, SqliteLogSource

log = structlog.get_logger("replay")

BEGINNING: Literal["beginning"] = "beginning"
Start = Literal["beginning"] | datetime | dict[int, int]
PROGRESS_LOG_EVERY_S = 5.0


class UsageError(ValueError):
    """A flag that cannot be acted on: exit status 2, saying why."""


# --- the plan: pure functions of what the queue holds ------------------------------------


@dataclass(frozen=True, slots=True)
class Bound:
    """One partition's stretch: from offset ``start`` up to (not including) ``end``, which
    holds ``count`` records. Embedded, offsets are the log's ``seq``."""

    partition: int
    start: int
    end: int
    count: int


class Extent(Protocol):
    """Where a queue stands (the Kafka topic, or the embedded log), read once to plan."""

    def watermarks(self) -> dict[int, tuple[int, int]]:
        """Per partition, (the first offset held, the next offset to be written)."""
        ...

    def positions_at(self, when: datetime) -> dict[int, int]:
        """Per partition, the first offset at or after ``when``; absent when none is."""
        ...

    def count(self, partition: int, start: int, end: int) -> int:
        """Records of ``partition`` from ``start`` up to ``end``."""
        ...

    def close(self) -> None: ...


def parse_instant(text: str) -> datetime:
    """An ISO-8601 date or timestamp; without an offset it is UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"not an ISO-8601 timestamp: {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def read_offsets(text: str) -> dict[int, int]:
    """An offsets file: one JSON object, partition → first offset to replay, such as
    ``{"0": 1200, "3": 977}``. Partitions it leaves out are not replayed."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"offsets file is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError('offsets file: expected an object such as {"0": 1200, "1": 977}')
    offsets: dict[int, int] = {}
    for key, value in raw.items():
        if not (key.isdigit() and isinstance(value, int) and not isinstance(value, bool)):
            raise UsageError(f"offsets file: {key!r}: {value!r} is not partition: offset")
        if value < 0:
            raise UsageError(f"offsets file: partition {key}: offset {value} is negative")
        offsets[int(key)] = value
    return offsets


def parse_from(text: str) -> Start:
    """``--from``: ``beginning``, ``offsets:<file>`` or an ISO-8601 timestamp."""
    if text == BEGINNING:
        return BEGINNING
    if text.startswith("offsets:"):
        path = Path(text.removeprefix("offsets:"))
        try:
            return read_offsets(path.read_text())
        except OSError as exc:
            raise UsageError(f"offsets file {path}: {exc.strerror}") from None
    return parse_instant(text)


def parse_until(text: str) -> datetime | None:
    """``--until``: ``now`` (None: the high watermarks as planned) or a timestamp."""
    return None if text == "now" else parse_instant(text)


def bound(low: int, high: int, start: int | None, end: int | None) -> tuple[int, int]:
    """A partition's (start, end) within what it holds, [low, high); a start or an end that
    is None (no record at or after its time) is the high watermark."""
    stop = high if end is None else min(max(end, low), high)
    first = high if start is None else min(max(start, low), high)
    return min(first, stop), stop


def plan(extent: Extent, start: Start, until: datetime | None) -> list[Bound]:
    """Every partition's stretch: ``start`` to ``until`` (None: the high watermarks)."""
    if isinstance(start, datetime) and until is not None and until < start:
        raise UsageError(f"--until {until.isoformat()} is before --from {start.isoformat()}")
    marks = extent.watermarks()
    if not marks:
        raise UsageError("the queue has no partitions: does the topic exist?")
    if isinstance(start, datetime):
        starts = extent.positions_at(start)
    elif start == BEGINNING:
        starts = {p: low for p, (low, _) in marks.items()}
    else:
        unknown = sorted(set(start) - set(marks))
        if unknown:
            raise UsageError(f"offsets file: no partition {unknown[0]} (0 to {len(marks) - 1})")
        starts = start
    ends = {} if until is None else extent.positions_at(until)
    bounds = []
    for p, (low, high) in sorted(marks.items()):
        first, stop = bound(low, high, starts.get(p), ends.get(p))
        bounds.append(Bound(p, first, stop, extent.count(p, first, stop)))
    return bounds


def format_plan(bounds: Sequence[Bound], source: str, target: str, statuses: str) -> str:
    """The plan as printed before a replay (and all that ``--dry-run`` does)."""
    lines = [
        f"replay plan: {source} -> {target} (statuses: {statuses})",
        f"{'partition':>9}  {'start':>12}  {'end':>12}  {'count':>10}",
    ]
    lines += [f"{b.partition:>9}  {b.start:>12}  {b.end:>12}  {b.count:>10}" for b in bounds]
    lines.append(f"{'total':>9}  {'':>12}  {'':>12}  {sum(b.count for b in bounds):>10}")
    return "\n".join(lines)


def target_url(text: str) -> str:
    """``--target-db``: a database URL as given, or a path to a SQLite file."""
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


def shown(url: str) -> str:
    """A URL fit to print: no password."""
    return make_url(url).render_as_string(hide_password=True)


# --- where the Kafka topic stands ---------------------------------------------------------


class TopicExtent:
    """The inbound topic, for planning: offsets, and times as the records' timestamps (the
    broker's append time: the topic is created with LogAppendTime)."""

    def __init__(self, brokers: str, topic: str, timeout_s: float = 10.0) -> None:
        self._admin = admin_client(brokers)
        self._topic = topic
        self._timeout_s = timeout_s

    def watermarks(self) -> dict[int, tuple[int, int]]:
        return kafka_watermarks(self._admin, self._topic, self._timeout_s)

    def positions_at(self, when: datetime) -> dict[int, int]:
        """Kafka's ListOffsets by timestamp (what ``offsets_for_times`` asks)."""
        meta = self._admin.list_topics(self._topic, timeout=self._timeout_s).topics[self._topic]
        since_ms = int(when.timestamp() * 1000)
        found = offsets_since(self._admin, self._topic, meta.partitions, since_ms, self._timeout_s)
        return {p: offset for p, offset in found.items() if offset >= 0}

    def count(self, partition: int, start: int, end: int) -> int:
        """Offsets are dense on the inbound topic: no transactions, no compaction."""
        return end - start

    def close(self) -> None:
        """Nothing held open: the admin client's connections go with it."""


# --- the run -----------------------------------------------------------------------------


class NoStatuses:
    """``--statuses skip``: the live status store is left alone."""

    def write_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Written by the live processor already, or to be rebuilt with ``write``."""

    def fail_pending(self, outcomes: Sequence[Outcome]) -> None:
        """As ``write_outcomes``."""


class _Dropped(StatelessSinkPartition[DeadLetter]):
    def write_batch(self, items: list[DeadLetter]) -> None:
        """The live processor dead-lettered them already; counted and logged, not resent."""


class DropDeadLetters(DynamicSink[DeadLetter]):
    """A replay's dead letters go nowhere: the dead-letter queue has them already."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Dropped:
        return _Dropped()


def counted(name: str) -> int:
    """A counter of this process's dataflow (its Prometheus registry), such as records read."""
    return int(REGISTRY.get_sample_value(f"trade_store_processor_{name}_total") or 0)


def decisions() -> dict[tuple[str, str], int]:
    """Outcomes so far by (state, reason_code), from this process's Prometheus counter."""
    return {
        (s.labels["state"], s.labels["reason_code"]): int(s.value)
        for metric in DECISIONS.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} rec/s", style="progress.data.speed")


class Watch:
    """Progress while the dataflow runs, on a thread of its own: a rich progress bar when
    stderr is a terminal, else a structured log line every ``PROGRESS_LOG_EVERY_S``."""

    def __init__(self, total: int, read: Callable[[], int], tty: bool) -> None:
        self._total = total
        self._read = read
        self._tty = tty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay-progress", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        if self._tty:
            self._bar()
        else:
            self._lines()

    def _bar(self) -> None:
        columns = (
            TextColumn("replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            _Rate(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("replay", total=self._total)
            while not self._stop.wait(0.2):
                bar.update(task, completed=self._read())
            bar.update(task, completed=self._read())

    def _lines(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(PROGRESS_LOG_EVERY_S):
            done, elapsed = self._read(), time.monotonic() - started
            rate = done / elapsed if elapsed else 0.0
            left = (self._total - done) / rate if rate else None
            log.info(
                "replay progress",
                done=done,
                total=self._total,
                rate_per_s=round(rate),
                eta_s=None if left is None else round(max(left, 0.0)),
            )


def _without_decisions(_: object, __: str, event: EventDict) -> EventDict:
    if event.get("event") == "request decided":
        raise structlog.DropEvent
    return event


def quiet_decisions() -> None:
    """Leave out the dataflow's line per FAILED request: a replay's are counted in its
    summary, and millions of them would bury its progress."""
    processors = structlog.get_config()["processors"]
    structlog.configure(processors=[_without_decisions, *processors])


def rows(url: str) -> int:
    """Rows of the target's trades table."""
    engine = make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(trades)).scalar_one())
    finally:
        engine.dispose()


@dataclass(frozen=True, slots=True)
class Summary:
    """What a replay did, as printed at its end."""

    reached_end: bool
    read: int
    planned: int
    elapsed_s: float
    rows_before: int
    rows_after: int
    decided: Mapping[tuple[str, str], int]
    dead_letters: int

    def text(self) -> str:
        rate = self.read / self.elapsed_s if self.elapsed_s else 0.0
        how = "finished" if self.reached_end else "interrupted"
        lines = [
            f"replay {how} in {self.elapsed_s:.1f} s: {self.read} of {self.planned} records"
            f" read ({rate:,.0f}/s)",
            f"target rows: {self.rows_before} -> {self.rows_after}"
            f" ({self.rows_after - self.rows_before:+d})",
            "decisions:",
        ]
        for (state, reason), n in sorted(self.decided.items()):
            lines.append(f"  {state:<8} {reason or '-':<16} {n:>10}")
        lines.append(f"dead letters: {self.dead_letters} (not dead-lettered again)")
        return "\n".join(lines)


def _source(settings: Settings, bounds: Sequence[Bound]) -> Any:
    stretch = {b.partition: (b.start, b.end) for b in bounds}
    if settings.embedded:
        path = wiring.inbound_log_path(settings)
        return SqliteLogSource(path, len(bounds), settings.source_batch_size, bounds=stretch)
    return BoundedKafkaSource(
        settings.kafka_bootstrap_servers,
        settings.inbound_topic,
        stretch,
        settings.source_batch_size,
    )


def replay(
    settings: Settings, url: str, bounds: Sequence[Bound], write_statuses: bool, workers: int
) -> Summary:
    """Run the dataflow over ``bounds`` into the (migrated) store at ``url``."""
    source = _source(settings, bounds)

    def target() -> SqlTradeStore:
        return SqlTradeStore(
            make_engine(url, settings.db_pool_size, settings.db_statement_timeout_ms)
        )

    def statuses() -> OutcomeWriter:
        return wiring.status_store(settings) if write_statuses else NoStatuses()

    flow = build_flow(
        inbound=lambda f: op.input("replay-inbound", f, source),
        trades=target,
        statuses=statuses,
        dead_letters=DropDeadLetters(),
    )
    planned = sum(b.count for b in bounds)
    quiet_decisions()
    before, decided_before = rows(url), decisions()
    read_before, dead_before = counted("records_read"), counted("dead_letters")
    recovery = Path(tempfile.mkdtemp(prefix="trade-store-replay-"))
    started = time.monotonic()
    reached_end = False
    try:
        ensure_recovery_dir(recovery, 1)
        tune_gc()
        with Watch(planned, lambda: counted("records_read") - read_before, sys.stderr.isatty()):
            cli_main(  # type: ignore[no-untyped-call]
                flow,
                workers_per_process=workers,
                epoch_interval=timedelta(seconds=settings.snapshot_interval_seconds),
                recovery_config=RecoveryConfig(recovery),  # type: ignore[no-untyped-call]
            )
        reached_end = True
    except (BytewaxRuntimeError, KeyboardInterrupt) as exc:
        if not interrupted(exc):
            raise
    finally:
        shutil.rmtree(recovery, ignore_errors=True)
    return Summary(
        reached_end=reached_end,
        read=counted("records_read") - read_before,
        planned=planned,
        elapsed_s=time.monotonic() - started,
        rows_before=before,
        rows_after=rows(url),
        decided={k: n - decided_before.get(k, 0) for k, n in decisions().items()},
        dead_letters=counted("dead_letters") - dead_before,
    )


def _confirmed(yes: bool, total: int, target: str) -> bool | None:
    """True to go on; False when the operator says no; None when nobody can be asked."""
    if yes:
        return True
    if not sys.stdin.isatty():
        return None
    return Confirm.ask(f"replay {total} records into {target}?", default=False)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """``trade-store replay``: plan, print, confirm, migrate the target, replay, summarise.

    Exit status: 0 when every partition reached its end; 1 when the operator declined;
    2 for a flag that cannot be acted on (or no terminal to confirm on, without --yes);
    130 when interrupted.
    """
    # Explicitly: a process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        start, until = parse_from(args.start), parse_until(args.until)
        url = target_url(args.target_db)
        extent: Extent
        if settings.embedded:
            extent = LogExtent(wiring.inbound_log_path(settings))
            source = f"inbound log {extent.path}"
        else:
            extent = TopicExtent(settings.kafka_bootstrap_servers, settings.inbound_topic)
            source = f"topic {settings.inbound_topic}"
        try:
            bounds = plan(extent, start, until)
        finally:
            extent.close()
    except (UsageError, FileNotFoundError) as exc:
        print(f"trade-store replay: {exc}", file=sys.stderr)
        return 2
    total = sum(b.count for b in bounds)
    print(format_plan(bounds, source, shown(url), args.statuses), flush=True)
    if args.dry_run:
        return 0
    go = _confirmed(args.yes, total, shown(url))
    if go is None:
        print(
            "trade-store replay: refusing to replay without confirmation: stdin is not a"
            " terminal; pass --yes (or --dry-run to see the plan only)",
            file=sys.stderr,
        )
        return 2
    if not go:
        print("trade-store replay: not replayed", file=sys.stderr)
        return 1
    if url.startswith("sqlite"):
        Path(make_url(url).database or ".").parent.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    summary = replay(
        settings, url, bounds, args.statuses == "write", args.workers or settings.processor_workers
    )
    print(summary.text(), flush=True)
    log.info(
        "replay finished" if summary.reached_end else "replay interrupted",
        read=summary.read,
        planned=summary.planned,
        elapsed_s=round(summary.elapsed_s, 3),
        rows_before=summary.rows_before,
        rows_after=summary.rows_after,
        decisions={f"{s}/{r}" if r else s: n for (s, r), n in summary.decided.items()},
        dead_letters=summary.dead_letters,
    )
    return 0 if summary.reached_end else 130
