"""Locust scenario for load-testing a *deployed* trade-store API (not run by the harness).

    pip install locust            # not a project dependency
    locust -f bench/locustfile.py --host http://127.0.0.1:8000 \
        --users 200 --spawn-rate 50 --run-time 5m --headless

Each simulated client submits trade versions at a constant pace (``LOCUST_RATE_PER_USER``
per second, default 5, so 200 users ≈ 1,000 trades/s), mostly new trades and some new
versions of trades it submitted before, and follows a fraction of its requests
(``LOCUST_FOLLOW``, default 0.02) until their status is SUCCESS or FAILED. The time from
POST to that terminal status is reported as the request type ``E2E``.

Locust is a closed-model tool: a user waits for its response before its next request, so
when the server slows down the offered rate drops with it and latency percentiles look
better than a real client population would see (coordinated omission). For latency figures
use ``scripts/bench`` (open model, latency from each request's intended send time); use this
file to drive a deployed instance from several machines, soak it, or watch its dashboards.
Point it only at instances you own.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from datetime import date, timedelta

from locust import HttpUser, constant_throughput, events, task

RATE = float(os.environ.get("LOCUST_RATE_PER_USER", "5"))
FOLLOW = float(os.environ.get("LOCUST_FOLLOW", "0.02"))
FOLLOW_TIMEOUT_S = float(os.environ.get("LOCUST_FOLLOW_TIMEOUT_S", "30"))
TERMINAL = {"SUCCESS", "FAILED"}


class TradeSubmitter(HttpUser):
    """One upstream system submitting trade versions."""

    wait_time = constant_throughput(RATE)

    def on_start(self) -> None:
        self.prefix = f"L{uuid.uuid4().hex[:8]}"
        self.versions: dict[str, int] = {}
        self.maturity = (date.today() + timedelta(days=365)).isoformat()

    def _next_trade(self) -> tuple[str, int]:
        if self.versions and random.random() < 0.3:
            trade_id = random.choice(list(self.versions))
            version = self.versions[trade_id] + 1
        else:
            trade_id, version = f"{self.prefix}-{len(self.versions)}", 1
        self.versions[trade_id] = version
        return trade_id, version

    @task
    def submit(self) -> None:
        trade_id, version = self._next_trade()
        started = time.perf_counter()
        with self.client.post(
            "/api/v1/trades",
            json={
                "trade_id": trade_id,
                "version": version,
                "counterparty_id": f"CP-{version % 7}",
                "book_id": f"B-{len(self.versions) % 5}",
                "maturity_date": self.maturity,
            },
            name="/api/v1/trades",
            catch_response=True,
        ) as reply:
            if reply.status_code != 202:
                reply.failure(f"expected 202, got {reply.status_code}")
                return
            reply.success()
            location = reply.headers.get("Location")
        if location and random.random() < FOLLOW:
            self._follow(location, started)

    def _follow(self, location: str, started: float) -> None:
        """Poll the request until it is terminal; report POST → terminal as ``E2E``."""
        deadline = started + FOLLOW_TIMEOUT_S
        delay = 0.01
        while time.perf_counter() < deadline:
            reply = self.client.get(location, name="/api/v1/requests/[id]")
            if reply.status_code == 200 and reply.json().get("status") in TERMINAL:
                events.request.fire(
                    request_type="E2E",
                    name="POST → terminal status",
                    response_time=(time.perf_counter() - started) * 1000,
                    response_length=0,
                    exception=None,
                    context={},
                )
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        events.request.fire(
            request_type="E2E",
            name="POST → terminal status",
            response_time=FOLLOW_TIMEOUT_S * 1000,
            response_length=0,
            exception=TimeoutError(f"{location} not terminal after {FOLLOW_TIMEOUT_S}s"),
            context={},
        )
