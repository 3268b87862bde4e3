"""Health's cached probes, the read pool's bound and the reads' encoding, on fakes."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime

import orjson
import pytest
from fastapi.testclient import TestClient

from adapters.intake import PendingThenQueue
from adapters.wiring import Services
from config.settings import Settings
from domain.ports import Overloaded, StoredTrade, TradeFilter, Unavailable
from domain.trade import Trade
from ingest_api.app import create_app
from ingest_api.health import Probe
from ingest_api.reads import READ_NICENESS, ReadPool, trades_json
from ingest_api.schemas import TradeOut
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore


class CountedTradeStore(FakeTradeStore):
    """Counts health pings, each taking a while, so concurrent callers overlap it; ``gate``
    holds every page read until it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0
        self.gate = threading.Event()
        self.gate.set()

    def ping(self) -> None:
        self.pings += 1
        time.sleep(0.2)
        super().ping()

    def page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> list[StoredTrade]:
        self.gate.wait(5)
        return super().page(after, limit, where, as_of)


@pytest.fixture
def trades() -> CountedTradeStore:
    return CountedTradeStore()


@contextmanager
def client_of(trades: FakeTradeStore, **settings: float) -> Iterator[TestClient]:
    statuses, queue = FakeStatusStore(), FakeQueue()
    app = create_app(
        Settings(retry_after_seconds=7, **settings),  # type: ignore[arg-type]
        services=lambda _: Services(
            trades, statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    threshold = gc.get_threshold()
    with TestClient(app) as client:
        yield client
    gc.unfreeze()  # the app tuned the collector for a server process, not for pytest
    gc.set_threshold(*threshold)


def test_health_reports_each_part() -> None:
    trades = FakeTradeStore()
    with client_of(trades, health_cache_seconds=0) as client:
        assert client.get("/api/v1/health").json() == {
            "status": "ok",
            "db": "ok",
            "kafka": "ok",
            "status_store": "ok",
        }
        trades.down = True
        assert client.get("/api/v1/health/live").json() == {"status": "ok"}
        reply = client.get("/api/v1/health")
        assert reply.status_code == 503
        assert reply.json() == {
            "status": "degraded",
            "db": "unavailable",
            "kafka": "ok",
            "status_store": "ok",
        }


def test_concurrent_health_calls_share_one_probe(trades: CountedTradeStore) -> None:
    """16 callers at once, then more within the cache's life: one ping of the store; the
    next call after it probes again."""
    with client_of(trades, health_cache_seconds=1.0) as client:
        with ThreadPoolExecutor(16) as callers:
            replies = list(callers.map(lambda _: client.get("/api/v1/health"), range(16)))
        assert {r.status_code for r in replies} == {200}
        assert trades.pings == 1
        assert client.get("/api/v1/health").status_code == 200
        assert trades.pings == 1
        trades.down = True
        assert client.get("/api/v1/health").status_code == 200  # the cached result still
        time.sleep(1.0)
        assert client.get("/api/v1/health").json()["db"] == "unavailable"
        assert trades.pings == 2


async def test_a_hung_probe_is_unavailable_within_its_timeout() -> None:
    released = threading.Event()

    def hung() -> None:
        released.wait(5)

    probe = Probe(hung, ttl_s=1.0, timeout_s=0.1)
    started = time.monotonic()
    assert await probe.state() == "unavailable"
    assert time.monotonic() - started < 0.5
    released.set()


async def test_a_probe_that_raises_is_unavailable_and_probed_again_after_its_ttl() -> None:
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise Unavailable("down")

    probe = Probe(check, ttl_s=0.05)
    assert await asyncio.gather(probe.state(), probe.state()) == ["unavailable"] * 2
    await asyncio.sleep(0.06)
    assert await probe.state() == "ok"
    assert len(calls) == 2


async def test_reads_over_the_pool_bound_are_overloaded_at_once() -> None:
    """One thread, one waiting: a third read is refused without waiting; once they end, reads
    are taken again."""
    pool = ReadPool(1, 1, FakeTradeStore())
    gate = threading.Event()
    running = [asyncio.ensure_future(pool.run(gate.wait, 5)) for _ in range(2)]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await pool.run(time.sleep, 0)
    assert time.monotonic() - started < 0.05
    gate.set()
    assert await asyncio.gather(*running) == [True, True]
    assert await pool.run(sum, [1, 2]) == 3
    pool.close()


async def test_reads_run_at_a_lower_scheduling_priority_than_the_event_loop() -> None:
    pool = ReadPool(1, 0, FakeTradeStore())
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    theirs = await pool.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert theirs == min(ours + READ_NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours
    pool.close()


def test_a_read_over_the_bound_is_429_with_retry_after(trades: CountedTradeStore) -> None:
    trades.gate.clear()
    with (
        client_of(trades, read_threads=1, max_waiting_reads=1) as client,
        ThreadPoolExecutor(2) as readers,
    ):
        held = [readers.submit(client.get, "/api/v1/trades") for _ in range(2)]
        time.sleep(0.2)  # both are in: one reading, one waiting
        reply = client.get("/api/v1/trades")
        assert reply.status_code == 429
        assert reply.headers["retry-after"] == "7"
        assert reply.json()["code"] == "OVERLOADED"
        assert client.get("/api/v1/health/live").status_code == 200  # not a read
        trades.gate.set()
        assert [f.result().status_code for f in held] == [200, 200]


@pytest.mark.parametrize("micros", [0, 1, 20_000, 999_999])
def test_trades_are_encoded_as_their_schema_says(micros: int) -> None:
    """The reads' own encoder writes what TradeOut's pydantic serialiser would."""
    at = datetime(2026, 11, 28, 10, 0, 0, micros, tzinfo=UTC)
    rows = [
        StoredTrade(Trade("T-é", 2, "CP", "B", date(2030, 5, 20), date(2015, 3, 14)), True, at, at),
        StoredTrade(Trade("T1", 1, "CP", "B", date(2030, 5, 20), date(2026, 1, 1)), False, at, at),
    ]
    assert trades_json(rows) == orjson.dumps([TradeOut.of(r).model_dump(mode="json") for r in rows])
