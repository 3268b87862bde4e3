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
# The bound held in the suite: flooded POST p99 under FLOOD_P99_S, or within twice the idle
# p99 when the machine itself is that slow (idle p99s of 4 to 50 ms were seen here from one
# run to the next). The target, twice the idle p99, holds untraced with trade reads
# in a read process (README, Guarantees): six runs here measured 6.2-8.1 ms idle, 10.2-15.5
# ms flooded (1.47-1.91x; 2.25-2.35x on read threads, 170 ms before the read pool, health
# p50 636 ms then). It is not asserted: under the suite's coverage tracing (the API and its
# read process traced) two runs gave 2.43x and 0.99x, the idle p99 alone 10 to 32 ms.
FLOOD_P99_S = 0.100
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


def test_reads_do_not_starve_writes_and_memory_stays_bounded(api: Api) -> None:
    """Idle and flooded rounds alternate, so both meet the same load from the machine's
    other users."""
    assert len(api.client.get(FLOOD_PATH).json()) == 1000
    post_times(api.client, "warm", 50)
    command = ["-m", "tests.e2e.read_flood", str(api.port), str(CLIENTS), "90", FLOOD_PATH]
    flood = subprocess.Popen(
        [sys.executable, *command],
        stdout=subprocess.PIPE,
        text=True,
    )
    idle: list[float] = []
    flooded: list[float] = []
    idle_health: list[float] = []
    flooded_health: list[float] = []
    try:
        assert flood.stdout is not None
        assert flood.stdout.readline() == "flooding\n"
        for round_ in range(ROUNDS):
            flood.send_signal(signal.SIGUSR1)  # paused: the reads in flight drain
            time.sleep(DRAIN_S)
            idle += post_times(api.client, f"idle{round_}", POSTS // ROUNDS)
            idle_health += health_times(api.client, 4)
            flood.send_signal(signal.SIGUSR2)
            time.sleep(0.5)  # every client looping again
            flooded += post_times(api.client, f"flooded{round_}", POSTS // ROUNDS)
            flooded_health += health_times(api.client, 4)
    finally:
        flood.send_signal(signal.SIGTERM)
        out, _ = flood.communicate(timeout=30)
    codes = {int(k): v for k, v in json.loads(out).items()}
    memory = memory_kb(api.process.pid)
    # The read processes, and multiprocessing's resource tracker.
    readers = [memory_kb(child) for child in children(api.process.pid)]
    peak_kb = memory["VmHWM"] + sum(r["VmHWM"] for r in readers)

    figures = {
        "post_p99_ms": {"idle": p99(idle) * 1000, "flooded": p99(flooded) * 1000},
        "post_p50_ms": {
            "idle": statistics.median(idle) * 1000,
            "flooded": statistics.median(flooded) * 1000,
        },
        "health_p50_ms": {
            "idle": statistics.median(idle_health) * 1000,
            "flooded": statistics.median(flooded_health) * 1000,
        },
        "post_slowest_ms": {
            "idle": [round(t * 1000, 1) for t in sorted(idle)[-5:]],
            "flooded": [round(t * 1000, 1) for t in sorted(flooded)[-5:]],
        },
        "flood_answers": codes,
        "memory_kb": {"api": memory, "read_processes": readers, "peak_sum": peak_kb},
    }
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / "read-flood.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))

    assert set(codes) <= {200, 429}
    assert codes.get(200, 0) >= 100  # a real flood: pages of 1,000 served all along
    assert p99(flooded) <= max(FLOOD_P99_S, 2 * p99(idle)), figures
    assert statistics.median(flooded_health) < 0.05, figures
    assert peak_kb <= MAX_RSS_KB, figures
