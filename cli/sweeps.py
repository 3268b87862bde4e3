"""The processor's sweeps, each a daemon thread beside the dataflow: expiry (flag matured
trades when the business date changes) and retention (delete what has outlived its time)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import date, datetime, timedelta

import structlog

from adapters import wiring
from adapters.inbound_log import delete_dead_letters
from adapters.sql import SqlTradeStore
from adapters.sqlite_status import SqliteStatusStore
from config.clock import business_today, utc_now
from config.settings import Settings
from domain.ports import TradeSweeps, Unavailable
from sinks.metrics import SnapshotReader
from sources.sqlite_log import resume_positions

log = structlog.get_logger("processor")


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
        self._trades = trades or wiring.trade_store(settings)
        # Embedded only: in the services profile DynamoDB's TTL and the topics' retention.ms
        # do the rest.
        self._log = wiring.inbound_log(settings) if settings.embedded else None
        self._statuses = (
            SqliteStatusStore(self._log.path, settings.status_ttl_days) if self._log else None
        )
        # In a child: read in the processor, the recovery store loses Bytewax's locks on it
        # (sinks.metrics), and Bytewax's snapshots stalled until the processor stopped.
        self._positions = SnapshotReader(
            settings.recovery_path, inbound_step_id, timeout_s=60, read=resume_positions
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
                self._positions(), now - cfg.inbound_retention
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

    def stop(self) -> None:
        super().stop()
        self._positions.close()
