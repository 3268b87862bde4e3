"""Per-client quotas: a token bucket per client and policy, per API worker.

A client is its authenticated id (``scope["state"]["client"]``, set by the authentication
dependency before this one runs), else the peer IP. ``writes`` counts trades, ``reads``
requests. Answers carry the IETF httpapi ``RateLimit-Policy`` and ``RateLimit`` fields;
a request over quota gets 429 ``RATE_LIMITED`` at once, with ``Retry-After``.

Our own bucket rather than the ``limits`` library: it has no token-bucket or GCRA strategy;
its moving window keeps one entry per unit (2,000 per client at the default rate) and refuses
a cost above the window forever (a batch larger than the burst), its rates are whole units
per whole seconds, and its memory storage is bounded only by expiry, swept by a timer thread.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from fastapi import Depends, FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config.settings import Settings
from ingest_api.openapi import problem
from ingest_api.problems import problem_response

Policy = Literal["writes", "reads"]
# The key-file rate of a client (see ingest_api.auth.Client), per policy.
CLIENT_RATE = {"writes": "write_rate", "reads": "read_rate"}
UNIT = {"writes": "trades", "reads": "requests"}
IPV4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d, how a dual-stack socket shows IPv4
STATE_KEY = "ratelimit"  # scope["state"] entry: the fields to add to the answer
OVER_QUOTA: dict[int | str, dict[str, Any]] = {
    429: {
        **problem(
            "Over the client's quota (code RATE_LIMITED), or, on POST, too many trades in"
            " flight on this worker (OVERLOADED); retry after Retry-After"
        ),
        "headers": {
            "Retry-After": {
                "description": "Whole seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 1},
            },
            "RateLimit-Policy": {
                "description": 'The quota, e.g. `"writes";q=2000;w=2`',
                "schema": {"type": "string"},
            },
            "RateLimit": {
                "description": 'What is left of it, e.g. `"writes";r=0;t=1`',
                "schema": {"type": "string"},
            },
        },
    }
}


class Verdict(NamedTuple):
    """One take from a bucket: allowed or not, and what the answer's fields say."""

    allowed: bool
    capacity: int
    window_s: int  # capacity / window_s never exceeds the rate
    remaining: int  # whole units left
    retry_after_s: int  # until this cost fits (0 when allowed)
    next_unit_s: int | None  # until one more unit is there; None when the bucket is full


@functools.lru_cache(maxsize=1024)  # a few rates, on every request
def shape(rate: float, burst_s: int) -> tuple[int, int]:
    """A bucket's capacity and window: ``rate × burst_s`` units over ``burst_s`` seconds,
    the window stretched to hold at least one unit when the rate is below one per burst
    (rounded down, so the advertised policy is never more than the rate)."""
    window_s = max(burst_s, math.ceil(1 / rate))
    return max(1, math.floor(rate * window_s)), window_s


class Buckets:
    """Token buckets of one policy keyed by client: each holds ``shape()`` units and refills
    at ``rate`` per second. At most ``max_keys`` are kept, least recently used dropped
    first: a bucket idle for its window is full, the same as a dropped one. Used from the
    event loop only, so it needs no lock."""

    def __init__(
        self, burst_s: int, max_keys: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst_s = burst_s
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when); LRU order

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, rate: float, cost: int = 1) -> Verdict:
        """Take ``cost`` units if they are there. A cost above the capacity passes on a full
        bucket and leaves it in debt, so a large batch waits after it instead of never."""
        capacity, window_s = shape(rate, self.burst_s)
        now = self._clock()
        tokens, when = self._buckets.pop(key, (capacity, now))
        tokens = min(capacity, tokens + (now - when) * rate)
        allowed = tokens >= min(cost, capacity)
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        remaining = max(0, math.floor(tokens))
        return Verdict(
            allowed,
            capacity,
            window_s,
            remaining,
            0 if allowed else _seconds(min(cost, capacity) - tokens, rate),
            None if tokens >= capacity else _seconds(remaining + 1 - tokens, rate),
        )


def _seconds(units: float, rate: float) -> int:
    """Whole seconds (at least 1, never early) until ``units`` more have refilled."""
    return max(1, math.ceil(units / rate))


class RateLimited(Exception):
    """Raised by the quota dependency; answered 429 RATE_LIMITED with Retry-After."""

    def __init__(self, policy: Policy, rate: float, verdict: Verdict) -> None:
        super().__init__(f"over the {policy} quota")
        self.policy = policy
        self.rate = rate
        self.verdict = verdict


class Quotas:
    """The app's policies: a client's own rate from its key, else the default setting;
    0 means unlimited (no bucket, no fields)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.defaults: dict[Policy, float] = {
            "writes": settings.quota_writes_per_second,
            "reads": settings.quota_reads_per_second,
        }
        self.buckets: dict[Policy, Buckets] = {
            policy: Buckets(settings.quota_burst_seconds, settings.quota_max_clients, clock)
            for policy in self.defaults
        }

    def charge(self, scope: Scope, policy: Policy, cost: int) -> None:
        """Take ``cost`` from the caller's bucket and note the answer's fields in the
        request's state; raise RateLimited when the bucket is short."""
        state = scope.setdefault("state", {})
        client = state.get("client")
        rate = getattr(client, CLIENT_RATE[policy], None) if client is not None else None
        if rate is None:
            rate = self.defaults[policy]
        if not rate:
            return
        key = f"client:{client.id}" if client is not None else peer_key(scope)
        verdict = self.buckets[policy].take(key, rate, cost)
        state.setdefault(STATE_KEY, []).append(fields(policy, verdict))
        if not verdict.allowed:
            raise RateLimited(policy, rate, verdict)


def peer_key(scope: Scope) -> str:
    """The peer's IP; an IPv6 peer by its /64, the block one subscriber usually holds (one
    key per address would give such a peer 2⁶⁴ quotas), an IPv4-mapped one as IPv4."""
    peer = scope.get("client")
    host: str = peer[0] if peer else "unknown"
    if ":" in host:
        with contextlib.suppress(OSError):  # not an address (a scoped or odd name): as is
            packed = socket.inet_pton(socket.AF_INET6, host)
            if packed[:12] == IPV4_MAPPED:
                host = socket.inet_ntop(socket.AF_INET, packed[12:])
            else:
                host = socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"
    return f"ip:{host}"


def fields(policy: Policy, verdict: Verdict) -> tuple[str, str]:
    """The ``RateLimit-Policy`` and ``RateLimit`` items (structured-field form) of a take."""
    limit = f'"{policy}";r={verdict.remaining}'
    if verdict.next_unit_s is not None:
        limit += f";t={verdict.next_unit_s}"
    return f'"{policy}";q={verdict.capacity};w={verdict.window_s}', limit


def quota(policy: Policy, cost: int = 1) -> Any:
    """A route dependency charging ``cost`` units of ``policy`` (1 per request; a batch
    route charges its item count). List it after the authentication dependency."""

    async def take_quota(request: Request) -> None:
        charge(request, policy, cost)

    return Depends(take_quota)


def charge(request: Request, policy: Policy, cost: int) -> None:
    """Charge ``cost`` units of ``policy`` from inside a route, once it knows the cost."""
    quotas: Quotas = request.app.state.quotas
    quotas.charge(request.scope, policy, cost)


class RateLimitHeaders:
    """Adds the ``RateLimit-Policy`` and ``RateLimit`` fields a quota noted to whatever the
    route answered (success, 4xx or the 429 itself): the routes build their own Responses,
    so a dependency cannot set headers on them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            send = _with_fields(scope.setdefault("state", {}), send)
        await self.app(scope, receive, send)


def _with_fields(state: dict[str, Any], send: Send) -> Send:
    async def send_with_fields(message: Message) -> None:
        noted = state.get(STATE_KEY)
        if message["type"] == "http.response.start" and noted:
            headers = list(message.get("headers", ()))
            headers.append((b"ratelimit-policy", ", ".join(p for p, _ in noted).encode()))
            headers.append((b"ratelimit", ", ".join(r for _, r in noted).encode()))
            message = {**message, "headers": headers}
        await send(message)

    return send_with_fields


def install(app: FastAPI, settings: Settings) -> None:
    """The app's quotas, the 429 answer and the fields on every limited answer."""
    app.state.quotas = Quotas(settings)

    async def on_rate_limited(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RateLimited)
        return problem_response(
            429,
            "RATE_LIMITED",
            "Over the client's quota; retry after Retry-After",
            detail=f"The {exc.policy} quota is {exc.rate:g} {UNIT[exc.policy]}/s per client",
            headers={"Retry-After": str(exc.verdict.retry_after_s)},
        )

    app.add_exception_handler(RateLimited, on_rate_limited)
    app.add_middleware(RateLimitHeaders)
