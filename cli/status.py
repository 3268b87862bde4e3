"""``trade-store status``: one screen of how the pipeline is doing (README "Status").

Every figure is read on its own, so a dependency that is down blanks only the figures
that need it, each named under ``unavailable`` with the reason; then the command exits 1.

The queue positions come from Bytewax's recovery store, read here with
``sinks.metrics.latest_snapshots`` directly, not in a child process as the processor
does: the hazard there is closing a connection of Python's SQLite in the process whose
Bytewax holds POSIX locks on the same file (locks are per process). This process runs no
dataflow, so it holds none to drop; its reads are read-only, of files Bytewax keeps in WAL
mode, so they never block Bytewax's writes either (another process reading a WAL database
is what SQLite is made for).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from confluent_kafka import KafkaError, KafkaException

from adapters import wiring
from adapters.inbound_log import appended_since, dead_letter_count, first_accepted_after, read_only
from adapters.kafka import admin_client, kafka_watermarks, offsets_since, record_timestamps
from config.clock import business_today, utc_now
from config.settings import Settings
from sinks.metrics import (
    kafka_lag,
    latest_snapshots,
    log_backlog,
    queue_positions,
)

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")
WINDOW_S = 60
"""Throughput is averaged over this many seconds back from now."""
KAFKA_TIMEOUT_S = 3.0


@dataclass
class Status:
    """What the screen shows; ``None`` where a figure could not be read (then named in
    ``unavailable``) or, for the snapshot age and the oldest pending age, where there is
    none."""

    profile: str
    at: datetime
    lag: dict[int, int] | None = None
    snapshot_age_seconds: float | None = None
    accepted_per_second: float | None = None
    decided_per_second: float | None = None
    dead_letters: int | None = None
    oldest_pending_age_seconds: float | None = None
    rows: dict[str, int] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)


class Queue(Protocol):
    """What the status reads of the queue: per partition, positions are where the
    processor's last recovery snapshot resumes."""

    name: str
    """The dependency, as the screen names it when it is down."""

    def lag(self, positions: Mapping[int, int]) -> dict[int, int]: ...

    def oldest_unread(self, positions: Mapping[int, int]) -> float | None:
        """When (unix seconds) the oldest record past its partition's position was queued."""
        ...

    def queued_since(self, since: datetime) -> int: ...

    def dead_letters(self) -> int: ...


class EmbeddedLog:
    """The inbound log and its dead letters, in ``data/inbound.db``."""

    name = "inbound log"

    def __init__(self, settings: Settings) -> None:
        self._path = wiring.inbound_log_path(settings)
        self._partitions = settings.inbound_partitions

    def lag(self, positions: Mapping[int, int]) -> dict[int, int]:
        return log_backlog(self._path, self._partitions, positions)

    def oldest_unread(self, positions: Mapping[int, int]) -> float | None:
        every = {p: positions.get(p, 0) for p in range(self._partitions)}
        with closing(read_only(self._path)) as conn:
            return min(first_accepted_after(conn, every), default=None)

    def queued_since(self, since: datetime) -> int:
        with closing(read_only(self._path)) as conn:
            return appended_since(conn, since)

    def dead_letters(self) -> int:
        with closing(read_only(self._path)) as conn:
            return dead_letter_count(conn)


class KafkaTopics:
    """The inbound topic (its watermarks, offsets by time, records at the positions) and
    the dead-letter topic (its watermarks)."""

    name = "Kafka"

    def __init__(self, settings: Settings) -> None:
        self._bootstrap = settings.kafka_bootstrap_servers
        self._admin = admin_client(self._bootstrap)
        self._inbound = settings.inbound_topic
        self._dlq = settings.dlq_topic

    def _marks(self, topic: str) -> dict[int, tuple[int, int]]:
        return kafka_watermarks(self._admin, topic, KAFKA_TIMEOUT_S)

    def lag(self, positions: Mapping[int, int]) -> dict[int, int]:
        return kafka_lag(self._marks(self._inbound), positions)

    def oldest_unread(self, positions: Mapping[int, int]) -> float | None:
        marks = self._marks(self._inbound)
        first = {p: marks[p][1] - n for p, n in kafka_lag(marks, positions).items() if n > 0}
        stamps = record_timestamps(self._bootstrap, self._inbound, first, KAFKA_TIMEOUT_S)
        if len(stamps) < len(first):
            raise TimeoutError(f"no record read at partitions {sorted(set(first) - set(stamps))}")
        return min(stamps.values(), default=None)

    def queued_since(self, since: datetime) -> int:
        marks = self._marks(self._inbound)
        since_ms = int(since.timestamp() * 1000)
        firsts = offsets_since(self._admin, self._inbound, marks, since_ms, KAFKA_TIMEOUT_S)
        return sum(marks[p][1] - offset for p, offset in firsts.items() if offset >= 0)

    def dead_letters(self) -> int:
        return sum(high - low for low, high in self._marks(self._dlq).values())


def queue_of(settings: Settings) -> Queue:
    return EmbeddedLog(settings) if settings.embedded else KafkaTopics(settings)


def read_positions(settings: Settings) -> tuple[dict[int, int], datetime | None]:
    """Per partition, where the last recovery snapshot resumes, and when it was written."""
    from cli.processor import flow, position_step

    step_id, partition_of = position_step(settings, flow(settings).flow_id)
    states, newest = latest_snapshots(settings.recovery_path, step_id)
    return queue_positions(states, partition_of), newest


def reason(exc: Exception) -> str:
    """One short line: librdkafka's own message rather than the KafkaError's repr."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    text = error.str() if isinstance(error, KafkaError) else str(exc) or type(exc).__name__
    return " ".join(text.split())[:300]


def gather(settings: Settings, queue: Queue | None = None, now: datetime | None = None) -> Status:
    """Read every figure, each on its own; a dependency found down is not asked again."""
    now = now or utc_now()
    status = Status(settings.profile, now)
    down: dict[str, str] = {}

    def attempt(dependency: str, figures: tuple[str, ...], read: Callable[[], T]) -> T | None:
        if dependency not in down:
            try:
                return read()
            except Exception as exc:  # the screen shows what it can; this part is down
                down[dependency] = reason(exc)
        for figure in figures:
            status.unavailable[figure] = f"{dependency}: {down[dependency]}"
        return None

    q = queue or queue_of(settings)
    recovery = ("lag", "snapshot_age_seconds", "oldest_pending_age_seconds")
    snapshot = attempt("recovery store", recovery, lambda: read_positions(settings))
    if snapshot is not None:
        positions, newest = snapshot
        if newest is not None:
            status.snapshot_age_seconds = max(0.0, (now - newest).total_seconds())
        status.lag = attempt(q.name, ("lag",), lambda: q.lag(positions))
        oldest = attempt(
            q.name, ("oldest_pending_age_seconds",), lambda: q.oldest_unread(positions)
        )
        if oldest is not None:
            status.oldest_pending_age_seconds = max(0.0, now.timestamp() - oldest)
    since = now - timedelta(seconds=WINDOW_S)
    queued = attempt(q.name, ("accepted_per_second",), lambda: q.queued_since(since))
    status.accepted_per_second = None if queued is None else queued / WINDOW_S
    status.dead_letters = attempt(q.name, ("dead_letters",), q.dead_letters)
    today = business_today(settings.business_timezone)
    counts = attempt(
        "trade store",
        ("rows", "decided_per_second"),
        lambda: wiring.trade_store(settings, reads_only=True).counts(today, since),
    )
    if counts is not None:
        status.decided_per_second = counts["decided_since"] / WINDOW_S
        status.rows = {
            "trades": counts["trades"],
            "trades_live": counts["trades"] - counts["expired"],
            "trades_expired": counts["expired"],
            "decision_log": counts["decision_log"],
        }
    return status


def as_json(status: Status) -> dict[str, Any]:
    """The ``--json`` object; its fields are documented in README "Status"."""

    def rounded(value: float | None, digits: int) -> float | None:
        return None if value is None else round(value, digits)

    lag = status.lag
    return {
        "profile": status.profile,
        "at": status.at.isoformat().replace("+00:00", "Z"),
        "ok": not status.unavailable,
        "lag": None
        if lag is None
        else {
            "total": sum(lag.values()),
            "partitions": {str(p): n for p, n in sorted(lag.items())},
        },
        "snapshot_age_seconds": rounded(status.snapshot_age_seconds, 1),
        "throughput": {
            "window_seconds": WINDOW_S,
            "accepted_per_second": rounded(status.accepted_per_second, 2),
            "decided_per_second": rounded(status.decided_per_second, 2),
        },
        "dead_letters": status.dead_letters,
        "oldest_pending_age_seconds": rounded(status.oldest_pending_age_seconds, 1),
        "rows": status.rows,
        "unavailable": dict(sorted(status.unavailable.items())),
    }


def summary(status: Status) -> list[tuple[str, str, bool]]:
    """The screen's lines: (label, value, whether it could be read), for both layouts."""
    missing = status.unavailable

    def line(label: str, figure: str, shown: Callable[[], str]) -> tuple[str, str, bool]:
        if figure in missing:
            return label, f"unavailable ({missing[figure]})", False
        return label, shown(), True

    lag, rows = status.lag or {}, status.rows or {}
    age, oldest = status.snapshot_age_seconds, status.oldest_pending_age_seconds
    lines = [
        ("profile", status.profile, True),
        line("lag (records)", "lag", lambda: f"{sum(lag.values()):,}"),
        line(
            "snapshot age",
            "snapshot_age_seconds",
            lambda: "none yet" if age is None else f"{age:.1f} s",
        ),
        line(
            "oldest pending",
            "oldest_pending_age_seconds",
            lambda: "none" if oldest is None else f"{oldest:.1f} s",
        ),
        line(
            f"accepted/s (last {WINDOW_S} s)",
            "accepted_per_second",
            lambda: f"{status.accepted_per_second:,.2f}",
        ),
        line(
            f"decided/s (last {WINDOW_S} s)",
            "decided_per_second",
            lambda: f"{status.decided_per_second:,.2f}",
        ),
        line("dead letters", "dead_letters", lambda: f"{status.dead_letters:,}"),
        line(
            "trades",
            "rows",
            lambda: (
                f"{rows['trades']:,} ({rows['trades_live']:,} live,"
                f" {rows['trades_expired']:,} expired)"
            ),
        ),
        line("decision log", "rows", lambda: f"{rows['decision_log']:,}"),
    ]
    return lines + [(f"  partition {p}", f"{n:,}", True) for p, n in sorted(lag.items())]


def plain(status: Status) -> str:
    """The screen as text lines, for a pipe or a file."""
    lines = summary(status)
    width = max(len(label) for label, _, _ in lines)
    return "\n".join(f"{label:<{width}}  {value}" for label, value, _ in lines)


def show_rich(status: Status, console: Console | None = None) -> None:
    """The screen as a table on a terminal; what could not be read in red."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"trade-store status  {as_json(status)['at']}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for label, value, read in summary(status):
        table.add_row(label, Text(value, style="" if read else "red"))
    (console or Console()).print(table)


def run(settings: Settings, as_json_out: bool) -> int:
    status = gather(settings)
    if as_json_out:
        print(json.dumps(as_json(status), indent=2))
    elif sys.stdout.isatty():
        show_rich(status)
    else:
        print(plain(status))
    if status.unavailable:
        print(
            f"trade-store status: could not read {', '.join(sorted(status.unavailable))}",
            file=sys.stderr,
        )
        return 1
    return 0
