"""Helpers for tests: running our commands as real processes, polling, seeding a trade
store, and PENDING records in the embedded status table."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from adapters.sqlite_file import write_once
from adapters.sqlite_status import PUT_PENDING, SqliteStatusStore
from domain.message import TradeMessage
from domain.ports import DecisionStore
from domain.status import Outcome, RequestState, RequestStatus
from domain.trade import Decision, Trade
from domain.use_cases import record_dead_letters, record_decisions

T = TypeVar("T")
LOGS = Path(__file__).parent.parent / ".services" / "test-logs"


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy, or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``python -m cli.main ARGS`` with its output in .services/test-logs/NAME.log."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = (LOGS / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args], env=env, stdout=log, stderr=log
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Signal the process and wait for it; kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def upsert(store: DecisionStore, trades: Sequence[Trade]) -> set[tuple[str, int]]:
    """Rows written straight into a trade store, in one transaction of its own (seeding a
    test, or a client other than the processor); the keys written."""
    with store.transaction() as log:
        return log.upsert(trades)


def record(store: DecisionStore, decided: Sequence[Decision]) -> list[Outcome]:
    """The processor's use case, stamped now."""
    return record_decisions(store, decided, datetime.now(UTC))


def record_failed(store: DecisionStore, failed: Sequence[Outcome]) -> list[Outcome]:
    """The processor's use case for dead letters, stamped now."""
    return record_dead_letters(store, failed, datetime.now(UTC))


def pending_of(m: TradeMessage) -> RequestStatus:
    """The PENDING record the intake writes for ``m``."""
    return RequestStatus(
        m.request_id,
        RequestState.PENDING,
        m.trade.trade_id,
        m.trade.version,
        m.accepted_at,
        m.accepted_at,
    )


def write_pending(store: SqliteStatusStore, *statuses: RequestStatus) -> None:
    """PENDING records with the embedded intake's statement and rows, without log entries:
    the SQLite status store itself takes no PENDING writes (``SqliteIntake`` does)."""
    write_once(store.path, PUT_PENDING, [store.pending_row(s) for s in statuses], "test")
