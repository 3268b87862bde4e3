"""/api/v1/health on real stores: it says "degraded" when writes would fail.

Embedded: another process holding the inbound log's write lock (SQLite's own, or our flock)
makes health 503 within the probe's short wait, as the POSTs it would hold up 503 too.
Services: a producer with no broker connection is "unavailable" from its own state, and the
status store's probe is a write.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters import wiring
from adapters.dynamodb import HEALTH_KEY, DynamoStatusStore, make_client
from adapters.intake import PendingThenQueue
from adapters.wiring import Services
from config.clock import business_today
from config.settings import Settings
from ingest_api.app import create_app
from tests.support import free_port, wait_for

HEALTH = "/api/v1/health"
HOLDERS = {
    # Another SQLite connection (a sqlite3 shell, a script) in a write transaction.
    "sqlite": "import sqlite3, sys\n"
    "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
    "conn.execute('BEGIN IMMEDIATE')\n",
    # Another writer of ours (a processor's sink, a sweep) holding the file's flock.
    "flock": "import fcntl, os, sys\n"
    "fd = os.open(sys.argv[1] + '.lock', os.O_CREAT | os.O_RDWR)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n",
}


@contextmanager
def held(path: Path, how: str) -> Iterator[None]:
    """Another process holds the file's write lock until the block ends."""
    script = HOLDERS[how] + "print('held', flush=True)\nsys.stdin.read()\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


@contextmanager
def api(
    settings: Settings, services: Callable[[Settings], Services] = wiring.api_services
) -> Iterator[TestClient]:
    threshold = gc.get_threshold()
    with TestClient(create_app(settings, services)) as client:
        yield client
    gc.unfreeze()  # the app tuned the collector for a server process, not for pytest
    gc.set_threshold(*threshold)


def degraded(part: str) -> dict[str, str]:
    """Health's answer when only ``part`` is down."""
    return {
        "status": "degraded",
        "db": "ok",
        "kafka": "ok",
        "status_store": "ok",
        part: "unavailable",
    }


def trade() -> dict[str, object]:
    maturity = business_today("UTC") + timedelta(days=30)
    return {
        "trade_id": "T1",
        "version": 1,
        "counterparty_id": "CP-1",
        "book_id": "B1",
        "maturity_date": maturity.isoformat(),
    }


@pytest.mark.parametrize("how", sorted(HOLDERS))
def test_embedded_health_is_503_while_another_process_holds_the_write_lock(
    tmp_path: Path, how: str
) -> None:
    settings = Settings(
        profile="embedded", data_dir=tmp_path, inbound_partitions=4, health_cache_seconds=0.5
    )
    wiring.prepare_status_store(settings)
    with api(settings) as client:
        assert client.get(HEALTH).status_code == 200
        with held(wiring.inbound_log_path(settings), how):
            time.sleep(0.5)  # the cached "ok" ages out
            started = time.monotonic()
            reply = client.get(HEALTH)
            took = time.monotonic() - started
            assert reply.status_code == 503
            assert reply.json() == degraded("kafka")
            assert took < 1.0  # the probe's 0.2 s wait, not a write's 2 s
            assert client.post("/api/v1/trades", json=trade()).status_code == 503  # agreed
        wait_for(lambda: client.get(HEALTH).status_code == 200, 3, "health ok once released")
        assert client.post("/api/v1/trades", json=trade()).status_code == 202


def services_of(settings: Settings) -> Services:
    """The API's services without creating topics (which would wait 30 s for a closed port)."""
    statuses = wiring.status_store(settings)
    assert isinstance(statuses, DynamoStatusStore)
    queue = wiring.trade_queue(settings)
    return Services(
        wiring.trade_store(settings, reads_only=True),
        statuses,
        queue,
        PendingThenQueue(statuses, queue, wiring.key_claims(settings)),
        [queue.close, statuses.close],
    )


def test_services_health_follows_the_producer_connection(migrated: Settings) -> None:
    """A producer pointed at a closed port is "unavailable" from its statistics at once;
    one on the real broker turns "ok"."""
    nowhere = migrated.model_copy(
        update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}", "health_cache_seconds": 0}
    )
    with api(nowhere, services_of) as client:
        time.sleep(1.5)  # librdkafka's first statistics, a second after the producer starts
        started = time.monotonic()
        reply = client.get(HEALTH)
        took = time.monotonic() - started
        assert reply.status_code == 503
        assert reply.json() == degraded("kafka")
        assert took < 0.5  # the producer's own state: no metadata request timing out (2 s)
    real = migrated.model_copy(update={"health_cache_seconds": 0})
    with api(real, services_of) as client:
        wait_for(lambda: client.get(HEALTH).status_code == 200, 10, "health ok on the broker")
        time.sleep(1.2)  # from the statistics now, no longer the first metadata request
        assert client.get(HEALTH).json()["kafka"] == "ok"


def test_the_status_store_probe_is_a_write(migrated: Settings) -> None:
    """The probe deletes its reserved key: a write the table must take (and nothing left)."""
    client = make_client(migrated.dynamodb_endpoint_url, migrated.aws_region)
    key = {"request_id": {"S": HEALTH_KEY}}
    client.put_item(TableName=migrated.status_table, Item=key)
    store = DynamoStatusStore(client, migrated.status_table, 7)
    store.ping()
    assert "Item" not in client.get_item(TableName=migrated.status_table, Key=key)
    store.close()
