"""`trade-store replay` in both profiles: the embedded log into SQLite files, and Kafka into
PostgreSQL schemas of their own (a replay target starts empty), beside a live store made by
the live processor (`trade-store process`) from the same queue."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import select, text

from adapters import wiring
from adapters.inbound_log import APPEND, decode_headers, encode_headers, partition_of
from adapters.kafka import headers_of
from adapters.sql import SqlTradeStore, make_engine
from adapters.sqlite_file import write_once
from adapters.tables import request_outcomes, trades
from cli.migrate import migrate
from cli.replay import target_url
from config.clock import business_today
from config.settings import Settings
from domain.message import TradeMessage, encode
from domain.status import RequestStatus
from domain.trade import Trade
from tests.conftest import own_topics, settings_env, unique
from tests.support import start, stop, wait_for

TODAY = business_today("UTC")


def message(
    trade_id: str,
    version: int,
    counterparty: str = "CP-1",
    maturity_days: int = 30,
    accepted_days_ago: int = 0,
    accepted_at: datetime | None = None,
) -> TradeMessage:
    accepted_on = TODAY - timedelta(days=accepted_days_ago)
    return TradeMessage(
        request_id=str(uuid.uuid4()),
        correlation_id=unique("corr"),
        accepted_on=accepted_on,
        accepted_at=accepted_at or datetime.now(UTC),
        trade=Trade(
            trade_id,
            version,
            counterparty,
            "B1",
            accepted_on + timedelta(days=maturity_days),
            accepted_on,
        ),
    )


def history() -> list[TradeMessage]:
    """Every kind of decision, in queue order: new versions, a stale one, a same-version
    replacement, a maturity passed when accepted, and one that matured since (expired now)."""
    ids = [unique("T") for _ in range(12)]
    out = [message(t, 1) for t in ids]
    out += [message(t, 2) for t in ids[:8]]
    out += [message(t, 1) for t in ids[:4]]  # stale
    out += [message(t, 2, counterparty="CP-2") for t in ids[4:6]]  # replaces version 2
    out += [message(unique("T-matured"), 1, maturity_days=-1)]  # MATURITY_PASSED
    out += [message(unique("T-exp"), 1, maturity_days=5, accepted_days_ago=10)]  # expired now
    return out


BROKEN = b"{broken"


@dataclass
class Live:
    """A live store, decided by the live processor from a queue of its own."""

    settings: Settings
    messages: list[TradeMessage]
    url: str

    @property
    def trade_ids(self) -> list[str]:
        return sorted({m.trade.trade_id for m in self.messages})

    @property
    def request_ids(self) -> list[str]:
        return [m.request_id for m in self.messages]

    @property
    def records(self) -> int:
        """What the queue holds: the messages and one undecodable record."""
        return len(self.messages) + 1


def run_live(live: Live) -> Live:
    """Run the live processor until every message is decided."""
    settings = live.settings
    proc = start(f"replay-live-{settings.profile}", ["process"], settings_env(settings))
    statuses = wiring.status_store(settings)
    try:
        wait_for(
            lambda: all(
                (s := statuses.get(rid)) is not None and s.state.terminal
                for rid in live.request_ids
            ),
            90,
            "the live processor to decide every request",
            every=0.2,
        )
    finally:
        stop(proc)
    return live


def replay(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``trade-store replay ARGS``, with no terminal to confirm on."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "replay", *args],
        env=settings_env(settings),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


PLAN_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.MULTILINE)
PLAN_TOTAL = re.compile(r"^\s*total\s+(\d+)\s*$", re.MULTILINE)


def plan_of(stdout: str) -> tuple[dict[int, tuple[int, int, int]], int]:
    """The printed plan: partition → (start, end, count), and the total."""
    rows = {int(p): (int(s), int(e), int(c)) for p, s, e, c in PLAN_ROW.findall(stdout)}
    total = PLAN_TOTAL.search(stdout)
    assert total is not None, stdout
    return rows, int(total.group(1))


def read_line(stdout: str) -> tuple[int, int]:
    """The summary's "N of M records read"."""
    found = re.search(r"(\d+) of (\d+) records read", stdout)
    assert found is not None, stdout
    return int(found.group(1)), int(found.group(2))


def versions(url: str, trade_ids: list[str]) -> dict[str, list[tuple[Trade, bool]]]:
    """Every column but created_at/updated_at, ``expired`` as of today."""
    store = SqlTradeStore(make_engine(url, 1))
    return {t: [(r.trade, r.expired) for r in store.versions(t, TODAY)] for t in trade_ids}


def all_trade_ids(url: str) -> set[str]:
    engine = make_engine(url, 1)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(trades.c.trade_id)).scalars())
    finally:
        engine.dispose()


def everything(live: Live) -> tuple[list[Any], list[Any], dict[str, RequestStatus | None]]:
    """The live store's rows of these trades, their decision log and their statuses, to
    the byte."""
    engine = make_engine(live.url, 1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(trades)
                .where(trades.c.trade_id.in_(live.trade_ids))
                .order_by(trades.c.trade_id, trades.c.version)
            ).all()
            log = conn.execute(
                select(request_outcomes)
                .where(request_outcomes.c.request_id.in_(live.request_ids))
                .order_by(request_outcomes.c.request_id)
            ).all()
    finally:
        engine.dispose()
    store = wiring.status_store(live.settings)
    statuses = {rid: store.get(rid) for rid in live.request_ids}
    return [tuple(r) for r in rows], [tuple(r) for r in log], statuses


def ids_of(messages: list[TradeMessage]) -> set[str]:
    return {m.request_id for m in messages}


Positions = list[tuple[int, int, str | None]]  # (partition, offset, request_id) per record


def assert_plan(
    rows: dict[int, tuple[int, int, int]], held: Positions, groups: list[list[TradeMessage]]
) -> None:
    """Per partition: from the first record of the middle group to the first of the last
    (or the end of what the partition held), counting the middle group's records."""
    middle, last = ids_of(groups[1]), ids_of(groups[2])
    for partition, (first, end, count) in rows.items():
        mine = [o for p, o, rid in held if p == partition and rid in middle]
        after = [o for p, o, rid in held if p == partition and rid in last]
        offsets = [o for p, o, _ in held if p == partition]
        assert end == (min(after) if after else max(offsets, default=-1) + 1)
        assert (first, count) == ((min(mine), len(mine)) if mine else (end, 0))
    assert sum(c for _, _, c in rows.values()) == len(groups[1])


# --- embedded --------------------------------------------------------------------------


def embedded_settings(data_dir: Path) -> Settings:
    settings = Settings(
        profile="embedded",
        data_dir=data_dir,
        inbound_partitions=4,
        source_batch_size=50,
        snapshot_interval_seconds=0.5,
    )
    migrate(settings)
    return settings


def append(settings: Settings, messages: list[TradeMessage]) -> None:
    wiring.inbound_log(settings).append_many(messages)


@pytest.fixture(scope="module")
def embedded_live(tmp_path_factory: pytest.TempPathFactory) -> Live:
    settings = embedded_settings(tmp_path_factory.mktemp("replay-embedded") / "data")
    live = Live(settings, history(), settings.trade_store_url)
    append(settings, live.messages)
    broken = (
        partition_of("T-broken", settings.inbound_partitions),
        b"T-broken",
        BROKEN,
        encode_headers([("request_id", str(uuid.uuid4()))]),
        int(time.time()),
    )
    write_once(wiring.inbound_log_path(settings), APPEND, [broken], "test")
    return run_live(live)


def log_positions(settings: Settings) -> Positions:
    conn = sqlite3.connect(wiring.inbound_log_path(settings))
    try:
        rows = conn.execute("SELECT partition, seq, headers FROM inbound_log").fetchall()
    finally:
        conn.close()
    return [(p, seq, dict(decode_headers(h))["request_id"].decode()) for p, seq, h in rows]


# --- services: Kafka, PostgreSQL, DynamoDB ----------------------------------------------


def produce(settings: Settings, messages: list[TradeMessage]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for m in messages:
        producer.produce(
            settings.inbound_topic,
            key=m.trade.trade_id.encode(),
            value=encode(m),
            headers=headers_of(m, None),
        )
    assert producer.flush(15) == 0


@pytest.fixture(scope="module")
def services_live(migrated: Settings, tmp_path_factory: pytest.TempPathFactory) -> Live:
    settings = own_topics(
        migrated, tmp_path_factory.mktemp("replay-services"), source_batch_size=50
    )
    live = Live(settings, history(), settings.database_url.get_secret_value())
    produce(settings, live.messages)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    producer.produce(settings.inbound_topic, key=b"T-broken", value=BROKEN)
    assert producer.flush(15) == 0
    return run_live(live)


def topic_records(settings: Settings) -> list[tuple[int, int, int, str | None]]:
    """(partition, offset, timestamp ms, request_id) of every record of the topic."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": unique("g")}
    )
    out: list[tuple[int, int, int, str | None]] = []
    try:
        for p in range(settings.inbound_partitions):
            _, high = consumer.get_watermark_offsets(TopicPartition(settings.inbound_topic, p), 10)
            consumer.assign([TopicPartition(settings.inbound_topic, p, 0)])
            deadline, offset = time.monotonic() + 30, -1
            while offset < high - 1 and time.monotonic() < deadline:
                for msg in consumer.consume(100, 1.0):
                    offset = msg.offset() or 0
                    rid = dict(msg.headers() or []).get("request_id")
                    named = rid.decode() if isinstance(rid, bytes) else None
                    out.append((p, offset, msg.timestamp()[1], named))
    finally:
        consumer.close()
    return out


# --- both profiles -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["embedded", "services"])
def live(request: pytest.FixtureRequest) -> Live:
    found: Live = request.getfixturevalue(f"{request.param}_live")
    return found


@pytest.fixture
def target(live: Live, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty target: a SQLite path (embedded; not even its folder exists) or a schema."""
    if live.settings.embedded:
        return str(tmp_path / "copy" / "trades.db")
    url: str = request.getfixturevalue("own_schema")
    return url


def untouched(target: str) -> bool:
    """Nothing was written to the target: no SQLite folder, or no table in the schema."""
    if "://" not in target:
        return not Path(target).parent.exists()
    engine = make_engine(target, 1)
    try:
        with engine.connect() as conn:
            return not conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            ).all()
    finally:
        engine.dispose()


def test_replay_into_an_empty_store_gives_the_live_trades_table(live: Live, target: str) -> None:
    done = replay(live.settings, "--from", "beginning", "--target-db", target, "--yes")
    assert done.returncode == 0, done.stderr
    assert plan_of(done.stdout)[1] == live.records
    assert read_line(done.stdout) == (live.records, live.records)
    expected = versions(live.url, live.trade_ids)
    assert versions(target_url(target), live.trade_ids) == expected
    assert all_trade_ids(target_url(target)) == {t for t, rows in expected.items() if rows}
    assert any(len(rows) > 1 for rows in expected.values())
    assert any(expired for rows in expected.values() for _, expired in rows)
    assert any(t.counterparty_id == "CP-2" for rows in expected.values() for t, _ in rows)


def test_replay_into_the_live_store_changes_nothing(live: Live) -> None:
    before = everything(live)
    done = replay(
        live.settings,
        "--from",
        "beginning",
        "--target-db",
        live.url,
        "--statuses",
        "write",
        "--yes",
    )
    assert done.returncode == 0, done.stderr
    assert read_line(done.stdout) == (live.records, live.records)
    assert everything(live) == before
    rows, log, statuses = before
    assert rows
    assert len(log) == len(live.messages)
    assert all(s is not None for s in statuses.values())


def test_dry_run_writes_nothing(live: Live, target: str) -> None:
    before = everything(live)
    dry = replay(live.settings, "--from", "beginning", "--target-db", target, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert plan_of(dry.stdout)[1] == live.records
    refused = replay(live.settings, "--from", "beginning", "--target-db", target)
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert untouched(target)
    assert everything(live) == before


def bounded(settings: Settings, since: datetime, until: datetime, target: str) -> Any:
    """Plan a replay from ``since`` until ``until`` (a dry run), then run it; the plan."""
    bounds = ("--from", since.isoformat(), "--until", until.isoformat(), "--target-db", target)
    planned = replay(settings, *bounds, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert untouched(target)
    done = replay(settings, *bounds, "--yes")
    assert done.returncode == 0, done.stderr
    plan = plan_of(planned.stdout)
    assert plan_of(done.stdout) == plan
    assert read_line(done.stdout) == (plan[1], plan[1])
    return plan[0]


def test_embedded_bounded_replay_starts_and_ends_where_the_plan_said(tmp_path: Path) -> None:
    settings = embedded_settings(tmp_path / "data")
    t0 = datetime.now(UTC).replace(microsecond=0)
    groups = [
        [message(unique(f"T{g}"), 1, accepted_at=t0 - timedelta(hours=3 - g)) for _ in range(20)]
        for g in range(3)
    ]
    for group in groups:
        append(settings, group)
    target = str(tmp_path / "bounded" / "trades.db")
    rows = bounded(settings, t0 - timedelta(hours=2), t0 - timedelta(hours=1), target)
    assert_plan(rows, log_positions(settings), groups)
    assert all_trade_ids(target_url(target)) == {m.trade.trade_id for m in groups[1]}


def test_services_bounded_replay_starts_and_ends_where_the_plan_said(
    migrated: Settings, tmp_path: Path, own_schema: str
) -> None:
    settings = own_topics(migrated, tmp_path, source_batch_size=50)
    groups = [[message(unique(f"T{g}"), 1) for _ in range(20)] for g in range(3)]
    for group in groups:
        produce(settings, group)
        time.sleep(0.3)  # the broker stamps each record as it appends it (LogAppendTime)
    records = topic_records(settings)
    stamp = {rid: ts for _, _, ts, rid in records}

    def between(earlier: list[TradeMessage], later: list[TradeMessage]) -> datetime:
        last = max(stamp[m.request_id] for m in earlier)
        return datetime.fromtimestamp((last + min(stamp[m.request_id] for m in later)) / 2000, UTC)

    rows = bounded(settings, between(*groups[:2]), between(*groups[1:]), own_schema)
    assert_plan(rows, [(p, o, rid) for p, o, _, rid in records], groups)
    assert all_trade_ids(own_schema) == {m.trade.trade_id for m in groups[1]}
