"""The HTTP contract, on fakes of the ports: validation, problem+json, 202/503, reads."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from adapters.intake import PendingThenQueue
from adapters.wiring import Services
from config.clock import business_today
from config.settings import Settings
from domain.message import TradeMessage
from domain.ports import Unavailable
from domain.status import Batch, Outcome, ReasonCode, RequestState, RequestStatus
from domain.trade import Trade
from ingest_api.app import create_app
from ingest_api.problems import dependency_of
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore
from tests.support import upsert

TODAY = business_today("UTC")


@dataclass
class Api:
    client: TestClient
    trades: FakeTradeStore
    statuses: FakeStatusStore
    queue: FakeQueue


@pytest.fixture
def api() -> Iterator[Api]:
    trades, statuses, queue = FakeTradeStore(), FakeStatusStore(), FakeQueue()
    app = create_app(
        Settings(max_body_bytes=1024, retry_after_seconds=7),
        services=lambda _: Services(
            trades, statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    threshold = gc.get_threshold()
    with TestClient(app) as client:
        yield Api(client, trades, statuses, queue)
    gc.unfreeze()  # the app tuned the collector for a server process, not for pytest
    gc.set_threshold(*threshold)


def test_startup_tunes_the_garbage_collector(api: Api) -> None:
    """Start-up objects leave the collector's view and young collections are rarer: the
    default threshold ran the collector for ~7 % of an API worker's time."""
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == 50_000


def body(**overrides: object) -> dict[str, object]:
    payload: dict[str, object] = {
        "trade_id": "T1",
        "version": 1,
        "counterparty_id": "CP-1",
        "book_id": "B1",
        "maturity_date": (TODAY + timedelta(days=30)).isoformat(),
    }
    payload.update(overrides)
    return payload


def test_accepts_and_queues(api: Api) -> None:
    reply = api.client.post("/api/v1/trades", json=body(), headers={"X-Correlation-ID": "abc"})
    assert reply.status_code == 202
    data = reply.json()
    assert data["status"] == "PENDING"
    assert (data["trade_id"], data["version"]) == ("T1", 1)
    assert reply.headers["location"] == f"/api/v1/requests/{data['request_id']}"
    assert reply.headers["x-correlation-id"] == "abc"
    [queued] = api.queue.messages
    assert queued.request_id == data["request_id"]
    assert queued.correlation_id == "abc"
    assert queued.accepted_on in {TODAY, business_today("UTC")}  # a run may cross midnight
    assert queued.trade.created_date == TODAY
    assert api.statuses.items[data["request_id"]].state is RequestState.PENDING

    status = api.client.get(reply.headers["location"]).json()
    assert status["status"] == "PENDING"
    assert status["reason_code"] is None


def test_generates_correlation_id(api: Api) -> None:
    reply = api.client.post("/api/v1/trades", json=body())
    assert len(reply.headers["x-correlation-id"]) == 32


def test_trims_ids(api: Api) -> None:
    reply = api.client.post("/api/v1/trades", json=body(trade_id="  T9 "))
    assert reply.json()["trade_id"] == "T9"


def test_maturity_before_today_is_400(api: Api) -> None:
    reply = api.client.post(
        "/api/v1/trades", json=body(maturity_date=(TODAY - timedelta(days=1)).isoformat())
    )
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["code"] == ReasonCode.MATURITY_PASSED
    assert problem["field"] == "maturity_date"
    assert api.queue.messages == []
    assert api.statuses.items == {}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (body(version="1"), "version"),
        (body(version=1.5), "version"),
        (body(version=0), "version"),
        (body(version=2**31), "version"),
        (body(version=True), "version"),
        (body(trade_id=""), "trade_id"),
        (body(trade_id="   "), "trade_id"),
        (body(trade_id="x" * 65), "trade_id"),
        (body(book_id="a\tb"), "book_id"),
        (body(maturity_date="20/05/2030"), "maturity_date"),
        (body(maturity_date=20300520), "maturity_date"),
        (body(created_date="2030-02-30"), "created_date"),
        (body(extra="x"), "extra"),
        ({k: v for k, v in body().items() if k != "counterparty_id"}, "counterparty_id"),
    ],
)
def test_invalid_input_is_422_with_field(api: Api, payload: dict[str, object], field: str) -> None:
    reply = api.client.post("/api/v1/trades", json=payload)
    assert reply.status_code == 422
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert problem["code"] == "VALIDATION_ERROR"
    assert problem["field"] == field
    assert problem["status"] == 422
    assert api.queue.messages == []


def test_malformed_json_is_422(api: Api) -> None:
    reply = api.client.post(
        "/api/v1/trades", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422
    assert reply.json()["code"] == "MALFORMED_JSON"


def test_body_too_large_is_413(api: Api) -> None:
    reply = api.client.post("/api/v1/trades", json=body(book_id="B" * 2000))
    assert reply.status_code == 413
    assert reply.json()["code"] == "PAYLOAD_TOO_LARGE"


def test_streamed_body_too_large_is_413(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"trade_id": "' + b"x" * 800
        yield b"y" * 800 + b'"}'

    reply = api.client.post(
        "/api/v1/trades", content=chunks(), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 413
    assert reply.json()["code"] == "PAYLOAD_TOO_LARGE"


def test_pending_is_written_before_the_trade_is_queued(api: Api) -> None:
    """So the dataflow's outcome can never be overwritten by a late PENDING."""
    seen = []
    publish = api.queue.publish

    async def checking_publish(message: TradeMessage) -> None:
        seen.append(api.statuses.items.get(message.request_id))
        await publish(message)

    api.queue.publish = checking_publish  # type: ignore[method-assign]
    assert api.client.post("/api/v1/trades", json=body()).status_code == 202
    assert seen[0] is not None
    assert seen[0].state is RequestState.PENDING


def test_queue_down_is_503_and_leaves_nothing_pending(api: Api) -> None:
    api.queue.down = True
    reply = api.client.post("/api/v1/trades", json=body())
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "7"
    assert reply.json()["code"] == "SERVICE_UNAVAILABLE"
    assert api.statuses.items == {}


def test_status_store_down_is_503_and_nothing_is_queued(api: Api) -> None:
    api.statuses.down = True
    reply = api.client.post("/api/v1/trades", json=body())
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "7"
    assert api.queue.messages == []
    assert api.client.get("/api/v1/requests/x").status_code == 503


def test_unknown_request_is_404(api: Api) -> None:
    reply = api.client.get("/api/v1/requests/nope")
    assert reply.status_code == 404
    assert reply.json()["code"] == "NOT_FOUND"
    assert api.client.get("/api/v1/requests/" + "x" * 65).status_code == 404


def test_terminal_status_shows_reason(api: Api) -> None:
    rid = api.client.post("/api/v1/trades", json=body()).json()["request_id"]
    api.statuses.write_outcomes(
        [
            Outcome(
                rid,
                "T1",
                1,
                RequestState.FAILED,
                ReasonCode.STALE_VERSION,
                "stale",
                decided_at=datetime.now(UTC),
            )
        ]
    )
    status = api.client.get(f"/api/v1/requests/{rid}").json()
    assert status["status"] == "FAILED"
    assert status["reason_code"] == "STALE_VERSION"
    assert status["failure_reason"] == "stale"


def store(
    api: Api, trade_id: str, version: int, book: str = "B1", maturity: date | None = None
) -> None:
    upsert(
        api.trades,
        [Trade(trade_id, version, "CP-1", book, maturity or TODAY + timedelta(days=1), TODAY)],
    )


def test_trade_versions(api: Api) -> None:
    store(api, "T1", 1)
    store(api, "T1", 2)
    store(api, "T1", 1)  # refused by the store's guard
    rows = api.client.get("/api/v1/trades/T1").json()
    assert [r["version"] for r in rows] == [1, 2]
    assert set(rows[0]) == {
        "trade_id",
        "version",
        "counterparty_id",
        "book_id",
        "maturity_date",
        "created_date",
        "expired",
        "created_at",
        "updated_at",
    }
    assert api.client.get("/api/v1/trades/none").status_code == 404


def test_list_pages_with_link_header(api: Api) -> None:
    for tid in ["b", "a", "B", "é"]:
        store(api, tid, 1)
    store(api, "a", 2)
    seen = []
    url = "/api/v1/trades?limit=2"
    pages = 0
    while url:
        reply = api.client.get(url)
        assert reply.status_code == 200
        seen += [(r["trade_id"], r["version"]) for r in reply.json()]
        link = reply.headers.get("link")
        url = link.split(";")[0].strip("<>") if link else ""
        pages += 1
    assert seen == [("B", 1), ("a", 1), ("a", 2), ("b", 1), ("é", 1)]
    assert pages == 3


def test_list_filters_and_expired_is_never_stale(api: Api) -> None:
    store(api, "T1", 1, book="B1")
    store(api, "T2", 1, book="B2", maturity=TODAY - timedelta(days=3))
    books = api.client.get("/api/v1/trades?book_id=B2").json()
    assert [r["trade_id"] for r in books] == ["T2"]
    assert books[0]["expired"] is True
    assert [r["trade_id"] for r in api.client.get("/api/v1/trades?expired=false").json()] == ["T1"]
    assert api.client.get("/api/v1/trades?counterparty_id=none").json() == []


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "after=!!", "after=WzEsMl0"])
def test_list_rejects_bad_paging(api: Api, query: str) -> None:
    reply = api.client.get(f"/api/v1/trades?{query}")
    assert reply.status_code in {400, 422}
    assert reply.json()["field"] in {"limit", "after"}


def test_openapi_documents_every_route(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/v1/trades",
        "/api/v1/trades/batch",
        "/api/v1/trades/{trade_id}",
        "/api/v1/requests/{request_id}",
        "/api/v1/requests",
        "/api/v1/batches/{batch_id}",
        "/api/v1/batches/{batch_id}/items",
        "/api/v1/health",
        "/api/v1/health/live",
    }


def test_method_not_allowed_is_problem(api: Api) -> None:
    reply = api.client.delete("/api/v1/trades")
    assert reply.status_code == 405
    assert reply.json()["code"] == "METHOD_NOT_ALLOWED"


class HungStatusStore(FakeStatusStore):
    """Accepts PENDING writes and never answers, like a frozen status store."""

    async def put_pending(self, status: RequestStatus) -> None:
        await asyncio.Event().wait()

    def get(self, request_id: str) -> RequestStatus | None:
        self.released.wait(5)  # blocks a worker thread, as a read of a frozen store does
        return None

    released = threading.Event()


class HungQueue(FakeQueue):
    """Takes messages and never acknowledges them, like a frozen broker."""

    async def publish(self, message: TradeMessage) -> None:
        await asyncio.Event().wait()


def hung_api(statuses: FakeStatusStore, queue: FakeQueue, **settings: int) -> TestClient:
    app = create_app(
        Settings(profile="services", produce_timeout_ms=300, retry_after_seconds=7, **settings),  # type: ignore[arg-type]
        services=lambda _: Services(
            FakeTradeStore(), statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    return TestClient(app)


def test_a_hung_status_store_is_503_within_the_produce_timeout() -> None:
    with hung_api(HungStatusStore(), FakeQueue()) as client:
        started = time.monotonic()
        reply = client.post("/api/v1/trades", json=body())
        took = time.monotonic() - started
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "7"
    assert 0.3 <= took < 0.3 + 0.5 + 0.3  # produce timeout + the grace, + slack for the test
    # The app's own share of that, as it tells the client.
    app_s = float(reply.headers["server-timing"].removeprefix("app;dur=")) / 1000
    assert 0.3 <= app_s <= took
    assert (
        reply.json()["detail"]
        == "The status store or queue is unavailable or did not answer in time"
    )


def test_a_read_of_a_hung_status_store_is_503_within_the_produce_timeout() -> None:
    store = HungStatusStore()
    with hung_api(store, FakeQueue()) as client:
        started = time.monotonic()
        reply = client.get("/api/v1/requests/r-1")
        took = time.monotonic() - started
        store.released.set()
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "7"
    assert 0.3 <= took < 0.3 + 0.3


def test_a_hung_queue_is_503_and_the_pending_record_is_withdrawn() -> None:
    statuses = FakeStatusStore()
    with hung_api(statuses, HungQueue()) as client:
        started = time.monotonic()
        reply = client.post("/api/v1/trades", json=body())
        took = time.monotonic() - started
        client.get("/api/v1/health/live")  # one more turn of the loop: the withdrawal ran
    assert reply.status_code == 503
    assert took < 0.3 + 0.5 + 0.3
    assert statuses.items == {}


def test_requests_over_the_waiting_cap_get_429_at_once() -> None:
    with hung_api(HungStatusStore(), FakeQueue(), max_in_flight=1) as client:
        waiting = threading.Thread(
            target=client.post, args=("/api/v1/trades",), kwargs={"json": body()}
        )
        waiting.start()
        time.sleep(0.1)  # the first request now waits on the status store
        started = time.monotonic()
        reply = client.post("/api/v1/trades", json=body())
        took = time.monotonic() - started
        waiting.join()
        after = client.post("/api/v1/trades", json=body())
    assert reply.status_code == 429
    assert reply.headers["retry-after"] == "1"  # one trade in flight, none drained yet
    assert reply.json()["code"] == "OVERLOADED"
    assert took < 0.1
    assert after.status_code == 503  # the cap counts waiting requests, not requests ever made


def test_a_503_names_the_dependency_not_its_error() -> None:
    """The adapter's own error text (file names, SQLite errors) stays in the log."""
    assert dependency_of(Unavailable("inbound log: database is locked")) == "inbound log"
    assert dependency_of(Unavailable("status store batch_write_item: timeout")) == "status store"
    assert dependency_of(Unavailable("something else")) == "dependency"


# --- bulk lookup and batches ---------------------------------------------------------------


def test_bulk_lookup_answers_in_the_order_asked_with_the_missing(api: Api) -> None:
    first, second = (api.client.post("/api/v1/trades", json=body()).json() for _ in range(2))
    done = Outcome(
        second["request_id"], "T1", 1, RequestState.SUCCESS, decided_at=datetime.now(UTC)
    )
    api.statuses.write_outcomes([done])
    asked = [second["request_id"], "nope", first["request_id"], second["request_id"], "x" * 65]
    reply = api.client.get("/api/v1/requests", params={"ids": ",".join(asked)})
    assert reply.status_code == 200
    data = reply.json()
    assert [(r["request_id"], r["status"]) for r in data["requests"]] == [
        (second["request_id"], "SUCCESS"),
        (first["request_id"], "PENDING"),
    ]
    assert data["requests"][1] == api.client.get(f"/api/v1/requests/{first['request_id']}").json()
    assert data["missing"] == ["nope", "x" * 65]


@pytest.mark.parametrize("ids", [None, "", "a,,b", ",".join(f"r{i}" for i in range(101))])
def test_bulk_lookup_takes_1_to_100_ids(api: Api, ids: str | None) -> None:
    reply = api.client.get("/api/v1/requests", params={} if ids is None else {"ids": ids})
    assert reply.status_code == 422
    assert reply.headers["content-type"] == "application/problem+json"
    assert (reply.json()["code"], reply.json()["field"]) == ("VALIDATION_ERROR", "ids")
    hundred = ",".join(f"r{i}" for i in range(100))
    assert len(api.client.get("/api/v1/requests", params={"ids": hundred}).json()["missing"]) == 100


def seed_batch(statuses: FakeStatusStore, batch_id: str, states: str) -> list[str]:
    """A batch whose items are in ``states`` (P, S or F each), by index; their request ids."""
    at = datetime.now(UTC)
    named = {"P": RequestState.PENDING, "S": RequestState.SUCCESS, "F": RequestState.FAILED}
    rids = []
    for index, state in enumerate(states):
        rid = f"{batch_id}-{index}"
        failed = named[state] is RequestState.FAILED
        statuses.items[rid] = RequestStatus(
            rid,
            named[state],
            f"T{index}",
            1,
            at,
            at,
            ReasonCode.STALE_VERSION if failed else None,
            "stale" if failed else None,
            batch_id=batch_id,
            batch_index=index,
        )
        rids.append(rid)
    statuses.batches[batch_id] = Batch(batch_id, at, len(states))
    return rids


def test_a_batch_counts_its_items_by_state(api: Api) -> None:
    seed_batch(api.statuses, "b1", "PSFSPP")
    seed_batch(api.statuses, "b2", "SS")
    reply = api.client.get("/api/v1/batches/b1")
    assert reply.status_code == 200
    data = reply.json()
    created = datetime.fromisoformat(data.pop("created_at"))
    assert created == api.statuses.batches["b1"].created_at
    assert data == {"batch_id": "b1", "total": 6, "pending": 3, "success": 2, "failed": 1}
    unknown = api.client.get("/api/v1/batches/nope")
    assert unknown.status_code == 404
    assert (unknown.json()["code"], unknown.json()["field"]) == ("NOT_FOUND", "batch_id")


def test_a_batchs_items_page_by_index_with_link(api: Api) -> None:
    rids = seed_batch(api.statuses, "b1", "PSFSPPS")

    def walk(url: str) -> list[list[int]]:
        pages = []
        while url:
            reply = api.client.get(url)
            assert reply.status_code == 200
            pages.append([item["index"] for item in reply.json()])
            link = reply.headers.get("link")
            url = link.split(";")[0].strip("<>") if link else ""
        return pages

    assert walk("/api/v1/batches/b1/items?limit=3") == [[0, 1, 2], [3, 4, 5], [6]]
    assert walk("/api/v1/batches/b1/items?state=PENDING&limit=2") == [[0, 4], [5]]
    assert walk("/api/v1/batches/b1/items?state=SUCCESS") == [[1, 3, 6]]
    failed = api.client.get("/api/v1/batches/b1/items?state=FAILED").json()
    assert failed == [
        {
            "index": 2,
            "request_id": rids[2],
            "trade_id": "T2",
            "version": 1,
            "status": "FAILED",
            "reason_code": "STALE_VERSION",
            "failure_reason": "stale",
        }
    ]


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("after=!!", 400, "after"),
        ("after=WyJ4Il0", 400, "after"),  # ["x"]
        ("after=Wy0xXQ", 400, "after"),  # [-1]
        ("limit=0", 422, "limit"),
        ("limit=1001", 422, "limit"),
        ("state=DONE", 422, "state"),
    ],
)
def test_batch_items_reject_bad_paging(api: Api, query: str, status: int, field: str) -> None:
    seed_batch(api.statuses, "b1", "P")
    reply = api.client.get(f"/api/v1/batches/b1/items?{query}")
    assert reply.status_code == status
    assert reply.json()["field"] == field
    if status == 400:
        assert reply.json()["code"] == "INVALID_CURSOR"


def test_items_of_an_unknown_batch_are_404(api: Api) -> None:
    reply = api.client.get("/api/v1/batches/nope/items")
    assert reply.status_code == 404
    assert (reply.json()["code"], reply.json()["field"]) == ("NOT_FOUND", "batch_id")


@pytest.mark.parametrize("path", ["/requests?ids=a", "/batches/b1", "/batches/b1/items"])
def test_bulk_reads_are_503_when_the_status_store_is_down(api: Api, path: str) -> None:
    seed_batch(api.statuses, "b1", "P")
    api.statuses.down = True
    reply = api.client.get(f"/api/v1{path}")
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "7"
