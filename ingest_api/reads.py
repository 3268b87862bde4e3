"""The API's reads run off its event loop, on a bounded pool, so a flood of reads takes
neither the loop's threads nor its interpreter time from submissions and health.

Status reads (one key, or a hundred) run on a few threads. Trade reads, pages of up to
1,000 rows, run in read processes of their own when the API made its own stores: threads
share the interpreter lock with the event loop, and a page-encoding read thread holding it
made the loop wait however low its OS priority (flooded POST p99 2.3-3.0x idle, README
"Guarantees"); a process shares nothing with the loop but the cores, which its lower
priority yields.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import date
from functools import partial
from typing import Any, TypeVar

import orjson
import structlog

from config.settings import Settings
from domain.ports import Overloaded, StoredTrade, TradeReader, Unavailable

T = TypeVar("T")
log = structlog.get_logger("ingest_api")

# How much nicer than the event loop a read thread or process is to the OS scheduler: its
# database work then yields the two cores to the loop that acknowledges POSTs. Measured
# with the read flood, on threads: flooded POST p99 14 ms against 18 ms (medians of 3).
READ_NICENESS = 10


def _nicer() -> None:
    """Lower the calling thread's scheduling priority (Linux: per thread; allowed unprivileged)."""
    thread = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + READ_NICENESS)


class _Bound:
    """At most ``bound`` reads running or waiting; any beyond are Overloaded at once (429 +
    Retry-After) instead of queueing without end."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.busy = 0

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        if self.busy >= self.bound:
            raise Overloaded(f"{self.busy} reads are running or waiting")
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


class ReadPool:
    """``threads`` threads for reads; at most ``max_waiting`` more reads wait for one.

    A read given up while it runs keeps its thread until it ends, so the queue may briefly
    hold up to ``threads`` more than its bound; the threads never grow. ``trades`` reads the
    worker's own trade store on the same threads.
    """

    def __init__(self, threads: int, max_waiting: int, trades: TradeReader) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="read", initializer=_nicer)
        self._threads = _Bound(threads + max_waiting)
        self._store = trades

    async def run(self, read: Callable[..., T], *args: Any) -> T:
        """``read(*args)`` on a read thread, in this request's context (its log fields)."""
        with self._threads.admitted():
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, partial(context.run, read, *args)
            )

    async def trades(self, read: Callable[..., T], *args: Any) -> T:
        """``read(trade_store, *args)``."""
        return await self.run(read, self._store, *args)

    async def warm(self) -> None:
        """Ready before the first request (threads start on demand: nothing to do)."""

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# A read process's own trade store, built once by _start_process.
_process: dict[str, TradeReader] = {}


def _start_process(settings: Settings) -> None:
    """A read process: the API worker ends it (a terminal's Ctrl-C or a SIGTERM to the group
    is the worker's to handle); it logs like the worker and opens its own trade store."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(READ_NICENESS)
    # The trade store's modules alone, not adapters.wiring's for every store: 58 MB and 1.7 s
    # to import here, against 88 MB and 3.6 s.
    from adapters.sql import SqlTradeStore, make_engine
    from config.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    # One connection: a process runs one read at a time.
    engine = make_engine(settings.trade_store_url, 1, settings.db_statement_timeout_ms, True)
    _process["trades"] = SqlTradeStore(engine)


def _in_process(fields: dict[str, Any], read: Callable[..., T], *args: Any) -> T:
    with structlog.contextvars.bound_contextvars(**fields):
        return read(_process["trades"], *args)


class ReadProcesses(ReadPool):
    """``ReadPool`` whose trade reads run in ``READ_PROCESSES`` read processes, each with its
    own trade store (its own connection); at most ``MAX_WAITING_READS`` more wait for one.
    ``read`` and its arguments cross to the process by pickling, and its result comes back
    the same way: module-level functions, plain arguments, encoded bytes. A process that
    dies fails the reads it had with 503, and the pool is started again."""

    def __init__(self, settings: Settings, trades: TradeReader) -> None:
        super().__init__(settings.read_threads, settings.max_waiting_reads, trades)
        self._count = settings.read_processes
        self._start = partial(
            ProcessPoolExecutor,
            self._count,
            mp_context=multiprocessing.get_context("spawn"),  # no copy of the loop's threads
            initializer=_start_process,
            initargs=(settings,),
        )
        self._processes: Executor = self._start()
        self._reads = _Bound(self._count + settings.max_waiting_reads)

    async def trades(self, read: Callable[..., T], *args: Any) -> T:
        """``read(trade_store, *args)`` in a read process, with this request's log fields."""
        with self._reads.admitted():
            fields = structlog.contextvars.get_contextvars()
            pool = self._processes
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    pool, partial(_in_process, fields, read, *args)
                )
            except BrokenProcessPool:
                if pool is self._processes:
                    log.error("a read process died: starting them again")
                    self._processes = self._start()
                raise Unavailable("a read process ended") from None

    async def warm(self) -> None:
        """Start every read process and its store now: spawning one takes a second or more,
        which the first requests would otherwise wait for."""
        await asyncio.gather(*(self.trades(_ready) for _ in range(self._count)))

    def close(self) -> None:
        super().close()
        self._processes.shutdown(wait=False, cancel_futures=True)


def _ready(trades: TradeReader) -> None:
    """A read that reads nothing: the process and its store are up."""


def read_pool(settings: Settings, trades: TradeReader, own_stores: bool) -> ReadPool:
    """Trade reads in read processes when the API made its own stores (a process builds the
    same from the settings) and ``READ_PROCESSES`` asks for some; else on the threads."""
    if own_stores and settings.read_processes:
        return ReadProcesses(settings, trades)
    return ReadPool(settings.read_threads, settings.max_waiting_reads, trades)


def versions_of(trades: TradeReader, trade_id: str, as_of: date) -> bytes | None:
    """Every stored version of a trade, encoded; None if there is none."""
    rows = trades.versions(trade_id, as_of)
    return trades_json(rows) if rows else None


def trades_json(rows: list[StoredTrade]) -> bytes:
    """``TradeOut``'s JSON of each row, built by orjson straight from the rows (pydantic's
    models took 7× longer; tests/unit/test_health.py holds the two equal). One trade's
    versions are encoded here; a page of the listing is encoded by the store itself, to the
    same bytes (tests/integration/test_encoded_page.py)."""
    return orjson.dumps([_trade_fields(r) for r in rows], option=orjson.OPT_UTC_Z)


def _trade_fields(stored: StoredTrade) -> dict[str, Any]:
    t = stored.trade
    return {
        "trade_id": t.trade_id,
        "version": t.version,
        "counterparty_id": t.counterparty_id,
        "book_id": t.book_id,
        "maturity_date": t.maturity_date,
        "created_date": t.created_date,
        "expired": stored.expired,
        "created_at": stored.created_at,
        "updated_at": stored.updated_at,
    }
