"""End to end: the API and the processor as separate processes on the real services.

Submits the specification's example table (dates moved relative to today), polls every
request to its final status over HTTP and checks the store through the API.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import httpx
import pytest

from adapters import wiring
from config.clock import business_today
from config.settings import Settings
from domain.trade import Trade
from tests.conftest import own_topics, settings_env, unique
from tests.support import free_port, start, stop, upsert, wait_for

TODAY = business_today("UTC")


@dataclass
class Stack:
    client: httpx.Client
    settings: Settings


@pytest.fixture(scope="module", params=["embedded", "services"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The embedded profile via `trade-store dev`; services as two separate processes."""
    port = free_port()
    if request.param == "embedded":
        settings = Settings(profile="embedded", data_dir=tmp_path_factory.mktemp("data"), port=port)
        processes = [start("e2e-dev", ["dev"], settings_env(settings))]
    else:
        migrated: Settings = request.getfixturevalue("migrated")
        settings = own_topics(migrated, tmp_path_factory.mktemp("e2e"), port=port)
        env = settings_env(settings)
        processes = [start("e2e-api", ["serve"], env), start("e2e-processor", ["process"], env)]
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)

    def healthy() -> bool:
        try:
            return client.get("/api/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, 60, "API health ok (topics are created by the processor)")
        yield Stack(client, settings)
    finally:
        client.close()
        for process in processes:
            assert stop(process, signal.SIGINT) == 0


def submit(
    stack: Stack,
    trade_id: str,
    version: int,
    cp: str,
    book: str,
    maturity: date,
    created: date | None = None,
) -> httpx.Response:
    body = {
        "trade_id": trade_id,
        "version": version,
        "counterparty_id": cp,
        "book_id": book,
        "maturity_date": maturity.isoformat(),
    }
    if created:
        body["created_date"] = created.isoformat()
    return stack.client.post("/api/v1/trades", json=body)


def final(stack: Stack, reply: httpx.Response) -> dict[str, object]:
    assert reply.status_code == 202, reply.text
    location = reply.headers["location"]

    def done() -> dict[str, object] | None:
        status = stack.client.get(location)
        assert status.status_code == 200  # never 404 once acknowledged
        body: dict[str, object] = status.json()
        return body if body["status"] != "PENDING" else None

    return wait_for(done, 60, f"terminal status at {location}", every=0.05)


def test_specification_example_table(stack: Stack) -> None:
    t1, t2, t3 = unique("T1"), unique("T2"), unique("T3")
    next_year = TODAY + timedelta(days=365)

    assert final(stack, submit(stack, t1, 1, "CP-1", "B1", next_year))["status"] == "SUCCESS"
    old = final(stack, submit(stack, t2, 1, "CP-1", "B1", next_year, date(2015, 3, 14)))
    assert old["status"] == "SUCCESS"
    assert final(stack, submit(stack, t2, 2, "CP-2", "B1", next_year))["status"] == "SUCCESS"

    # Lower version than stored: FAILED with a reason.
    stale = final(stack, submit(stack, t2, 1, "CP-1", "B1", next_year))
    assert stale["status"] == "FAILED"
    assert stale["reason_code"] == "STALE_VERSION"
    assert "lower" in str(stale["failure_reason"])

    # Same version replaces the stored row.
    assert final(stack, submit(stack, t1, 1, "CP-9", "B1", next_year))["status"] == "SUCCESS"

    # Maturity before today: rejected synchronously.
    past = submit(stack, t3, 3, "CP-3", "B2", TODAY - timedelta(days=1))
    assert past.status_code == 400
    assert past.json()["code"] == "MATURITY_PASSED"

    t1_rows = stack.client.get(f"/api/v1/trades/{t1}").json()
    assert [(r["version"], r["counterparty_id"]) for r in t1_rows] == [(1, "CP-9")]
    t2_rows = stack.client.get(f"/api/v1/trades/{t2}").json()
    assert [(r["version"], r["counterparty_id"]) for r in t2_rows] == [(1, "CP-1"), (2, "CP-2")]
    assert t2_rows[0]["created_date"] == "2015-03-14"
    # Defaults to the business date it was accepted on: today, or tomorrow past midnight.
    assert t2_rows[1]["created_date"] in {TODAY.isoformat(), business_today("UTC").isoformat()}
    assert all(r["expired"] is False for r in t1_rows + t2_rows)
    assert stack.client.get(f"/api/v1/trades/{t3}").status_code == 404


def test_matured_trade_is_marked_expired(stack: Stack) -> None:
    """T3 of the table: a stored trade whose maturity has passed shows expired=Y."""
    tid = unique("T3")
    store = wiring.trade_store(stack.settings)
    upsert(
        store, [Trade(tid, 3, "CP-3", "B2", TODAY - timedelta(days=1), TODAY - timedelta(days=9))]
    )
    assert stack.client.get(f"/api/v1/trades/{tid}").json()[0]["expired"] is True
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "expire"],
        env=settings_env(stack.settings),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "expired" in out.stdout
    assert store.versions(tid, TODAY - timedelta(days=30))[0].expired is True


def test_listing_pages_through_everything(stack: Stack) -> None:
    book = unique("book")
    ids = [unique("L") for _ in range(5)]
    replies = [submit(stack, tid, 1, "CP", book, TODAY + timedelta(days=5)) for tid in ids]
    for reply in replies:
        assert final(stack, reply)["status"] == "SUCCESS"
    seen: list[str] = []
    url: str | None = f"/api/v1/trades?book_id={book}&limit=2"
    while url:
        page = stack.client.get(url)
        seen += [r["trade_id"] for r in page.json()]
        link = page.headers.get("link")
        url = link.split(";")[0].strip("<>") if link else None
    assert seen == sorted(ids, key=str.encode)


def test_health_reports_each_part(stack: Stack) -> None:
    assert stack.client.get("/api/v1/health").json() == {
        "status": "ok",
        "db": "ok",
        "kafka": "ok",
        "status_store": "ok",
    }
