"""Our own metrics logic: the labels the API's middleware gives, the causes of refusals,
the multiprocess directory ``serve`` prepares, and the lag arithmetic of the processor."""

from __future__ import annotations

import fcntl
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from adapters.intake import PendingThenQueue
from adapters.wiring import Services
from config.clock import business_today
from config.settings import Settings
from domain.ports import Unavailable
from domain.status import Outcome, ReasonCode, RequestState, RequestStatus
from ingest_api.app import create_app
from ingest_api.metrics import refusal_cause
from ingest_api.metrics_dir import MULTIPROC_ENV, shared_across
from sinks.metrics import SnapshotReader, count_decided, kafka_lag, latest_snapshots
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore
from tests.unit.test_api import HungStatusStore, hung_api
from tests.unit.test_api import body as trade_body


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, FakeStatusStore]]:
    keys = tmp_path / "keys"
    keys.write_text("")
    statuses, queue = FakeStatusStore(), FakeQueue()
    app = create_app(
        Settings(auth="api-key", api_keys_file=keys, quota_reads_per_second=1),
        services=lambda _: Services(
            FakeTradeStore(), statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    with TestClient(app) as c:
        yield c, statuses


def test_answers_are_counted_by_route_template_not_path(
    client: tuple[TestClient, FakeStatusStore],
) -> None:
    c, _ = client
    template = "/api/v1/trades/{trade_id}"
    before = {
        m: sample("trade_store_api_requests_total", route=template, method=m, status="401")
        for m in ("GET", "HEAD")
    }
    c.get("/api/v1/trades/A"), c.get("/api/v1/trades/B"), c.head("/api/v1/trades/C")
    assert (
        sample("trade_store_api_requests_total", route=template, method="GET", status="401")
        == before["GET"] + 2
    )
    # HEAD runs on a copy of the scope: the route is found by its path all the same.
    assert (
        sample("trade_store_api_requests_total", route=template, method="HEAD", status="401")
        == before["HEAD"] + 1
    )
    unmatched = sample(
        "trade_store_api_requests_total", route="unmatched", method="GET", status="404"
    )
    c.get("/no/such/path")
    assert (
        sample("trade_store_api_requests_total", route="unmatched", method="GET", status="404")
        == unmatched + 1
    )


def test_metrics_is_open_and_in_the_text_format(
    client: tuple[TestClient, FakeStatusStore],
) -> None:
    c, _ = client
    reply = c.get("/metrics")  # no credentials, authentication on
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE trade_store_api_request_duration_seconds histogram" in reply.text
    assert "/metrics" not in c.get("/openapi.json").text


class DownStatusStore(FakeStatusStore):
    async def put_pending(self, status: RequestStatus) -> None:
        raise Unavailable("status store: connection refused")


def test_a_503_is_counted_by_the_dependency_it_names() -> None:
    settings = Settings(auth="none")
    statuses, queue = DownStatusStore(), FakeQueue()
    app = create_app(
        settings,
        services=lambda _: Services(
            FakeTradeStore(), statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    maturity = (business_today("UTC") + timedelta(days=5)).isoformat()
    body = {
        "trade_id": "T",
        "version": 1,
        "counterparty_id": "C",
        "book_id": "B",
        "maturity_date": maturity,
    }
    before = sample("trade_store_api_refusals_total", status="503", cause="status store")
    with TestClient(app) as c:
        assert c.post("/api/v1/trades", json=body).status_code == 503
    assert (
        sample("trade_store_api_refusals_total", status="503", cause="status store") == before + 1
    )


def test_single_and_batch_submissions_are_acked_under_their_templates() -> None:
    statuses, queue = FakeStatusStore(), FakeQueue()
    app = create_app(
        Settings(auth="none"),
        services=lambda _: Services(
            FakeTradeStore(), statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    maturity = (business_today("UTC") + timedelta(days=5)).isoformat()
    good = {"trade_id": "T", "version": 1, "counterparty_id": "C", "book_id": "B"}
    good["maturity_date"] = maturity
    routes = ("/api/v1/trades", "/api/v1/trades/batch")
    before = {r: sample("trade_store_api_ack_duration_seconds_count", route=r) for r in routes}
    with TestClient(app) as c:
        assert c.post("/api/v1/trades", json=good).status_code == 202
        assert c.post("/api/v1/trades/batch", json={"trades": [good]}).status_code == 202
        in_part = {"trades": [good, {**good, "version": 0}]}  # one item refused: 207
        assert c.post("/api/v1/trades/batch", json=in_part).status_code == 207
    after = {r: sample("trade_store_api_ack_duration_seconds_count", route=r) for r in routes}
    assert after == {routes[0]: before[routes[0]] + 1, routes[1]: before[routes[1]] + 2}


def test_an_overloaded_intake_is_counted_as_overloaded() -> None:
    before = sample("trade_store_api_refusals_total", status="429", cause="overloaded")
    with hung_api(HungStatusStore(), FakeQueue(), max_in_flight=1) as client:
        waiting = threading.Thread(
            target=client.post, args=("/api/v1/trades",), kwargs={"json": trade_body()}
        )
        waiting.start()
        time.sleep(0.1)  # the first request now waits on the status store
        reply = client.post("/api/v1/trades", json=trade_body())
        waiting.join()
    assert reply.json()["code"] == "OVERLOADED"
    assert sample("trade_store_api_refusals_total", status="429", cause="overloaded") == before + 1


@pytest.mark.parametrize(
    ("status", "body", "state", "cause"),
    [
        (429, b'{"code":"RATE_LIMITED"}', {}, "rate_limited"),
        (429, b'{"code":"OVERLOADED"}', {}, "overloaded"),
        (503, b'{"code":"SERVICE_UNAVAILABLE"}', {"refusal_cause": "status store"}, "status store"),
        (503, b'{"status":"degraded","db":"ok"}', {}, "degraded"),
        (503, b"not json", {}, "degraded"),
        (429, b"[]", {}, "other"),
    ],
)
def test_refusal_causes(status: int, body: bytes, state: dict[str, str], cause: str) -> None:
    assert refusal_cause(status, body, state) == cause


def test_several_workers_share_a_fresh_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with shared_across(1):
        assert MULTIPROC_ENV not in os.environ  # one worker: in memory
    with shared_across(2):
        made = Path(os.environ[MULTIPROC_ENV])
        assert made.is_dir()
    assert not made.exists()
    assert MULTIPROC_ENV not in os.environ
    given = tmp_path / "mp"
    monkeypatch.setenv(MULTIPROC_ENV, str(given))
    with shared_across(1):
        assert given.is_dir()  # made when missing, even for one worker
    (given / "counter_123.db").write_bytes(b"old run")
    with shared_across(2):
        assert list(given.iterdir()) == []  # an earlier run's values do not come back
    assert given.is_dir()


def test_kafka_lag_is_the_high_watermark_less_the_next_offset() -> None:
    watermarks = {0: (0, 10), 1: (5, 9), 2: (3, 3)}
    # Partition 1 was never read: it starts at its low watermark, not at 0.
    assert kafka_lag(watermarks, {0: 4, 2: 3}) == {0: 6, 1: 4, 2: 0}


def test_decisions_are_counted_by_state_and_reason() -> None:
    def outcome(state: RequestState, reason: ReasonCode | None) -> Outcome:
        return Outcome("r", "T", 1, state, reason)

    stale = ("FAILED", "STALE_VERSION")
    before = sample("trade_store_processor_decisions_total", state="SUCCESS", reason_code="")
    before_stale = sample(
        "trade_store_processor_decisions_total", state=stale[0], reason_code=stale[1]
    )
    count_decided(
        [outcome(RequestState.SUCCESS, None)] * 3
        + [outcome(RequestState.FAILED, ReasonCode.STALE_VERSION)]
    )
    assert (
        sample("trade_store_processor_decisions_total", state="SUCCESS", reason_code="")
        == before + 3
    )
    assert (
        sample("trade_store_processor_decisions_total", state=stale[0], reason_code=stale[1])
        == before_stale + 1
    )


def locked_elsewhere(path: Path) -> bool:
    """Whether another process finds byte 2**32 of ``path`` locked."""
    probe = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
        "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 2**32)\n"
        "except OSError:\n    sys.exit(1)\n"
    )
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 1


def test_the_recovery_store_is_read_without_dropping_the_processors_locks(
    tmp_path: Path,
) -> None:
    """Bytewax's own SQLite copy holds POSIX locks on its recovery files; a connection of
    Python's copy, closed in the same process, drops them (one lock table per process).
    SnapshotReader reads in a child, so a lock this process holds stays held."""
    part = tmp_path / "part-0.sqlite3"
    with sqlite3.connect(part) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE snaps (step_id, state_key, snap_epoch, ser_change, created_at)")
        conn.execute(
            "INSERT INTO snaps VALUES ('f.s', '0', 3, ?, '2026-12-01T23:00:00')",
            (pickle.dumps(41),),
        )
    conn.close()
    fd = os.open(part, os.O_RDWR)  # as Bytewax's connection holds it
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH, 1, 2**32)
        assert locked_elsewhere(part)
        reader = SnapshotReader(tmp_path, "f.s")
        try:
            assert reader() == ({"0": 41}, datetime(2026, 12, 1, 23, tzinfo=UTC))
        finally:
            reader.close()
        assert locked_elsewhere(part)  # still ours
        latest_snapshots(tmp_path, "f.s")  # in this process: the lock is gone
        assert not locked_elsewhere(part)
    finally:
        os.close(fd)
