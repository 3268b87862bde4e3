"""``trade-store status`` run as a command against a real processor: embedded on SQLite
files, services on Kafka, PostgreSQL and dynoxide. Traffic is queued while the processor
is stopped (lag, an oldest pending age), then decided (lag 0, row counts, dead letters);
a dependency down gives the figures that could still be read and exit status 1."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from adapters import wiring
from adapters.inbound_log import APPEND, encode_headers
from adapters.sqlite_file import write_once
from cli.migrate import upgrade
from config.clock import business_today
from config.settings import Settings
from domain.message import TradeMessage, encode
from domain.trade import Trade
from tests.conftest import own_topics, settings_env, unique
from tests.support import free_port, pending_of, start, stop, wait_for, write_pending

TODAY = business_today("UTC")
# What the queue alone gives; with it down, the rest is still shown.
QUEUE_FIGURES = {"lag", "oldest_pending_age_seconds", "accepted_per_second", "dead_letters"}


def status(settings: Settings, *args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "status", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def status_json(settings: Settings) -> dict[str, Any]:
    code, out, err = status(settings, "--json")
    assert code == 0, err
    shown: dict[str, Any] = json.loads(out)
    return shown


def message(trade_id: str, version: int, accepted_at: datetime) -> TradeMessage:
    return TradeMessage(
        request_id=str(uuid.uuid4()),
        correlation_id=unique("corr"),
        accepted_on=TODAY,
        accepted_at=accepted_at,
        trade=Trade(trade_id, version, "CP-1", "B1", TODAY + timedelta(days=30), TODAY),
    )


@pytest.fixture
def embedded(tmp_path: Path) -> Settings:
    settings = Settings(
        profile="embedded",
        data_dir=tmp_path / "data",
        inbound_partitions=4,
        snapshot_interval_seconds=0.5,
    )
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"], env=settings_env(settings), check=True
    )
    return settings


def queue_embedded(settings: Settings, messages: list[TradeMessage]) -> None:
    """As the embedded intake queues them: each PENDING record with its log entry."""
    statuses = wiring.status_store(settings)
    write_pending(statuses, *(pending_of(m) for m in messages))  # type: ignore[arg-type]
    wiring.inbound_log(settings).append_many(messages)


def settled(settings: Settings, decided: int) -> dict[str, Any] | None:
    """The status once the processor has caught up: lag 0 and ``decided`` logged."""
    shown = status_json(settings)
    caught_up = shown["lag"]["total"] == 0 and shown["rows"]["decision_log"] == decided
    return shown if caught_up else None


def test_embedded_status_follows_the_processor(
    embedded: Settings, children: list[subprocess.Popen[bytes]]
) -> None:
    now = datetime.now(UTC)
    first = [message(unique("T"), 1, now), message(unique("T"), 1, now)]
    queue_embedded(embedded, first)
    env = settings_env(embedded)
    children.append(start("status-embedded-1", ["process"], env))
    shown = wait_for(lambda: settled(embedded, 2), 60, "the first two decided", every=0.5)
    assert shown["rows"] == {"trades": 2, "trades_live": 2, "trades_expired": 0, "decision_log": 2}
    assert shown["oldest_pending_age_seconds"] is None
    assert stop(children.pop()) == 0

    # Queued while the processor is stopped, 20 s ago: one stale version and a poison record.
    earlier = now - timedelta(seconds=20)
    t1 = first[0].trade.trade_id
    second = [message(t1, 3, earlier), message(t1, 2, earlier), message(unique("T"), 1, earlier)]
    queue_embedded(embedded, second)
    write_once(
        wiring.inbound_log_path(embedded),
        APPEND,
        [(0, b"P", b"{not json", encode_headers([]), int(earlier.timestamp()))],
        "test",
    )
    behind = status_json(embedded)
    assert behind["ok"] is True
    assert behind["lag"]["total"] == 4
    assert sum(behind["lag"]["partitions"].values()) == 4
    assert 19 <= behind["oldest_pending_age_seconds"] < 60
    assert behind["throughput"]["accepted_per_second"] == round(6 / 60, 2)
    assert behind["dead_letters"] == 0
    assert behind["rows"]["trades"] == 2

    children.append(start("status-embedded-2", ["process"], env))
    after = wait_for(lambda: settled(embedded, 5), 60, "the rest decided", every=0.5)
    assert after["rows"] == {"trades": 4, "trades_live": 4, "trades_expired": 0, "decision_log": 5}
    assert after["dead_letters"] == 1
    assert after["oldest_pending_age_seconds"] is None
    assert after["throughput"]["decided_per_second"] == round(5 / 60, 2)
    assert after["snapshot_age_seconds"] is not None
    assert after["snapshot_age_seconds"] < 30
    assert after["unavailable"] == {}

    code, text, _ = status(embedded)  # not a terminal: plain lines
    assert code == 0
    assert "dead letters" in text
    assert "4 (4 live, 0 expired)" in text


def test_embedded_status_with_the_log_unreadable_shows_the_rest(embedded: Settings) -> None:
    wiring.inbound_log_path(embedded).write_bytes(b"not a database" * 100)
    code, out, err = status(embedded, "--json")
    assert code == 1
    shown = json.loads(out)
    assert shown["ok"] is False
    assert shown["rows"] == {"trades": 0, "trades_live": 0, "trades_expired": 0, "decision_log": 0}
    assert shown["lag"] is None
    assert shown["dead_letters"] is None
    assert set(shown["unavailable"]) == QUEUE_FIGURES
    assert all(why.startswith("inbound log: ") for why in shown["unavailable"].values())
    assert "could not read" in err

    code, text, _ = status(embedded)
    assert code == 1
    assert "unavailable (inbound log: " in text
    assert "decision log" in text


@pytest.fixture
def services(migrated: Settings, tmp_path: Path, own_schema: str) -> Settings:
    """A trade store of its own: the session's is swept by other tests' processors (old
    decisions deleted, matured trades expired), which would move the counts compared."""
    upgrade(own_schema)
    return own_topics(
        migrated, tmp_path, database_url=SecretStr(own_schema), snapshot_interval_seconds=0.5
    )


def test_services_status_follows_the_processor(
    services: Settings, children: list[subprocess.Popen[bytes]]
) -> None:
    before = status_json(services)  # the session's store may hold other tests' rows
    assert before["lag"]["total"] == 0
    assert before["dead_letters"] == 0
    producer = Producer({"bootstrap.servers": services.kafka_bootstrap_servers})
    now = datetime.now(UTC)
    messages = [message(unique("T"), 1, now) for _ in range(3)]
    for m in messages:
        headers = [("request_id", m.request_id), ("correlation_id", m.correlation_id)]
        producer.produce(
            services.inbound_topic, key=m.trade.trade_id, value=encode(m), headers=headers
        )
    producer.produce(services.inbound_topic, key=b"P", value=b"{not json")
    assert producer.flush(10) == 0

    behind = status_json(services)
    assert behind["lag"]["total"] == 4
    assert 0 <= behind["oldest_pending_age_seconds"] < 60
    assert behind["throughput"]["accepted_per_second"] == round(4 / 60, 2)
    assert behind["rows"] == before["rows"]

    children.append(start("status-services", ["process"], settings_env(services)))
    decided = before["rows"]["decision_log"] + 3
    after = wait_for(lambda: settled(services, decided), 90, "all decided", every=0.5)
    rows = {k: v + (3 if k != "trades_expired" else 0) for k, v in before["rows"].items()}
    assert after["rows"] == rows
    assert after["dead_letters"] == 1
    assert after["oldest_pending_age_seconds"] is None
    assert after["throughput"]["decided_per_second"] >= round(3 / 60, 2)

    # Kafka down (nothing listens there): the trade store's figures are still shown.
    down = services.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    code, out, err = status(down, "--json")
    assert code == 1, err
    shown = json.loads(out)
    assert shown["rows"] == rows
    assert shown["lag"] is None
    assert shown["dead_letters"] is None
    assert set(shown["unavailable"]) == QUEUE_FIGURES
    assert all(why.startswith("Kafka: ") for why in shown["unavailable"].values())
