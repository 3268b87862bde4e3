"""The processing service: the trade dataflow for the configured profile, and its sweeps.

``python -m bytewax.run "cli.processor:flow()"`` runs the same dataflow under Bytewax's own
runner (pass -r/-s/-b for recovery yourself); ``trade-store process`` does it for you.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from bytewax import operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.errors import BytewaxRuntimeError
from bytewax.outputs import Sink
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from adapters import wiring
from adapters.inbound_log import delete_dead_letters
from adapters.sql import SqlTradeStore
from adapters.sqlite_status import SqliteStatusStore
from config.clock import business_today, utc_now
from config.runtime import tune_gc
from config.settings import Settings, get_settings
from dataflows.trades import build_flow
from domain.dead_letter import DeadLetter
from domain.ports import TradeSweeps, Unavailable
from sinks.dead_letter import KafkaDeadLetterSink, SqliteDeadLetterSink
from sources.kafka import kafka_inbound
from sources.sqlite_log import SqliteLogSource, resume_positions

log = structlog.get_logger("processor")

INBOUND_STEP = "inbound-log"


def flow(settings: Settings | None = None) -> Dataflow:
    """The trade dataflow wired for the configured profile."""
    cfg = settings or get_settings()
    log_path = wiring.inbound_log_path(cfg)

    def inbound(f: Dataflow) -> Stream[Any]:
        if cfg.embedded:
            source = SqliteLogSource(log_path, cfg.inbound_partitions, cfg.source_batch_size)
            return op.input(INBOUND_STEP, f, source)
        return kafka_inbound(
            f, cfg.kafka_bootstrap_servers, cfg.inbound_topic, cfg.source_batch_size
        )

    dead_letters: Sink[DeadLetter] = (
        SqliteDeadLetterSink(log_path)
        if cfg.embedded
        else KafkaDeadLetterSink(cfg.kafka_bootstrap_servers, cfg.dlq_topic)
    )
    return build_flow(
        inbound=inbound,
        trades=lambda: wiring.trade_store(cfg),
        statuses=lambda: wiring.status_store(cfg),
        dead_letters=dead_letters,
    )


class Periodic(threading.Thread):
    """A daemon thread that calls ``tick`` at start and then every ``every_s`` until stopped."""

    def __init__(self, name: str, every_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self._every_s = every_s
        self._stopping = threading.Event()

    def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._stopping.is_set():
            self.tick()
            self._stopping.wait(self._every_s)

    def stop(self) -> None:
        self._stopping.set()


class ExpirySweeper(Periodic):
    """Marks matured trades expired at start and whenever the business date changes."""

    def __init__(self, store: TradeSweeps, timezone: str, every_s: float) -> None:
        super().__init__("expiry-sweeper", every_s)
        self._store = store
        self._timezone = timezone
        self.swept_on: date | None = None

    def tick(self) -> None:
        self.sweep_if_due()

    def sweep_if_due(self) -> None:
        today = business_today(self._timezone)
        if today == self.swept_on:
            return
        try:
            count = self._store.expire(today)
        except Unavailable as exc:
            log.warning("expiry sweep postponed", error=str(exc))
            return
        self.swept_on = today
        log.info("expiry sweep", business_date=today.isoformat(), expired=count)


class RetentionSweeper(Periodic):
    """Deletes what has outlived its retention (README "Retention"), at start and then every
    ``TRADE_STORE_RETENTION_CHECK_SECONDS``. Trades themselves are kept: the store of record.
    """

    def __init__(
        self, settings: Settings, inbound_step_id: str, trades: SqlTradeStore | None = None
    ) -> None:
        super().__init__("retention-sweeper", settings.retention_check_seconds)
        self._settings = settings
        self._step_id = inbound_step_id
        self._trades = trades or wiring.trade_store(settings)
        # Embedded only: in the services profile DynamoDB's TTL and the topics' retention.ms
        # do the rest.
        self._log = wiring.inbound_log(settings) if settings.embedded else None
        self._statuses = (
            SqliteStatusStore(self._log.path, settings.status_ttl_days) if self._log else None
        )

    def tick(self) -> None:
        self.sweep(utc_now())

    def sweep(self, now: datetime) -> dict[str, int]:
        """Run every deletion due at ``now``; one failing is logged and retried next time."""
        cfg = self._settings
        steps: dict[str, Callable[[], int]] = {
            "decisions": lambda: self._trades.delete_outcomes(now - cfg.decision_log_retention)
        }
        inbound, statuses = self._log, self._statuses
        if inbound is not None and statuses is not None:
            steps["statuses"] = lambda: statuses.delete_expired(now)
            steps["inbound_log"] = lambda: inbound.delete_read(
                resume_positions(cfg.recovery_path, self._step_id), now - cfg.inbound_retention
            )
            steps["dead_letters"] = lambda: delete_dead_letters(
                inbound.path, now - timedelta(days=cfg.dead_letter_retention_days)
            )
        deleted: dict[str, int] = {}
        for name, step in steps.items():
            try:
                deleted[name] = step()
            except Exception as exc:  # a failing sweep never stops the processor
                log.warning("retention sweep step failed", step=name, error=str(exc))
        log.info("retention sweep", **deleted)
        return deleted


def ensure_recovery_dir(path: Path, partitions: int) -> None:
    """Create Bytewax's recovery partitions on first start; reuse them afterwards."""
    if path.exists() and any(path.iterdir()):
        return
    path.mkdir(parents=True, exist_ok=True)
    init_db_dir(path, partitions)
    log.info("recovery partitions created", path=str(path), partitions=partitions)


def run(
    settings: Settings,
    workers: int,
    process_id: int | None = None,
    addresses: list[str] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM: create topics if missing, sweep expiry, process the queue."""
    # Explicitly: a process started in the background inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    sweepers: list[Periodic] = []
    try:
        created = wiring.create_topics(settings)
        if created:
            log.info("topics created", topics=created)
        ensure_recovery_dir(settings.recovery_path, settings.recovery_partitions)
        dataflow = flow(settings)
        trades = wiring.trade_store(settings)  # one engine for both sweeps
        sweepers = [
            ExpirySweeper(trades, settings.business_timezone, settings.expiry_check_seconds),
            RetentionSweeper(settings, f"{dataflow.flow_id}.{INBOUND_STEP}", trades),
        ]
        for sweeper in sweepers:
            sweeper.start()
        log.info("processor started", profile=settings.profile, workers=workers)
        tune_gc()
        cli_main(
            dataflow,
            workers_per_process=workers,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=timedelta(seconds=settings.snapshot_interval_seconds),
            recovery_config=RecoveryConfig(settings.recovery_path),
        )
    except (BytewaxRuntimeError, KeyboardInterrupt) as exc:
        # Bytewax reports a signal as an error; for us it is the normal way to stop.
        if not _interrupted(exc):
            raise
    finally:
        for sweeper in sweepers:
            sweeper.stop()
        log.info("processor stopped")


def _interrupted(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt) or "signal received" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt
