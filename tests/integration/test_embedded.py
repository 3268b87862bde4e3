"""The embedded profile's own parts: the SQLite inbound log and a processor restart on it."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters import wiring
from adapters.inbound_log import SqliteInboundLog, partition_of, read_partition
from adapters.sqlite_file import connect
from adapters.sqlite_status import SqliteStatusStore
from config.clock import business_today
from config.settings import Settings
from domain.message import TradeMessage, decode
from domain.ports import Submission, Unavailable
from domain.status import RequestState, RequestStatus
from domain.trade import Trade
from tests.conftest import settings_env, unique
from tests.support import pending_of, start, stop, wait_for, write_pending

TODAY = business_today("UTC")


def message(trade_id: str, version: int) -> TradeMessage:
    return TradeMessage(
        request_id=str(uuid.uuid4()),
        correlation_id="corr",
        accepted_on=TODAY,
        accepted_at=datetime.now(UTC),
        trade=Trade(trade_id, version, "CP", "B", TODAY + timedelta(days=5), TODAY),
    )


@pytest.fixture
def embedded(tmp_path: Path) -> Settings:
    settings = Settings(
        profile="embedded", data_dir=tmp_path / "data", inbound_partitions=4, source_batch_size=50
    )
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"], env=settings_env(settings), check=True
    )
    wiring.create_topics(settings)
    return settings


def test_intake_commits_pending_and_log_entry_together(embedded: Settings) -> None:
    services = wiring.api_services(embedded)
    sent = [message(f"T{i % 5}", i + 1) for i in range(40)]

    async def accept() -> None:
        await asyncio.gather(
            *(services.intake.accept(Submission([(pending_of(m), m)])) for m in sent)
        )

    asyncio.run(accept())
    services.close()
    statuses = wiring.status_store(embedded)
    assert all(statuses.get(m.request_id).state is RequestState.PENDING for m in sent)  # type: ignore[union-attr]
    reader = connect(wiring.inbound_log_path(embedded))
    logged = [r for p in range(4) for r in read_partition(reader, p, 0, 1000)]
    assert sorted(decode(r.value).request_id for r in logged) == sorted(m.request_id for m in sent)


def test_intake_that_cannot_log_leaves_no_pending_record(embedded: Settings) -> None:
    """One transaction: when the log entry fails, the PENDING record is rolled back too."""
    path = wiring.inbound_log_path(embedded)
    services = wiring.api_services(embedded)  # (creates the log's tables if missing)
    conn = connect(path)
    conn.execute("ALTER TABLE inbound_log RENAME TO inbound_log_away")
    lost = message("T1", 1)
    with pytest.raises(Unavailable):
        asyncio.run(services.intake.accept(Submission([(pending_of(lost), lost)])))
    services.close()
    assert conn.execute("SELECT count(*) FROM request_status").fetchone() == (0,)


def test_migrate_adopts_statuses_from_a_separate_status_file(tmp_path: Path) -> None:
    """Earlier versions kept statuses in data/status.db; they stay readable after upgrade."""
    settings = Settings(profile="embedded", data_dir=tmp_path / "data")
    old = SqliteStatusStore(settings.data_dir / "status.db", ttl_days=7)
    old.ensure_schema()
    kept = message("T1", 1)
    write_pending(old, pending_of(kept))
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"], env=settings_env(settings), check=True
    )
    got = wiring.status_store(settings).get(kept.request_id)
    assert got is not None
    assert got.state is RequestState.PENDING
    assert not (settings.data_dir / "status.db").exists()
    assert (settings.data_dir / "status.db.adopted").exists()


def test_log_keeps_per_partition_order_and_survives_reopen(embedded: Settings) -> None:
    log = wiring.inbound_log(embedded)
    sent = [message(f"T{i % 7}", i + 1) for i in range(50)]
    for m in sent:  # one message per transaction
        log.append_many([m])
    reader = connect(log.path)
    got = [r for p in range(log.partitions) for r in read_partition(reader, p, 0, 1000)]
    assert len(got) == 50
    for p in range(log.partitions):
        records = read_partition(reader, p, 0, 1000)
        assert [r.seq for r in records] == sorted(r.seq for r in records)
        for r in records:
            m = decode(r.value)
            assert partition_of(m.trade.trade_id, log.partitions) == p
            assert dict(r.headers)["request_id"] == m.request_id.encode()
    # Resuming after a seq returns only what follows it.
    first = read_partition(reader, 0, 0, 2)
    assert read_partition(reader, 0, first[-1].seq, 1000)[0].seq > first[-1].seq
    reader.close()


def test_bulk_append(embedded: Settings) -> None:
    log = SqliteInboundLog(embedded.data_dir / "inbound.db", 4)
    assert log.append_many(message(f"B{i}", 1) for i in range(100)) == 100
    with sqlite3.connect(log.path) as conn:
        assert conn.execute("SELECT count(*) FROM inbound_log").fetchone()[0] == 100


def test_processor_restart_loses_nothing(
    embedded: Settings, children: list[subprocess.Popen[bytes]]
) -> None:
    """SIGKILL mid-stream, restart on the same files: every request ends as it should."""
    ids = [unique("T") for _ in range(500)]
    rounds = [[message(tid, v) for tid in ids] for v in range(1, 6)]
    rounds.append([message(tid, 2) for tid in ids])  # stale
    log = wiring.inbound_log(embedded)
    for r in rounds:
        log.append_many(r)
    store = wiring.trade_store(embedded)
    statuses = wiring.status_store(embedded)
    env = settings_env(embedded)

    children.append(start("embedded-processor-1", ["process"], env))
    wait_for(lambda: store.heads(ids[:50]), 60, "some progress", every=0.01)
    children[-1].send_signal(signal.SIGKILL)
    children[-1].wait(10)
    heads = store.heads(ids)
    assert len(heads) < len(ids) or min(heads.values()) < 5, "killed too late to test a restart"

    children.append(start("embedded-processor-2", ["process"], env))

    def states() -> dict[str, RequestState] | None:
        got = {}
        for m in (m for r in rounds for m in r):
            status = statuses.get(m.request_id)
            if status is None or not status.state.terminal:
                return None
            got[m.request_id] = status.state
        return got

    final = wait_for(states, 180, "every request terminal", every=1)
    assert stop(children[-1], signal.SIGTERM) == 0
    expected = {m.request_id: RequestState.SUCCESS for r in rounds[:-1] for m in r}
    expected.update({m.request_id: RequestState.FAILED for m in rounds[-1]})
    assert final == expected
    for tid in ids:
        assert [r.trade.version for r in store.versions(tid, TODAY)] == [1, 2, 3, 4, 5]


def test_dead_letters_are_kept(embedded: Settings, children: list[subprocess.Popen[bytes]]) -> None:
    path = embedded.data_dir / "inbound.db"
    bad = unique("bad")
    statuses = wiring.status_store(embedded)
    now = datetime.now(UTC)
    write_pending(statuses, RequestStatus(bad, RequestState.PENDING, "T", 1, now, now))  # type: ignore[arg-type]
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO inbound_log (partition, key, value, headers) VALUES (0, ?, ?, ?)",
            (b"T", b"garbage", f'[["request_id", "{bad}"]]'),
        )
    children.append(start("embedded-processor-dlq", ["process"], settings_env(embedded)))
    failed = wait_for(
        lambda: (s := statuses.get(bad)) and s.state.terminal and s, 60, "the bad request FAILED"
    )
    assert failed.state is RequestState.FAILED
    with sqlite3.connect(path) as conn:
        seq = conn.execute("SELECT max(seq) FROM inbound_log").fetchone()[0]
        reason, value, headers = conn.execute(
            "SELECT reason, value, headers FROM dead_letters"
        ).fetchone()
    assert (reason, value) == ("value is not JSON", b"garbage")
    assert json.loads(headers) == [
        ["request_id", bad],
        ["dlq_reason", "value is not JSON"],
        ["__connect.errors.topic", "inbound_log"],
        ["__connect.errors.partition", "0"],
        ["__connect.errors.offset", str(seq)],
    ]
