"""Smoke test of a deployed API: the specification's example table over HTTP.

    python .github/scripts/smoke.py https://staging.example/    (exit 0 only if every row holds)

The trade ids are new on every run, the dates relative to today (UTC), so it can run against
a store that already holds data. deploy.yml runs it against staging after each deployment.
"""

from __future__ import annotations

import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx

TIMEOUT_S = 60


def wait_for_live(client: httpx.Client) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            if client.get("/api/v1/health/live").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"API not live after {TIMEOUT_S}s")
        time.sleep(1)


def final(client: httpx.Client, reply: httpx.Response) -> dict[str, object]:
    """The request's terminal status (polled until it is no longer PENDING)."""
    if reply.status_code != 202:
        raise SystemExit(f"expected 202, got {reply.status_code}: {reply.text}")
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        body: dict[str, object] = client.get(reply.headers["location"]).json()
        if body["status"] != "PENDING":
            return body
        time.sleep(0.2)
    raise SystemExit(f"{reply.headers['location']} still PENDING after {TIMEOUT_S}s")


def check(what: str, ok: bool, seen: object) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {seen}")
    if not ok:
        raise SystemExit(1)


def main(base_url: str) -> None:
    today = datetime.now(UTC).date()
    future = (today + timedelta(days=365)).isoformat()
    past = (today - timedelta(days=2)).isoformat()
    run = uuid.uuid4().hex[:8]
    t1, t2, t3 = f"smoke-T1-{run}", f"smoke-T2-{run}", f"smoke-T3-{run}"
    with httpx.Client(base_url=base_url, timeout=10) as client:
        wait_for_live(client)

        def submit(tid: str, version: int, cp: str, maturity: str, **extra: str) -> httpx.Response:
            body = {"trade_id": tid, "version": version, "counterparty_id": cp, "book_id": "B1"}
            return client.post("/api/v1/trades", json=body | {"maturity_date": maturity} | extra)

        def stored(tid: str) -> list[tuple[object, object]]:
            rows = client.get(f"/api/v1/trades/{tid}").json()
            return [(r["version"], r["counterparty_id"]) for r in rows]

        for what, (tid, version, cp, extra), status in [
            ("T1 v1 stored", (t1, 1, "CP-1", {}), "SUCCESS"),
            ("T2 v1 stored", (t2, 1, "CP-1", {"created_date": "2015-03-14"}), "SUCCESS"),
            ("T2 v2 stored", (t2, 2, "CP-2", {}), "SUCCESS"),
            ("T2 v1 refused (lower version)", (t2, 1, "CP-1", {}), "FAILED"),
            ("T1 v1 replaced (same version)", (t1, 1, "CP-9", {}), "SUCCESS"),
        ]:
            body = final(client, submit(tid, version, cp, future, **extra))
            check(what, body["status"] == status, body)
        rejected = submit(t3, 3, "CP-3", past)
        check("T3 maturity passed: 400", rejected.status_code == 400, rejected.text)
        check("T2 holds v1 and v2", stored(t2) == [(1, "CP-1"), (2, "CP-2")], stored(t2))
        check("T1 holds the replacement", stored(t1) == [(1, "CP-9")], stored(t1))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
