"""The plumbing every SQLite file of ours shares: connections, writers, group commit.

Writes that acknowledge a client go through group commit: one thread owns the write
connection and commits everything waiting in one transaction, so each request is durably
committed (synchronous=FULL) without paying one fsync per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from adapters.batching import Batcher
from domain.ports import Unavailable

Params = tuple[Any, ...]
T = TypeVar("T")


# How long a writer waits for the file's write lock (our flock, then SQLite's own) before
# its transaction fails as Unavailable: well inside the API's produce timeout (default 5 s),
# so a batch the API waits on fails before its callers give up on it.
LOCK_TIMEOUT_S = 2.0
# Every connection of ours: WAL (readers never block the writer), an fsync per commit, and a
# 64 MiB page cache (the default 2 MiB sends B-tree inserts into a growing file to pread()).
PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    f"PRAGMA busy_timeout={int(LOCK_TIMEOUT_S * 1000)}",
    "PRAGMA cache_size=-65536",
)
# The API's read connections: a reader needs no large cache (the OS's page cache holds the
# file), so each takes SQLite's default 2 MiB, and query_only makes sure it never writes.
READ_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    f"PRAGMA busy_timeout={int(LOCK_TIMEOUT_S * 1000)}",
    "PRAGMA cache_size=-2048",
    "PRAGMA query_only=1",
)
LOCK_POLL_S = 0.001


def connect(path: Path, pragmas: Sequence[str] = PRAGMAS) -> sqlite3.Connection:
    """A connection to a file of ours with our PRAGMAS (or the readers')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=LOCK_TIMEOUT_S, check_same_thread=False, isolation_level=None
    )
    for pragma in pragmas:
        conn.execute(pragma)
    return conn


class Readers:
    """At most ``size`` read connections to one file, lent to whichever thread reads.

    One connection per thread would grow with every thread that ever read (21–24 seen in
    an API worker); these stay as many as the API reads at once at most.
    """

    def __init__(self, path: Path, size: int) -> None:
        self._path = path
        self._size = size
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[sqlite3.Connection] = []

    @contextmanager
    def connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """A connection for one read; Unavailable if none is free within ``LOCK_TIMEOUT_S``."""
        if not self._slots.acquire(timeout=LOCK_TIMEOUT_S):
            raise Unavailable(f"{what}: all {self._size} read connections busy")
        try:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = connect(self._path, READ_PRAGMAS)
            try:
                yield conn
            finally:
                self._idle.append(conn)
        finally:
            self._slots.release()


class Writer:
    """One thread's write access to one SQLite file.

    Every writer of the file, in any process, first takes an flock on a side file, so a
    waiting writer takes over within a millisecond of the lock being free. Left to SQLite,
    it would poll in the busy handler, sleeping 1, 2, 5, 10... ms between tries: with two
    API workers committing at once that was the tail of the acknowledgement latency (80 ms
    waits). Neither wait is longer than ``timeout_s`` (``LOCK_TIMEOUT_S`` unless a caller,
    such as the health probe, wants to know sooner).
    """

    def __init__(self, path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.conn = connect(path)
        self.conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self._timeout_s = timeout_s
        self._lock = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)

    @contextmanager
    def transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One immediate transaction; a SQLite error rolls it back and becomes Unavailable."""
        self._take_lock(what)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            yield self.conn
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise Unavailable(f"{what}: {exc}") from exc
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _take_lock(self, what: str) -> None:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"{what}: write lock busy for {self._timeout_s} s") from None
                time.sleep(LOCK_POLL_S)

    def write_all(self, sql: str, rows: Sequence[Params], what: str) -> None:
        """One statement over many rows in one transaction."""
        with self.transaction(what) as conn:
            conn.executemany(sql, rows)

    def close(self) -> None:
        self.conn.close()
        os.close(self._lock)


@contextmanager
def writer_of(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[Writer]:
    """A writer for the duration of one job, closed after it (rare writes, sweeps, probes)."""
    writer = Writer(path, timeout_s)
    try:
        yield writer
    finally:
        writer.close()


def write_once(path: Path, sql: str, rows: Sequence[Params], what: str) -> None:
    """Open, write in one transaction, close (bulk loads and rare writes)."""
    with writer_of(path) as writer:
        writer.write_all(sql, rows, what)


class GroupCommit(Generic[T]):
    """Group commit: awaiting callers share one transaction per batch on one writer thread.

    ``write(writer, items)`` runs on that thread and commits the whole batch at once.
    """

    def __init__(
        self,
        path: Path,
        write: Callable[[Writer, list[T]], None],
        max_batch: int = 1000,
    ) -> None:
        self._path = path
        self._write = write
        self._writer: Writer | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"commit-{path.stem}")
        self._batcher: Batcher[T] = Batcher(self._commit, max_batch=max_batch)

    async def _commit(self, items: list[T]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._on_thread, items)

    def _on_thread(self, items: list[T]) -> None:
        if self._writer is None:  # only ever touched by the single writer thread
            self._writer = Writer(self._path)
        self._write(self._writer, items)

    async def submit(self, item: T) -> None:
        await self._batcher.submit(item)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        if self._writer is not None:
            self._writer.close()


# Retention deletes run a chunk per transaction, so the API's group commits and the sink
# never wait long behind the sweep for the file's one write lock.
DELETE_CHUNK = 5000


def delete_in_chunks(writer: Writer, sql: str, params: Params, what: str) -> int:
    """Run a ``DELETE ... IN (SELECT ... LIMIT ?)`` until a chunk comes back short; return
    how many rows went. ``sql``'s last parameter is the chunk size."""
    total = 0
    while True:
        with writer.transaction(what) as conn:
            count = conn.execute(sql, (*params, DELETE_CHUNK)).rowcount
        total += count
        if count < DELETE_CHUNK:
            return total


def add_column(conn: sqlite3.Connection, table: str, column: str, declaration: str) -> None:
    """Add ``column`` to a file written before it existed (inside the caller's transaction,
    under the write lock, so two processes starting at once do not both add it)."""
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    if column not in columns:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
