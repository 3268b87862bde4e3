"""Retention and the embedded partition count: what each sweep deletes, what it keeps, and
an embedded data folder that stays bounded under steady load."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from adapters import sqlite_file, wiring
from adapters.inbound_log import (
    DEAD_LETTER,
    PartitionCountMismatch,
    SqliteInboundLog,
    delete_dead_letters,
)
from adapters.intake import SqliteIntake
from adapters.sql import SqlTradeStore
from adapters.sqlite_file import write_once
from adapters.sqlite_status import PUT_PENDING, SqliteStatusStore
from adapters.tables import request_outcomes
from cli.sweeps import RetentionSweeper
from config.clock import business_today, utc_now
from config.settings import Settings
from domain.message import TradeMessage
from domain.ports import Submission
from domain.status import RequestState, RequestStatus
from domain.trade import Trade
from tests.conftest import settings_env
from tests.support import start, stop, wait_for

TODAY = business_today("UTC")
# Whole seconds: expires_at and accepted_at are stored in seconds.
T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)
STEP_ID = "trades.inbound-log"


def message(trade_id: str, accepted_at: datetime | None = None) -> TradeMessage:
    return TradeMessage(
        request_id=str(uuid.uuid4()),
        correlation_id="corr",
        accepted_on=TODAY,
        accepted_at=accepted_at or utc_now(),
        trade=Trade(trade_id, 1, "CP", "B", TODAY + timedelta(days=30), TODAY),
    )


def pending(m: TradeMessage) -> RequestStatus:
    return RequestStatus(
        m.request_id, RequestState.PENDING, m.trade.trade_id, 1, m.accepted_at, m.accepted_at
    )


def migrate(settings: Settings) -> None:
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"], env=settings_env(settings), check=True
    )


@pytest.fixture
def embedded(tmp_path: Path) -> Settings:
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", inbound_partitions=4)
    migrate(settings)
    return settings


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# --- the partition count -------------------------------------------------------------------


def test_a_log_refuses_another_partition_count_than_it_was_created_with(
    embedded: Settings,
) -> None:
    path = wiring.inbound_log_path(embedded)
    SqliteInboundLog(path, 4).ensure_schema()  # the same count opens again
    with pytest.raises(PartitionCountMismatch) as refused:
        SqliteInboundLog(path, 8).ensure_schema()
    assert "created with 4 partitions" in str(refused.value)
    assert "TRADE_STORE_INBOUND_PARTITIONS is 8" in str(refused.value)
    assert "TRADE_STORE_INBOUND_PARTITIONS=4" in str(refused.value)


@pytest.mark.parametrize("command", ["serve", "process"])
def test_api_and_processor_refuse_to_start_on_another_partition_count(
    embedded: Settings, command: str
) -> None:
    env = settings_env(embedded.model_copy(update={"inbound_partitions": 6}))
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", command],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"trade-store {command}: refusing to start" in done.stderr
    assert "created with 4 partitions" in done.stderr
    assert "TRADE_STORE_INBOUND_PARTITIONS is 6" in done.stderr


def test_api_services_do_not_start_on_another_partition_count(embedded: Settings) -> None:
    with pytest.raises(PartitionCountMismatch):
        wiring.api_services(embedded.model_copy(update={"inbound_partitions": 3}))


OLD_LOG = """
CREATE TABLE inbound_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partition INTEGER NOT NULL,
    key BLOB,
    value BLOB,
    headers TEXT NOT NULL
);
"""


def test_a_log_from_before_the_record_adopts_the_setting_once(tmp_path: Path) -> None:
    path = tmp_path / "inbound.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_LOG)
        conn.execute("INSERT INTO inbound_log (partition, headers) VALUES (2, '[]')")
    SqliteInboundLog(path, 5).ensure_schema()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT partition, accepted_at FROM inbound_log").fetchall() == [
            (2, None)
        ]
        assert conn.execute("SELECT value FROM log_meta WHERE name = 'partitions'").fetchone() == (
            5,
        )
    SqliteInboundLog(path, 5).ensure_schema()
    with pytest.raises(PartitionCountMismatch):
        SqliteInboundLog(path, 12).ensure_schema()


# --- what each sweep deletes, and what it keeps ---------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 2, so the tests below also prove the chunk loop goes on to the end."""
    monkeypatch.setattr(sqlite_file, "DELETE_CHUNK", 2)
    monkeypatch.setattr("adapters.sql.DELETE_CHUNK", 2)


def test_expired_statuses_are_deleted_and_a_second_younger_one_survives(
    embedded: Settings, small_chunks: None
) -> None:
    store = SqliteStatusStore(wiring.inbound_log_path(embedded), ttl_days=7)
    old = [message(f"S{i}", T0) for i in range(5)]
    young = message("Y", T0 + SECOND)
    rows = [store.pending_row(pending(m)) for m in [*old, young]]
    write_once(store.path, PUT_PENDING, rows, "test")
    expiry = T0 + timedelta(days=7)
    assert store.delete_expired(expiry) == 0  # expired only once the second has passed
    assert store.delete_expired(expiry + SECOND) == 5
    with sqlite3.connect(store.path) as conn:
        left = conn.execute("SELECT request_id FROM request_status").fetchall()
    assert left == [(young.request_id,)]


def test_dead_letters_older_than_the_retention_are_deleted(
    embedded: Settings, small_chunks: None
) -> None:
    path = wiring.inbound_log_path(embedded)
    letters = [("bad", None, b"x", "[]", (T0 + i * SECOND).isoformat()) for i in range(6)]
    write_once(path, DEAD_LETTER, letters, "test")
    assert delete_dead_letters(path, T0 + 5 * SECOND) == 5
    with sqlite3.connect(path) as conn:
        left = conn.execute("SELECT created_at FROM dead_letters").fetchall()
    assert left == [((T0 + 5 * SECOND).isoformat(),)]


def test_log_entries_go_once_passed_and_old_enough(embedded: Settings, small_chunks: None) -> None:
    path = wiring.inbound_log_path(embedded)
    log = SqliteInboundLog(path, 4)
    with sqlite3.connect(path) as conn:  # one entry written before accepted_at was recorded
        conn.execute("INSERT INTO inbound_log (partition, headers) VALUES (0, '[]')")
    old = [message(f"L{i}", T0) for i in range(12)]
    young = [message(f"L{i}", T0 + SECOND) for i in range(12)]
    log.append_many([*old, *young])
    with sqlite3.connect(path) as conn:
        entries = conn.execute("SELECT seq, partition, accepted_at FROM inbound_log").fetchall()
    last = {p: max(seq for seq, part, _ in entries if part == p) for p in range(4)}
    # Partition 3 has no snapshot yet; partition 2's reader resumes after its first entry.
    first_of_2 = min(seq for seq, part, _ in entries if part == 2)
    positions = {0: last[0], 1: last[1], 2: first_of_2}

    deleted = log.delete_read(positions, T0 + SECOND)

    with sqlite3.connect(path) as conn:
        kept = {seq for (seq,) in conn.execute("SELECT seq FROM inbound_log")}
    young_at = int((T0 + SECOND).timestamp())
    old_in = {
        p: {seq for seq, part, at in entries if part == p and at != young_at} for p in range(4)
    }
    assert len(old_in[2]) >= 2 and old_in[3]  # noqa: PT018 — the layout this test needs
    expected_gone = old_in[0] | old_in[1] | {first_of_2}
    assert entries[0] == (entries[0][0], 0, None)  # no accepted_at: counts as old
    assert entries[0][0] in expected_gone
    assert kept == {seq for seq, _, _ in entries} - expected_gone
    assert deleted == len(expected_gone)


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlTradeStore]:
    if request.param == "postgresql":
        store: SqlTradeStore = request.getfixturevalue("trade_store")
        yield store
        return
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", inbound_partitions=4)
    migrate(settings)
    yield wiring.trade_store(settings)


def test_decision_log_rows_older_than_the_cut_off_are_deleted(
    sql_store: SqlTradeStore, small_chunks: None
) -> None:
    run = uuid.uuid4().hex[:8]
    rows = [
        {
            "request_id": f"{run}-{i}",
            "trade_id": "T",
            "version": 1,
            "state": "SUCCESS",
            "decided_at": T0 + (SECOND if i == 5 else timedelta(0)),
        }
        for i in range(6)
    ]
    engine = sql_store._engine
    with engine.begin() as conn:
        conn.execute(insert(request_outcomes), rows)

    def ours() -> list[str]:
        query = request_outcomes.select().where(request_outcomes.c.request_id.like(f"{run}-%"))
        with engine.begin() as conn:
            return sorted(row.request_id for row in conn.execute(query))

    assert sql_store.delete_outcomes(T0) == 0  # nothing was decided before T0
    assert len(ours()) == 6
    assert sql_store.delete_outcomes(T0 + SECOND) == 5
    assert ours() == [f"{run}-5"]


# --- the sweep on its own, and a bounded data folder ----------------------------------------


def test_the_processor_sweeps_on_its_own(embedded: Settings) -> None:
    path = wiring.inbound_log_path(embedded)
    write_once(path, DEAD_LETTER, [("bad", None, b"x", "[]", utc_now().isoformat())], "test")
    cfg = embedded.model_copy(
        update={"retention_check_seconds": 0.05, "dead_letter_retention_days": 0.2 / 86400}
    )
    sweeper = RetentionSweeper(cfg, STEP_ID)
    sweeper.start()
    try:
        wait_for(lambda: count(path, "dead_letters") == 0, 10, "the sweep to delete the letter")
    finally:
        sweeper.stop()
        sweeper.join(5)


def pages(path: Path) -> int:
    """The file's pages as SQLite counts them (WAL content included), free ones too."""
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA page_count").fetchone()[0])


def test_the_embedded_data_folder_stays_bounded_under_steady_load(tmp_path: Path) -> None:
    """Five rounds of the same load, each swept once past every retention: every table but
    trades ends each round empty, and the files stop growing after the first rounds."""
    day = 1 / 86400  # fractional days: the processor's own sweep deletes log entries and
    settings = Settings(  # dead letters within seconds; statuses and decisions by `later`
        profile="embedded",
        data_dir=tmp_path / "data",
        inbound_partitions=4,
        snapshot_interval_seconds=0.02,  # Bytewax writes its recovery store every ~166 epochs
        source_batch_size=500,
        retention_check_seconds=0.5,
        inbound_retention_days=1 * day,
        dead_letter_retention_days=1 * day,
    )
    migrate(settings)
    log_path, trades_path = wiring.inbound_log_path(settings), settings.data_dir / "trades.db"
    processor = start("retention-processor", ["process"], settings_env(settings))
    sweeper = RetentionSweeper(settings, STEP_ID)
    ids = [f"B{i}" for i in range(2000)]
    sizes: list[tuple[int, int]] = []
    try:
        for _ in range(5):
            inbound = SqliteInboundLog(log_path, settings.inbound_partitions)
            statuses = SqliteStatusStore(log_path, settings.status_ttl_days)
            intake = SqliteIntake(inbound, statuses, timedelta(days=settings.status_ttl_days))
            sent = [message(tid) for tid in ids]

            async def accept(batch: list[TradeMessage], intake: SqliteIntake = intake) -> None:
                await asyncio.gather(*(intake.accept(Submission([(pending(m), m)])) for m in batch))

            asyncio.run(accept(sent))
            intake.close()
            with sqlite3.connect(log_path) as conn:  # poison: three dead letters a round
                conn.executemany(
                    "INSERT INTO inbound_log (partition, key, value, headers, accepted_at)"
                    " VALUES (?, ?, ?, '[]', ?)",
                    [(p, b"P", b"garbage", int(utc_now().timestamp())) for p in range(3)],
                )

            def decided() -> bool:
                with sqlite3.connect(log_path) as conn:
                    done = conn.execute(
                        "SELECT count(*) FROM request_status WHERE status = 'SUCCESS'"
                    ).fetchone()[0]
                return bool(done == len(ids))

            wait_for(decided, 120, "the round decided", every=0.2)
            wait_for(
                lambda: (
                    count(log_path, "inbound_log") == 0 and count(log_path, "dead_letters") == 0
                ),
                60,
                "the processor's sweep to delete the log entries and dead letters",
                every=0.2,
            )
            later = utc_now() + settings.decision_log_retention + SECOND
            sweeper.sweep(later)
            assert count(log_path, "request_status") == 0
            assert count(trades_path, "request_outcomes") == 0
            assert count(trades_path, "trades") == len(ids)  # kept: the store of record
            sizes.append((pages(log_path), pages(trades_path)))
            wal = log_path.with_name(log_path.name + "-wal")
            print("inbound.db + WAL bytes:", log_path.stat().st_size, wal.stat().st_size)
    finally:
        assert stop(processor) == 0
    print("pages per round (inbound.db, trades.db):", sizes)
    warm = max(sizes[:2])
    for log_pages, trade_pages in sizes[2:]:
        assert log_pages <= warm[0] * 1.05
        assert trade_pages <= warm[1] * 1.05
