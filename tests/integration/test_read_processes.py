"""Trade reads in read processes of their own (ingest_api.reads.ReadProcesses), over a real
embedded trade store: each process opens the store from the settings, runs at a lower
priority with the request's log fields, is bounded like the threads, and one that dies
fails its read with 503 while the next reads are served by new processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from adapters import wiring
from cli.migrate import upgrade
from config.clock import business_today
from config.settings import Settings
from domain.ports import Overloaded, TradeReader, Unavailable
from domain.trade import Trade
from ingest_api.reads import READ_NICENESS, ReadProcesses, trades_json, versions_of
from tests.support import upsert, wait_for

TODAY = business_today("UTC")


def facts(trades: TradeReader) -> dict[str, Any]:
    """Run in a read process: where it runs, how nice, and the log fields it was given."""
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "fields": structlog.contextvars.get_contextvars(),
    }


def nap(trades: TradeReader, seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def die(trades: TradeReader) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(profile="embedded", data_dir=tmp_path, read_processes=1, max_waiting_reads=0)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[ReadProcesses]:
    upgrade(settings.trade_store_url)
    upsert(
        wiring.trade_store(settings), [Trade("T1", 1, "CP", "B", TODAY + timedelta(days=9), TODAY)]
    )
    reads = ReadProcesses(settings, wiring.trade_store(settings, reads_only=True))
    await reads.warm()
    yield reads
    reads.close()


async def test_a_trade_read_runs_in_a_nicer_process_of_its_own_with_the_log_fields(
    pool: ReadProcesses, settings: Settings
) -> None:
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    with structlog.contextvars.bound_contextvars(correlation_id="c-1"):
        theirs = await pool.trades(facts)
    assert theirs["pid"] != os.getpid()
    assert theirs["parent"] == os.getpid()
    assert theirs["nice"] == min(ours + READ_NICENESS, 19)
    assert theirs["fields"] == {"correlation_id": "c-1"}

    expected = trades_json(wiring.trade_store(settings).versions("T1", TODAY))
    assert await pool.trades(versions_of, "T1", TODAY) == expected
    assert await pool.trades(versions_of, "T2", TODAY) is None


async def test_reads_over_the_bound_are_overloaded_at_once(pool: ReadProcesses) -> None:
    held = asyncio.ensure_future(pool.trades(nap, 1.0))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(Overloaded):
        await pool.trades(nap, 0)
    assert time.monotonic() - started < 0.05
    await held
    assert await pool.trades(nap, 0)


async def test_a_read_process_that_dies_is_a_503_and_the_pool_starts_again(
    pool: ReadProcesses,
) -> None:
    before = await pool.trades(nap, 0)
    with pytest.raises(Unavailable):
        await pool.trades(die)
    after = await pool.trades(nap, 0)
    assert after != before
    assert not running(before)


async def test_closing_ends_the_read_processes(tmp_path: Path) -> None:
    settings = Settings(profile="embedded", data_dir=tmp_path, read_processes=2)
    others = set(multiprocessing.active_children())  # earlier tests' apps' may be ending
    reads = ReadProcesses(settings, wiring.trade_store(settings, reads_only=True))
    await reads.warm()
    ours = set(multiprocessing.active_children()) - others
    assert len(ours) == 2
    reads.close()
    # By pid, not is_alive(): the pool's own thread reaps its processes, and a Process whose
    # waitpid lost that race reports itself alive for good.
    pids = {child.pid for child in ours}
    wait_for(lambda: not any(running(pid) for pid in pids), 10, "the read processes to end")


def running(pid: int | None) -> bool:
    """The process exists and has not exited (a zombie has ended; it waits to be reaped)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"
