"""Per-client quotas through the ASGI app on fakes: 429 RATE_LIMITED with Retry-After and
the RateLimit fields, recovery, isolation between clients, key-file rates, bounded memory."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.intake import PendingThenQueue
from adapters.wiring import Services
from config.settings import Settings
from ingest_api import routes, submissions
from ingest_api.app import create_app
from ingest_api.quotas import Buckets, Quotas, shape
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore
from tests.unit.test_api import body


@dataclass(frozen=True, slots=True)
class StandInClient:
    """The shape of the authentication's Client (ingest_api.auth), which quotas duck-type."""

    id: str
    scopes: frozenset[str] = frozenset()
    write_rate: float | None = None
    read_rate: float | None = None


CLIENTS = {
    "feed-a": StandInClient("feed-a"),
    "feed-b": StandInClient("feed-b"),
    "fast": StandInClient("fast", write_rate=5, read_rate=3),
    "unlimited": StandInClient("unlimited", write_rate=0),
}


class StandInAuth:
    """Leaves what the authentication dependency would in the request's state: the client
    named by ``X-Test-Client`` (None without it); ``X-Test-Peer`` sets the peer address."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if b"x-test-peer" in headers:
                scope["client"] = (headers[b"x-test-peer"].decode(), 50000)
            name = headers.get(b"x-test-client")
            scope.setdefault("state", {})["client"] = CLIENTS[name.decode()] if name else None
        await self.app(scope, receive, send)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def stand_in_client(request: Request) -> Any:
    return request.scope["state"].get("client")


@dataclass
class Api:
    app: FastAPI
    client: TestClient
    queue: FakeQueue
    clock: Clock

    def post(self, client: str | None = None, peer: str | None = None) -> httpx.Response:
        return self.client.post("/api/v1/trades", json=body(), headers=who(client, peer))

    def get(self, path: str, client: str | None = None) -> httpx.Response:
        return self.client.get(path, headers=who(client, None))


def who(client: str | None, peer: str | None) -> dict[str, str]:
    return {
        **({"X-Test-Client": client} if client else {}),
        **({"X-Test-Peer": peer} if peer else {}),
    }


@pytest.fixture
def start() -> Iterator[Callable[..., Api]]:
    """Starts the app with the given settings; quotas on a clock the test moves, unless
    ``real_clock``."""
    threshold = gc.get_threshold()
    running = contextlib.ExitStack()

    def make(real_clock: bool = False, **settings: Any) -> Api:
        trades, statuses, queue = FakeTradeStore(), FakeStatusStore(), FakeQueue()
        config = Settings(**settings)
        app = create_app(
            config,
            services=lambda _: Services(
                trades, statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
            ),
        )
        # The routes' own authentication would say "no client" (auth is off): let the
        # stand-in's client through instead.
        for authorize in (submissions.WRITES_TRADES, routes.READS_TRADES, routes.READS_REQUESTS):
            app.dependency_overrides[authorize] = stand_in_client
        clock = Clock()
        if not real_clock:
            app.state.quotas = Quotas(config, clock)
        client = running.enter_context(TestClient(StandInAuth(app)))
        return Api(app, client, queue, clock)

    with running:
        yield make
    gc.unfreeze()  # the app tuned the collector for a server process, not for pytest
    gc.set_threshold(*threshold)


def test_over_quota_is_429_at_once_with_retry_after_and_ratelimit_fields(
    start: Callable[..., Api],
) -> None:
    api = start(quota_writes_per_second=1, quota_burst_seconds=2)
    first, second = api.post(), api.post()
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.headers["ratelimit-policy"] == '"writes";q=2;w=2'
    assert first.headers["ratelimit"] == '"writes";r=1;t=1'
    assert second.headers["ratelimit"] == '"writes";r=0;t=1'

    refused = api.post()
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["code"] == "RATE_LIMITED"
    assert problem["status"] == 429
    assert problem["detail"] == "The writes quota is 1 trades/s per client"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["ratelimit-policy"] == '"writes";q=2;w=2'
    assert refused.headers["ratelimit"] == '"writes";r=0;t=1'
    assert refused.headers["x-correlation-id"]  # still a normal answer of the app
    assert len(api.queue.messages) == 2  # refused before the intake: nothing queued

    api.clock.now += 0.5  # half a token: still short, and Retry-After counts what is left
    assert api.post().headers["retry-after"] == "1"
    api.clock.now += 0.5
    assert api.post().status_code == 202


def test_retry_after_is_honoured_on_the_real_clock(start: Callable[..., Api]) -> None:
    """The default clock: a request sent Retry-After seconds after its 429 succeeds. The
    rate gives 2 s of slack before a slow machine could refill the bucket by itself."""
    api = start(real_clock=True, quota_writes_per_second=0.5, quota_burst_seconds=1)
    assert api.post().status_code == 202
    refused = api.post()
    assert refused.status_code == 429
    assert refused.headers["ratelimit-policy"] == '"writes";q=1;w=2'
    time.sleep(int(refused.headers["retry-after"]))
    assert api.post().status_code == 202


def test_one_client_throttled_leaves_another_alone(start: Callable[..., Api]) -> None:
    api = start(quota_writes_per_second=1, quota_burst_seconds=1)
    assert api.post("feed-a").status_code == 202
    assert api.post("feed-a").status_code == 429
    assert api.post("feed-b").status_code == 202
    # Same peer address, no client: the IP's own bucket, not feed-a's.
    assert api.post().status_code == 202


def test_without_a_client_the_peer_ip_is_the_key(start: Callable[..., Api]) -> None:
    api = start(quota_writes_per_second=1, quota_burst_seconds=1)
    assert api.post(peer="192.0.2.1").status_code == 202
    assert api.post(peer="192.0.2.1").status_code == 429
    assert api.post(peer="192.0.2.2").status_code == 202
    # An authenticated client behind the throttled address has its own bucket.
    assert api.post("feed-a", peer="192.0.2.1").status_code == 202
    # IPv6: one bucket per /64, the block one subscriber holds.
    assert api.post(peer="2001:db8:0:1::1").status_code == 202
    assert api.post(peer="2001:db8:0:1:ffff::2").status_code == 429
    assert api.post(peer="2001:db8:0:2::1").status_code == 202
    # An IPv4 peer seen through a dual-stack socket is still that IPv4 address.
    assert api.post(peer="::ffff:192.0.2.1").status_code == 429
    assert api.post(peer="::ffff:192.0.2.3").status_code == 202


def test_a_key_files_rates_override_the_defaults(start: Callable[..., Api]) -> None:
    api = start(quota_writes_per_second=1, quota_reads_per_second=1, quota_burst_seconds=2)
    answers = [api.post("fast") for _ in range(11)]
    assert [a.status_code for a in answers] == [202] * 10 + [429]
    assert answers[0].headers["ratelimit-policy"] == '"writes";q=10;w=2'
    reads = [api.get("/api/v1/trades/T1", "fast") for _ in range(7)]
    assert [r.status_code for r in reads] == [404] * 6 + [429]
    assert reads[0].headers["ratelimit-policy"] == '"reads";q=6;w=2'
    # A client whose key says 0 is unlimited: no bucket, no fields.
    answers = [api.post("unlimited") for _ in range(20)]
    assert {a.status_code for a in answers} == {202}
    assert "ratelimit" not in answers[0].headers
    assert "ratelimit-policy" not in answers[0].headers


def test_reads_have_their_own_quota_and_health_has_none(start: Callable[..., Api]) -> None:
    api = start(quota_writes_per_second=1, quota_reads_per_second=1, quota_burst_seconds=2)
    request_id = api.post().json()["request_id"]
    assert api.get(f"/api/v1/requests/{request_id}").headers["ratelimit"] == '"reads";r=1;t=1'
    assert api.get("/api/v1/trades").status_code == 200
    refused = api.get("/api/v1/trades/T1")
    assert refused.status_code == 429
    assert refused.json()["detail"] == "The reads quota is 1 requests/s per client"
    assert api.post().status_code == 202  # writes untouched by reads
    for path in ("/api/v1/health", "/api/v1/health/live"):
        answer = api.get(path)
        assert answer.status_code == 200
        assert "ratelimit" not in answer.headers


def test_zero_turns_a_default_quota_off(start: Callable[..., Api]) -> None:
    api = start(quota_writes_per_second=0, quota_reads_per_second=0)
    answers = [api.post() for _ in range(50)] + [api.get("/api/v1/trades") for _ in range(50)]
    assert {a.status_code for a in answers} == {200, 202}
    assert not any("ratelimit" in a.headers for a in answers)
    assert len(api.app.state.quotas.buckets["writes"]) == 0


def test_bucket_memory_is_bounded_by_max_clients(start: Callable[..., Api]) -> None:
    api = start(quota_writes_per_second=1, quota_burst_seconds=1, quota_max_clients=3)
    for n in range(10):
        assert api.post(peer=f"198.51.100.{n}").status_code == 202
    assert len(api.app.state.quotas.buckets["writes"]) == 3
    # The least recently used went first; a dropped bucket comes back full.
    assert api.post(peer="198.51.100.9").status_code == 429
    assert api.post(peer="198.51.100.0").status_code == 202


def test_a_cost_above_the_capacity_passes_on_a_full_bucket_then_waits() -> None:
    """So a batch larger than the burst is charged in full instead of refused forever."""
    clock = Clock()
    buckets = Buckets(burst_s=2, max_keys=10, clock=clock)
    big = buckets.take("feed", rate=1, cost=5)
    assert (big.allowed, big.capacity, big.remaining) == (True, 2, 0)
    assert big.next_unit_s == 4  # 3 units of debt, then one
    refused = buckets.take("feed", rate=1)
    assert (refused.allowed, refused.retry_after_s) == (False, 4)
    clock.now += 4
    assert buckets.take("feed", rate=1).allowed


def test_a_full_bucket_says_no_reset_and_refills_to_its_capacity_only() -> None:
    clock = Clock()
    buckets = Buckets(burst_s=2, max_keys=10, clock=clock)
    assert buckets.take("feed", rate=10).remaining == 19
    clock.now += 3600
    verdict = buckets.take("feed", rate=10, cost=0)
    assert (verdict.remaining, verdict.next_unit_s) == (20, None)


@pytest.mark.parametrize(
    ("rate", "burst_s", "capacity", "window_s"),
    [(1000, 2, 2000, 2), (2.5, 2, 5, 2), (0.5, 1, 1, 2), (0.3, 2, 1, 4), (0.1, 1, 1, 10)],
)
def test_the_advertised_policy_never_exceeds_the_rate(
    rate: float, burst_s: int, capacity: int, window_s: int
) -> None:
    assert shape(rate, burst_s) == (capacity, window_s)
    assert capacity / window_s <= rate
