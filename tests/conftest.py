"""Shared fixtures. Tests under integration/ and e2e/ need scripts/services up."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]
from sqlalchemy import text

from adapters import wiring
from adapters.dynamodb import DynamoStatusStore, make_client
from adapters.sql import SqlTradeStore, make_engine
from config.settings import Settings

TEST_DATABASE_URL = os.environ.get(
    "TRADE_STORE_TEST_DATABASE_URL",
    "postgresql+psycopg://trade_store:trade_store@127.0.0.1:55432/trade_store_test",
)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for the real services, with topics and a status table of this session's own."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    run = uuid.uuid4().hex[:8]
    return Settings(
        profile="services",
        database_url=TEST_DATABASE_URL,  # type: ignore[arg-type]
        kafka_bootstrap_servers=os.environ.get(
            "TRADE_STORE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"
        ),
        dynamodb_endpoint_url=os.environ.get(
            "TRADE_STORE_DYNAMODB_ENDPOINT_URL", "http://127.0.0.1:4567"
        ),
        inbound_topic=f"trades-inbound-{run}",
        dlq_topic=f"trades-dlq-{run}",
        inbound_partitions=4,
        status_table=f"trade-requests-{run}",
        recovery_dir=Path(tmp_path_factory.mktemp("recovery")),
        snapshot_interval_seconds=0.5,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The TRADE_STORE_* environment that reproduces ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_STORE_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"TRADE_STORE_{name.upper()}"] = str(raw)
    env["TRADE_STORE_LOG_FORMAT"] = "json"
    return env


@pytest.fixture(scope="session")
def migrated(service_settings: Settings) -> Iterator[Settings]:
    """A fresh schema migrated by `trade-store migrate`, plus this session's topics and status
    table, which are deleted again at the end (dynalite slows down as its store grows)."""
    engine = make_engine(service_settings.database_url.get_secret_value())
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"],
        env=settings_env(service_settings),
        check=True,
        timeout=120,
    )
    wiring.create_topics(service_settings)
    yield service_settings
    delete_queues_and_statuses(service_settings)


def delete_queues_and_statuses(settings: Settings) -> None:
    """Drop the status table and both topics of ``settings`` (dynalite slows as it grows)."""
    with contextlib.suppress(Exception):
        make_client(settings.dynamodb_endpoint_url, settings.aws_region).delete_table(
            TableName=settings.status_table
        )
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for deleted in admin.delete_topics([settings.inbound_topic, settings.dlq_topic]).values():
        with contextlib.suppress(Exception):
            deleted.result(timeout=15)


@pytest.fixture(scope="session")
def trade_store(migrated: Settings) -> SqlTradeStore:
    return wiring.trade_store(migrated)


@pytest.fixture(scope="session")
def status_store(migrated: Settings) -> DynamoStatusStore:
    return wiring.status_store(migrated)
