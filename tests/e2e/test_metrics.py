"""Metrics scraped by a real Prometheus (Debian's ``prometheus``; scripts/test installs it):
an embedded API with two workers and a processor, a few trades and one dead letter, then
the series asked of Prometheus's HTTP API. Then the processor stops, trades queue, and the
lag Prometheus scrapes rises to them and falls to 0 once the processor has caught up."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.clock import business_today
from config.settings import Settings
from tests.conftest import settings_env
from tests.support import LOGS, free_port, start, stop, wait_for

SCRAPE = "500ms"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "prometheus not found: scripts/test installs it (apt-get install prometheus)"
    return found


class Prometheus:
    """A Prometheus server of this test's own, on 127.0.0.1, scraping ``targets``."""

    def __init__(self, tmp: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n"
            for job, port in targets.items()
        )
        config = tmp / "prometheus.yml"
        config.write_text(
            f"global: {{scrape_interval: {SCRAPE}, scrape_timeout: {SCRAPE}}}\n"
            f"scrape_configs:\n{jobs}"
        )
        LOGS.mkdir(parents=True, exist_ok=True)
        log = (LOGS / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log,
            stderr=log,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result: each series' labels and value."""
        assert self.proc.poll() is None, "prometheus exited; see .services/test-logs"
        try:
            reply = self.client.get("/api/v1/query", params={"query": expr})
        except httpx.TransportError:
            return []
        if reply.status_code != 200:
            return []
        return [
            {**r["metric"], "value": float(r["value"][1])} for r in reply.json()["data"]["result"]
        ]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return result[0]["value"] if result else None

    def stop(self) -> None:
        stop(self.proc)  # type: ignore[arg-type]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    api_port, metrics_port = free_port(), free_port()
    settings = Settings(
        profile="embedded",
        data_dir=tmp_path / "data",
        port=api_port,
        api_workers=2,
        metrics_port=metrics_port,
        inbound_partitions=2,
        snapshot_interval_seconds=3.0,  # lag stays up for a few scrapes after a restart
    )
    env = settings_env(settings)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "multiproc")  # to see both workers' files
    # Once, before both: two processes migrating one new SQLite file at once collide.
    subprocess.run([sys.executable, "-m", "cli.main", "migrate"], env=env, check=True, timeout=60)
    api = start("metrics-api", ["serve", "--no-migrate"], env)
    processor = start("metrics-processor", ["process", "--no-migrate"], env)
    prometheus = Prometheus(tmp_path, {"api": api_port, "processor": metrics_port})
    parts = {"settings": settings, "env": env, "api": api, "processor": processor, "tmp": tmp_path}
    parts["prometheus"] = prometheus
    try:
        yield parts
    finally:
        prometheus.stop()
        stop(parts["processor"])  # the one running now: the test restarts it
        stop(api)


def trade(trade_id: str, version: int = 1) -> dict[str, Any]:
    maturity = (business_today("UTC") + timedelta(days=30)).isoformat()
    return {
        "trade_id": trade_id,
        "version": version,
        "counterparty_id": "C",
        "book_id": "B",
        "maturity_date": maturity,
    }


def lag(prometheus: Prometheus) -> float | None:
    return prometheus.value('sum(trade_store_processor_lag_records{job="processor"})')


def test_prometheus_scrapes_the_api_and_the_processor(stack: dict[str, Any]) -> None:
    settings: Settings = stack["settings"]
    prometheus: Prometheus = stack["prometheus"]
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)

    def up(job: str) -> bool:
        return prometheus.value(f'up{{job="{job}"}}') == 1

    wait_for(lambda: up("api") and up("processor"), 60, "both targets up")
    # A connection each, until both workers have answered (each writes its own files).
    fresh = httpx.Client(base_url=client.base_url, headers={"Connection": "close"}, timeout=10)

    def workers_seen() -> int:
        fresh.get("/api/v1/health/live")
        return len(
            {f.stem.rsplit("_", 1)[1] for f in (stack["tmp"] / "multiproc").glob("counter_*.db")}
        )

    wait_for(lambda: workers_seen() == 2, 30, "both API workers answering", every=0)
    bodies = [trade(f"M{i}") for i in range(5)] + [trade("M0", 2), trade("M0", 1)]  # 1 stale
    assert [fresh.post("/api/v1/trades", json=b).status_code for b in bodies] == [202] * 7
    assert fresh.post("/api/v1/trades/batch", json={"trades": [trade("MB")]}).status_code == 202
    assert client.get("/api/v1/trades/NOPE").status_code == 404
    with sqlite3.connect(settings.data_dir / "inbound.db") as conn:  # one undecodable record
        conn.execute(
            "INSERT INTO inbound_log (partition, key, value, headers) VALUES (0, ?, ?, '[]')",
            (b"M-poison", b"{not json"),
        )

    # Either worker answers /metrics with the sum of both (multiprocess mode): seven POSTs.
    posts = 'trade_store_api_requests_total{route="/api/v1/trades",method="POST",status="202"}'
    wait_for(lambda: prometheus.value(posts) == 7, 30, "seven 202s scraped")
    accepted = {"route": "/api/v1/trades", "method": "POST", "status": "202"}
    for _ in range(10):  # whichever worker answers, on a connection of its own
        samples = [
            s.value
            for family in text_string_to_metric_families(fresh.get("/metrics").text)
            for s in family.samples
            if s.name == "trade_store_api_requests_total" and s.labels == accepted
        ]
        assert samples == [7]
    not_found = 'trade_store_api_requests_total{route="/api/v1/trades/{trade_id}",status="404"}'
    wait_for(lambda: bool(prometheus.query(not_found)), 30, "the 404 scraped")
    found = prometheus.query(not_found)
    assert [s["method"] for s in found] == ["GET"]
    acks = prometheus.query('trade_store_api_ack_duration_seconds_count{job="api"}')
    assert {s["route"]: s["value"] for s in acks} == {
        "/api/v1/trades": 7,
        "/api/v1/trades/batch": 1,
    }
    assert prometheus.value("sum(trade_store_api_request_duration_seconds_bucket{le='+Inf'})")
    assert prometheus.value("trade_store_api_requests_in_flight") is not None

    decided = 'trade_store_processor_decisions_total{state="SUCCESS",reason_code=""}'
    wait_for(lambda: prometheus.value(decided) == 7, 60, "seven successes scraped")
    stale = 'trade_store_processor_decisions_total{state="FAILED",reason_code="STALE_VERSION"}'
    wait_for(lambda: prometheus.value("trade_store_processor_dead_letters_total") == 1, 10, "dlq")
    assert prometheus.value(stale) == 1
    assert prometheus.value("trade_store_processor_records_read_total") == 9
    assert prometheus.value("trade_store_processor_end_to_end_seconds_count") == 8
    assert prometheus.value("trade_store_processor_commit_duration_seconds_count")
    assert prometheus.value("trade_store_processor_batch_size_sum") == 8
    partitions = prometheus.query("trade_store_processor_lag_records")
    assert sorted(s["partition"] for s in partitions) == ["0", "1"]

    wait_for(lambda: lag(prometheus) == 0, 30, "lag 0 once the snapshot covers everything")
    age = prometheus.value("trade_store_processor_snapshot_age_seconds")
    assert age is not None
    assert 0 <= age < 30
    assert stop(stack["processor"]) == 0
    for i in range(20):
        assert client.post("/api/v1/trades", json=trade(f"L{i}")).status_code == 202
    stack["processor"] = start("metrics-processor", ["process", "--no-migrate"], stack["env"])
    # The backlog queued while it was stopped, scraped as soon as it is back...
    wait_for(lambda: lag(prometheus) == 20, 60, "lag of the 20 queued records")
    # ...and gone once its next snapshot covers them.
    wait_for(lambda: lag(prometheus) == 0, 30, "lag back to 0")
    assert prometheus.value(decided) == 20  # counted by the new process
