"""The write routes on fakes of the ports: batches (JSON and NDJSON), Idempotency-Key and
admission control. End to end on the real services: tests/e2e/test_feeds.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from fastapi.testclient import TestClient

from adapters.intake import DrainRate, PendingThenQueue, retry_after_s
from adapters.wiring import Services
from config.settings import Settings
from domain.idempotency import (
    Answer,
    KeyInProgress,
    KeyRecord,
    KeyReused,
    fingerprint,
    replay,
    scoped,
    valid_key,
)
from domain.status import RequestState
from ingest_api.app import create_app
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore
from tests.unit.test_api import HungStatusStore, body

BATCH = "/api/v1/trades/batch"
NDJSON = {"Content-Type": "application/x-ndjson"}


class Feed:
    def __init__(self, client: TestClient, statuses: FakeStatusStore, queue: FakeQueue) -> None:
        self.client = client
        self.statuses = statuses
        self.queue = queue

    def batch(self, trades: list[object], **headers: str) -> object:
        return self.client.post(BATCH, json={"trades": trades}, headers=headers)


def feed_of(statuses: FakeStatusStore, queue: FakeQueue, **settings: object) -> TestClient:
    app = create_app(
        Settings(max_body_bytes=1024, retry_after_seconds=7, **settings),  # type: ignore[arg-type]
        services=lambda _: Services(
            FakeTradeStore(), statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    return TestClient(app)


@pytest.fixture
def feed() -> Iterator[Feed]:
    statuses, queue = FakeStatusStore(), FakeQueue()
    with feed_of(statuses, queue, batch_max_items=5, max_batch_bytes=4096) as client:
        yield Feed(client, statuses, queue)


def test_a_batch_all_valid_is_202_with_results_in_order(feed: Feed) -> None:
    reply = feed.batch([body(trade_id="A", version=1), body(trade_id="A", version=2)])
    assert reply.status_code == 202  # type: ignore[attr-defined]
    answer = reply.json()  # type: ignore[attr-defined]
    assert (answer["accepted"], answer["rejected"]) == (2, 0)
    assert [(r["index"], r["status"], r["version"]) for r in answer["results"]] == [
        (0, 202, 1),
        (1, 202, 2),
    ]
    assert reply.headers["location"] == f"/api/v1/batches/{answer['batch_id']}"  # type: ignore[attr-defined]
    assert [m.request_id for m in feed.queue.messages] == [
        r["request_id"] for r in answer["results"]
    ]
    pending = [feed.statuses.items[r["request_id"]] for r in answer["results"]]
    assert [(p.state, p.batch_id, p.batch_index) for p in pending] == [
        (RequestState.PENDING, answer["batch_id"], 0),
        (RequestState.PENDING, answer["batch_id"], 1),
    ]
    assert feed.statuses.batches[answer["batch_id"]].accepted == 2


def test_a_mixed_batch_is_207_and_queues_only_the_valid_items(feed: Feed) -> None:
    matured = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    reply = feed.batch(
        [body(trade_id="A"), body(version="x"), "not a trade", body(maturity_date=matured)]
    )
    assert reply.status_code == 207  # type: ignore[attr-defined]
    answer = reply.json()  # type: ignore[attr-defined]
    results = answer["results"]
    assert [r["status"] for r in results] == [202, 422, 422, 400]
    assert results[1]["problem"]["code"] == "VALIDATION_ERROR"
    assert results[1]["problem"]["field"] == "version"
    assert results[3]["problem"]["code"] == "MATURITY_PASSED"
    assert results[3]["problem"]["field"] == "maturity_date"
    assert (answer["accepted"], answer["rejected"]) == (1, 3)
    assert [m.trade.trade_id for m in feed.queue.messages] == ["A"]
    assert feed.statuses.items[results[0]["request_id"]].batch_index == 0


@pytest.mark.parametrize(
    "envelope",
    [
        [body()],
        {"trade": [body()]},
        {"trades": [body()], "more": 1},
        {"trades": []},
        {"trades": [body()] * 6},
        {"trades": body()},
    ],
)
def test_a_bad_envelope_is_422_and_queues_nothing(feed: Feed, envelope: object) -> None:
    reply = feed.client.post(BATCH, json=envelope)
    assert reply.status_code == 422
    assert (reply.json()["code"], reply.json()["field"]) == ("VALIDATION_ERROR", "trades")
    assert feed.queue.messages == []


def test_a_batch_that_is_not_json_is_422_and_another_media_type_415(feed: Feed) -> None:
    headers = {"Content-Type": "application/json"}
    reply = feed.client.post(BATCH, content=b'{"trades": [', headers=headers)
    assert (reply.status_code, reply.json()["code"]) == (422, "MALFORMED_JSON")
    reply = feed.client.post(BATCH, content=b"x", headers={"Content-Type": "text/csv"})
    assert (reply.status_code, reply.json()["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")


def test_a_batch_over_max_batch_bytes_is_413_but_a_single_post_keeps_its_own_cap(
    feed: Feed,
) -> None:
    big = [body(trade_id=f"T{i}", book_id="B" * 60) for i in range(5)] * 1
    padded = {"trades": big, "pad": "x" * 4096}
    reply = feed.client.post(
        BATCH, content=orjson.dumps(padded), headers={"Content-Type": "application/json"}
    )
    assert (reply.status_code, reply.json()["code"]) == (413, "PAYLOAD_TOO_LARGE")
    reply = feed.client.post("/api/v1/trades", json=body(book_id="B" * 2000))
    assert reply.status_code == 413  # 1 KiB: MAX_BODY_BYTES, not the batch's 4 KiB


def test_a_retried_post_replays_its_first_answer_and_queues_nothing(feed: Feed) -> None:
    first = feed.client.post("/api/v1/trades", json=body(), headers={"Idempotency-Key": "k-1"})
    again = feed.client.post("/api/v1/trades", json=body(), headers={"Idempotency-Key": '"k-1"'})
    assert first.status_code == again.status_code == 202
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(feed.queue.messages) == 1
    other = feed.client.post(
        "/api/v1/trades", json=body(version=2), headers={"Idempotency-Key": "k-1"}
    )
    assert (other.status_code, other.json()["code"]) == (422, "IDEMPOTENCY_KEY_REUSED")
    assert other.json()["field"] == "Idempotency-Key"
    assert len(feed.queue.messages) == 1


def test_a_retried_batch_replays_its_207(feed: Feed) -> None:
    trades = [body(trade_id="A"), body(version=0)]
    first = feed.batch(trades, **{"Idempotency-Key": "b-1"})
    again = feed.batch(trades, **{"Idempotency-Key": "b-1"})
    assert first.status_code == again.status_code == 207  # type: ignore[attr-defined]
    assert again.content == first.content  # type: ignore[attr-defined]
    assert len(feed.queue.messages) == 1
    # The same key on the other route is another request.
    single = feed.client.post("/api/v1/trades", json=trades[0], headers={"Idempotency-Key": "b-1"})
    assert single.json()["code"] == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize("key", ["", "a b", "é", "x" * 256])
def test_a_bad_idempotency_key_is_400(feed: Feed, key: str) -> None:
    reply = feed.client.post(
        "/api/v1/trades", json=body(), headers={"Idempotency-Key": key.encode()}
    )
    assert (reply.status_code, reply.json()["code"]) == (400, "INVALID_IDEMPOTENCY_KEY")
    assert feed.queue.messages == []


def test_a_failed_keyed_post_releases_its_key() -> None:
    statuses, queue = FakeStatusStore(), FakeQueue()
    with feed_of(statuses, queue) as client:
        queue.down = True
        headers = {"Idempotency-Key": "k-down"}
        assert client.post("/api/v1/trades", json=body(), headers=headers).status_code == 503
        queue.down = False
        retried = client.post("/api/v1/trades", json=body(), headers=headers)
    assert retried.status_code == 202
    assert "idempotent-replayed" not in retried.headers
    assert len(queue.messages) == 1


def test_a_retry_while_the_first_is_in_flight_is_409() -> None:
    with feed_of(
        HungStatusStore(), FakeQueue(), profile="services", produce_timeout_ms=500
    ) as client:
        headers = {"Idempotency-Key": "k-slow"}
        first = threading.Thread(
            target=client.post,
            args=("/api/v1/trades",),
            kwargs={"json": body(), "headers": headers},
        )
        first.start()
        time.sleep(0.1)
        started = time.monotonic()
        reply = client.post("/api/v1/trades", json=body(), headers=headers)
        took = time.monotonic() - started
        first.join()
    assert (reply.status_code, reply.json()["code"]) == (409, "IDEMPOTENCY_IN_PROGRESS")
    assert reply.headers["retry-after"] == "1"
    assert took < 0.2  # at once, not after the first one's wait


def test_a_batch_larger_than_the_in_flight_cap_is_taken_alone() -> None:
    statuses, queue = FakeStatusStore(), FakeQueue()
    with feed_of(statuses, queue, max_in_flight=2) as client:
        reply = client.post(BATCH, json={"trades": [body(trade_id=f"T{i}") for i in range(3)]})
    assert reply.status_code == 202
    assert len(queue.messages) == 3


def test_an_ndjson_stream_answers_a_line_per_line_and_a_summary(feed: Feed) -> None:
    lines = [
        orjson.dumps(body(trade_id="S1")),
        b"{broken",
        b"",
        b"  ",
        orjson.dumps(body(trade_id="S2")),
    ]
    lines.append(b"x" * 2000)  # over MAX_BODY_BYTES (1 KiB): refused, never held
    lines.append(orjson.dumps(body(trade_id="S3")))
    reply = feed.client.post(BATCH, content=b"\n".join(lines), headers=NDJSON)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/x-ndjson"
    answers = [orjson.loads(line) for line in reply.content.splitlines()]
    *results, summary = answers
    assert [(r["index"], r["status"]) for r in results] == [
        (0, 202),
        (1, 422),
        (4, 202),
        (5, 413),
        (6, 202),
    ]
    assert results[1]["problem"]["code"] == "MALFORMED_JSON"
    assert summary == {"batch_id": summary["batch_id"], "accepted": 3, "rejected": 2}
    assert reply.headers["location"] == f"/api/v1/batches/{summary['batch_id']}"
    assert [m.trade.trade_id for m in feed.queue.messages] == ["S1", "S2", "S3"]
    assert feed.statuses.batches[summary["batch_id"]].accepted == 3


def test_an_ndjson_stream_takes_no_idempotency_key(feed: Feed) -> None:
    headers = NDJSON | {"Idempotency-Key": "s-1"}
    reply = feed.client.post(BATCH, content=orjson.dumps(body()), headers=headers)
    assert (reply.status_code, reply.json()["code"]) == (400, "IDEMPOTENCY_KEY_NOT_SUPPORTED")
    assert feed.queue.messages == []


def test_an_ndjson_stream_cut_by_an_outage_ends_with_the_error() -> None:
    statuses, queue = FakeStatusStore(), FakeQueue()
    queue.down = True
    with feed_of(statuses, queue) as client:
        reply = client.post(BATCH, content=orjson.dumps(body()), headers=NDJSON)
    summary = orjson.loads(reply.content.splitlines()[-1])
    assert summary["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert summary["accepted"] == 0


def test_a_key_is_the_clients_own_and_the_fingerprint_names_route_type_and_body() -> None:
    assert scoped("a", "k") != scoped("b", "k") != scoped(None, "k")
    assert scoped("a", "k").startswith("key/")
    same = fingerprint("/p", "application/json", b"{}")
    assert same == fingerprint("/p", "application/json", b"{}")
    assert same != fingerprint("/q", "application/json", b"{}")
    assert same != fingerprint("/p", "application/x-ndjson", b"{}")
    assert same != fingerprint("/p", "application/json", b"{ }")
    assert valid_key("~a!0")
    assert not valid_key("")
    assert not valid_key("a\tb")


def test_replay_gives_the_first_answer_only_for_the_same_finished_request() -> None:
    held = KeyRecord("key/x", "f1", datetime.now(UTC), Answer(202, b"{}", "/r"), done=True)
    assert replay(held, "f1") == Answer(202, b"{}", "/r")
    with pytest.raises(KeyReused):
        replay(held, "f2")
    with pytest.raises(KeyInProgress):
        replay(KeyRecord("key/x", "f1", held.created_at, held.answer, done=False), "f1")


def test_retry_after_is_what_is_in_flight_over_the_drain_rate() -> None:
    assert retry_after_s(0, 0, 30) == 1
    assert retry_after_s(5000, 1000, 30) == 5
    assert retry_after_s(5001, 1000, 30) == 6
    assert retry_after_s(10**6, 1, 30) == 30
    drained = DrainRate()
    drained.add(700)
    drained.add(300)
    assert drained.per_second() >= 1000
