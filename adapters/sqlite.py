"""The embedded profile's SQLite files: the request-status store and the inbound log.

Writes that acknowledge a client go through group commit: one thread owns the write
connection and commits everything waiting in one transaction, so each request is durably
committed (synchronous=FULL) without paying one fsync per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

from adapters.batching import Batcher
from config.clock import utc_now
from domain.message import TradeMessage, encode
from domain.ports import Unavailable
from domain.status import Outcome, RequestState, RequestStatus
from domain.trade import ReasonCode

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
LOCK_POLL_S = 0.001


def connect(path: Path) -> sqlite3.Connection:
    """A connection to a file of ours with our PRAGMAS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=LOCK_TIMEOUT_S, check_same_thread=False, isolation_level=None
    )
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


class Writer:
    """One thread's write access to one SQLite file.

    Every writer of the file, in any process, first takes an flock on a side file, so a
    waiting writer takes over within a millisecond of the lock being free. Left to SQLite,
    it would poll in the busy handler, sleeping 1, 2, 5, 10... ms between tries: with two
    API workers committing at once that was the tail of the acknowledgement latency (80 ms
    waits). Neither wait is longer than ``LOCK_TIMEOUT_S``.
    """

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)
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
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"{what}: write lock busy for {LOCK_TIMEOUT_S} s") from None
                time.sleep(LOCK_POLL_S)

    def write_all(self, sql: str, rows: Sequence[Params], what: str) -> None:
        """One statement over many rows in one transaction."""
        with self.transaction(what) as conn:
            conn.executemany(sql, rows)

    def close(self) -> None:
        self.conn.close()
        os.close(self._lock)


@contextmanager
def writer_of(path: Path) -> Iterator[Writer]:
    """A writer for the duration of one job, closed after it (rare writes and sweeps)."""
    writer = Writer(path)
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


def statements(sql: str, what: str) -> Callable[[Writer, list[Params]], None]:
    """A GroupCommit write that runs ``sql`` once per queued row."""
    return lambda writer, rows: writer.write_all(sql, rows, what)


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


STATUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS request_status (
    request_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    trade_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    reason_code TEXT,
    failure_reason TEXT,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS request_status_expires ON request_status (expires_at);
"""

PUT_PENDING = """
INSERT INTO request_status (request_id, status, trade_id, version, created_at, updated_at,
                            expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO NOTHING
"""

# Terminal is final: only a missing or PENDING record takes an outcome.
COMPLETE = """
INSERT INTO request_status (request_id, status, trade_id, version, created_at, updated_at,
                            reason_code, failure_reason, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO UPDATE SET
    status = excluded.status, updated_at = excluded.updated_at,
    reason_code = excluded.reason_code, failure_reason = excluded.failure_reason,
    expires_at = excluded.expires_at
WHERE request_status.status = 'PENDING'
"""

DELETE_EXPIRED = """
DELETE FROM request_status WHERE rowid IN (
    SELECT rowid FROM request_status WHERE expires_at < ? LIMIT ?)
"""


FAIL_PENDING = """
UPDATE request_status
SET status = ?, updated_at = ?, reason_code = ?, failure_reason = ?, expires_at = ?
WHERE request_id = ? AND status = 'PENDING'
"""


class SqliteStatusStore:
    """Request statuses in a SQLite file, with the same contract as the DynamoDB store."""

    def __init__(self, path: Path, ttl_days: int) -> None:
        self.path = path
        self._ttl = timedelta(days=ttl_days)
        self._local = threading.local()
        self._pending = GroupCommit(path, statements(PUT_PENDING, "status store"))

    def ensure_schema(self) -> None:
        self._conn().executescript(STATUS_SCHEMA)

    def adopt(self, old: Path) -> None:
        """Take over the statuses of a separate status file (where earlier versions kept
        them), then rename it ``*.adopted`` so it is read once."""
        if not old.exists() or old == self.path:
            return
        writer = self._writer()
        writer.conn.execute("ATTACH DATABASE ? AS old", (str(old),))
        try:
            with writer.transaction("status store") as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO request_status SELECT * FROM old.request_status"
                )
        finally:
            writer.conn.execute("DETACH DATABASE old")
        old.rename(old.with_name(old.name + ".adopted"))

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn

    def _writer(self) -> Writer:
        writer: Writer | None = getattr(self._local, "writer", None)
        if writer is None:
            writer = self._local.writer = Writer(self.path)
        return writer

    def _expires(self, moment: datetime) -> int:
        return int((moment + self._ttl).timestamp())

    def pending_row(self, status: RequestStatus) -> Params:
        at = status.created_at
        return (
            status.request_id,
            status.state.value,
            status.trade_id,
            status.version,
            at.isoformat(),
            status.updated_at.isoformat(),
            self._expires(at),
        )

    async def put_pending(self, status: RequestStatus) -> None:
        await self._pending.submit(self.pending_row(status))

    async def withdraw(self, request_id: str) -> None:
        await asyncio.to_thread(
            lambda: self._writer().write_all(
                "DELETE FROM request_status WHERE request_id = ? AND status = 'PENDING'",
                [(request_id,)],
                "status store",
            )
        )

    def complete(self, outcomes: Sequence[Outcome]) -> None:
        rows = [
            (
                s.request_id,
                s.state.value,
                s.trade_id,
                s.version,
                s.created_at.isoformat(),
                s.updated_at.isoformat(),
                s.reason_code.value if s.reason_code else None,
                s.failure_reason,
                self._expires(s.updated_at),
            )
            for s in (o.as_status() for o in outcomes)
        ]
        self._writer().write_all(COMPLETE, rows, "status store")

    def fail_pending(self, outcomes: Sequence[Outcome]) -> None:
        rows = [
            (
                o.state.value,
                o.logged_at().isoformat(),
                o.reason_code.value if o.reason_code else None,
                o.failure_reason,
                self._expires(o.logged_at()),
                o.request_id,
            )
            for o in outcomes
        ]
        self._writer().write_all(FAIL_PENDING, rows, "status store")

    def delete_expired(self, now: datetime) -> int:
        """Delete the records that expired before ``now`` (reads already treat them as
        gone; DynamoDB's TTL does the same in the services profile); return how many."""
        with writer_of(self.path) as writer:
            return delete_in_chunks(writer, DELETE_EXPIRED, (int(now.timestamp()),), "status store")

    def get(self, request_id: str) -> RequestStatus | None:
        try:
            row = (
                self._conn()
                .execute(
                    "SELECT request_id, status, trade_id, version, created_at, updated_at,"
                    " reason_code, failure_reason FROM request_status"
                    " WHERE request_id = ? AND expires_at >= ?",
                    (request_id, int(utc_now().timestamp())),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise Unavailable(f"status store: {exc}") from exc
        if row is None:
            return None
        return RequestStatus(
            request_id=row[0],
            state=RequestState(row[1]),
            trade_id=row[2],
            version=row[3],
            created_at=datetime.fromisoformat(row[4]),
            updated_at=datetime.fromisoformat(row[5]),
            reason_code=ReasonCode(row[6]) if row[6] else None,
            failure_reason=row[7],
        )

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1 FROM request_status LIMIT 1")
        except sqlite3.Error as exc:
            raise Unavailable(f"status store: {exc}") from exc

    def close(self) -> None:
        self._pending.close()


# accepted_at (unix seconds) dates an entry for retention; files from before it had the
# column get it added, NULL in their old rows (see SqliteInboundLog.delete_read).
LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbound_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partition INTEGER NOT NULL,
    key BLOB,
    value BLOB,
    headers TEXT NOT NULL,
    accepted_at INTEGER
);
CREATE INDEX IF NOT EXISTS inbound_log_partition_seq ON inbound_log (partition, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    reason TEXT NOT NULL,
    key BLOB,
    value BLOB,
    headers TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS log_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

APPEND = (
    "INSERT INTO inbound_log (partition, key, value, headers, accepted_at) VALUES (?, ?, ?, ?, ?)"
)
DEAD_LETTER = (
    "INSERT INTO dead_letters (reason, key, value, headers, created_at) VALUES (?, ?, ?, ?, ?)"
)
# Entries are appended in order of acceptance (to within a group commit), so the first
# entry accepted at or after the cut-off bounds everything older.
FIRST_ACCEPTED_SINCE = "SELECT seq FROM inbound_log WHERE accepted_at >= ? ORDER BY seq LIMIT 1"
DELETE_READ = """
DELETE FROM inbound_log WHERE seq IN (
    SELECT seq FROM inbound_log WHERE partition = ? AND seq <= ? ORDER BY seq LIMIT ?)
"""
DELETE_DEAD_LETTERS = """
DELETE FROM dead_letters WHERE seq IN (
    SELECT seq FROM dead_letters WHERE created_at < ? ORDER BY seq LIMIT ?)
"""


class PartitionCountMismatch(ValueError):
    """The log file was written with another partition count than the setting asks for."""


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and restarts (unlike hash()), so a trade keeps its partition."""
    return zlib.crc32(key.encode()) % partitions


def encode_headers(headers: Iterable[tuple[str, bytes | str | None]]) -> str:
    return json.dumps(
        [[k, v.decode() if isinstance(v, bytes) else v] for k, v in headers], separators=(",", ":")
    )


def decode_headers(raw: str) -> list[tuple[str, bytes]]:
    return [(k, (v or "").encode()) for k, v in json.loads(raw)]


LOG_TOPIC = "inbound_log"
"""The topic a log entry names (as a dead letter's source): the log's table."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One entry of the inbound log, shaped like a Kafka message for the dataflow.

    Its position reads as Kafka's: topic ``inbound_log``, its partition, offset = ``seq``.
    """

    seq: int
    partition: int
    key: bytes | None
    value: bytes | None
    raw_headers: str = "[]"

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        """Decoded on demand: the dataflow reads them only for an undecodable value."""
        return decode_headers(self.raw_headers)

    @property
    def topic(self) -> str:
        return LOG_TOPIC

    @property
    def offset(self) -> int:
        return self.seq


class SqliteInboundLog:
    """A durable, partitioned, append-only log in one SQLite file: the embedded Kafka.

    Partition = crc32(trade_id) mod N, so one trade's messages keep their order; ``seq`` is
    a global, strictly increasing position that readers snapshot to resume.
    """

    def __init__(self, path: Path, partitions: int) -> None:
        self.path = path
        self.partitions = partitions
        self._appender: GroupCommit[Params] | None = None

    def ensure_schema(self) -> None:
        """Create or upgrade the file, and refuse a partition count it was not written with.

        The count is recorded when the file is created (a file from before the record
        adopts the current setting, once): another count would route trade_ids to other
        partitions, breaking per-trade order (raised) or stranding entries (lowered).
        """
        with writer_of(self.path) as writer:
            writer.conn.executescript(LOG_SCHEMA)
            with writer.transaction("inbound log") as conn:
                columns = {row[1] for row in conn.execute("PRAGMA table_info(inbound_log)")}
                if "accepted_at" not in columns:
                    conn.execute("ALTER TABLE inbound_log ADD COLUMN accepted_at INTEGER")
                conn.execute(
                    "INSERT OR IGNORE INTO log_meta (name, value) VALUES ('partitions', ?)",
                    (self.partitions,),
                )
                (recorded,) = conn.execute(
                    "SELECT value FROM log_meta WHERE name = 'partitions'"
                ).fetchone()
        if recorded != self.partitions:
            raise PartitionCountMismatch(
                f"{self.path} was created with {recorded} partitions but"
                f" TRADE_STORE_INBOUND_PARTITIONS is {self.partitions}: set"
                f" TRADE_STORE_INBOUND_PARTITIONS={recorded}, or, to change the count, let"
                " the processor drain this log and start on a new data folder"
                " (another count would re-route trade_ids: out of order, or never read)"
            )

    def row(self, message: TradeMessage) -> Params:
        key = message.trade.trade_id
        headers = [("request_id", message.request_id), ("correlation_id", message.correlation_id)]
        return (
            partition_of(key, self.partitions),
            key.encode(),
            encode(message),
            encode_headers(headers),
            int(message.accepted_at.timestamp()),
        )

    async def append(self, message: TradeMessage) -> None:
        """Append one message; returns once its group commit is durable."""
        if self._appender is None:
            self._appender = GroupCommit(self.path, statements(APPEND, "inbound log"))
        await self._appender.submit(self.row(message))

    def append_many(self, messages: Iterable[TradeMessage]) -> int:
        """Bulk load in one transaction (backfills, benchmarks); returns the count."""
        rows = [self.row(m) for m in messages]
        write_once(self.path, APPEND, rows, "inbound log")
        return len(rows)

    def delete_read(self, positions: Mapping[int, int], accepted_before: datetime) -> int:
        """Delete the entries no reader will read again and accepted before
        ``accepted_before``; return how many.

        ``positions`` holds, per partition, the seq its reader resumes after at the earliest
        (what the recovery snapshots record); a partition without one keeps everything.
        Entries from before ``accepted_at`` was recorded (NULL) count as old enough.
        """
        with writer_of(self.path) as writer:
            young = writer.conn.execute(
                FIRST_ACCEPTED_SINCE, (int(accepted_before.timestamp()),)
            ).fetchone()
            total = 0
            for partition, seq in sorted(positions.items()):
                upto = seq if young is None else min(seq, young[0] - 1)
                total += delete_in_chunks(writer, DELETE_READ, (partition, upto), "inbound log")
            return total

    def close(self) -> None:
        if self._appender is not None:
            self._appender.close()


def read_partition(
    conn: sqlite3.Connection, partition: int, after_seq: int, limit: int
) -> list[LogRecord]:
    """The next records of one partition after ``after_seq``, in order."""
    rows = conn.execute(
        "SELECT seq, partition, key, value, headers FROM inbound_log"
        " WHERE partition = ? AND seq > ? ORDER BY seq LIMIT ?",
        (partition, after_seq, limit),
    ).fetchall()
    return [LogRecord(*row) for row in rows]


def write_dead_letters(
    path: Path, letters: Sequence[tuple[str, bytes | None, bytes | None, str]]
) -> None:
    """Store (reason, key, value, headers-json) rows in the log file's dead_letters table."""
    now = utc_now().isoformat()
    write_once(path, DEAD_LETTER, [(*letter, now) for letter in letters], "dead letters")


def delete_dead_letters(path: Path, created_before: datetime) -> int:
    """Delete the dead letters stored before ``created_before``; return how many."""
    before = created_before.astimezone(UTC).isoformat()
    with writer_of(path) as writer:
        return delete_in_chunks(writer, DELETE_DEAD_LETTERS, (before,), "dead letters")


class SqliteTradeQueue:
    """The embedded queue: publish returns once the message is committed to the log."""

    def __init__(self, log: SqliteInboundLog) -> None:
        self._log = log

    async def publish(self, message: TradeMessage) -> None:
        await self._log.append(message)

    def ping(self) -> None:
        try:
            conn = connect(self._log.path)
            conn.execute("SELECT 1 FROM inbound_log LIMIT 1")
            conn.close()
        except sqlite3.Error as exc:
            raise Unavailable(f"inbound log: {exc}") from exc

    def close(self) -> None:
        self._log.close()


class SqliteIntake:
    """The embedded intake: the PENDING record and the log entry in one transaction.

    The status table lives in the log's own file, so one group commit (one fsync) makes
    both durable, and a failure leaves neither: nothing to withdraw.
    """

    def __init__(self, log: SqliteInboundLog, statuses: SqliteStatusStore) -> None:
        if statuses.path != log.path:
            raise ValueError("the embedded status table must live in the inbound log's file")
        self._log = log
        self._statuses = statuses
        self._commit: GroupCommit[tuple[Params, Params]] = GroupCommit(log.path, self._write)

    @staticmethod
    def _write(writer: Writer, accepted: list[tuple[Params, Params]]) -> None:
        with writer.transaction("inbound log") as conn:
            conn.executemany(PUT_PENDING, [pending for pending, _ in accepted])
            conn.executemany(APPEND, [entry for _, entry in accepted])

    async def accept(self, pending: RequestStatus, message: TradeMessage) -> None:
        await self._commit.submit((self._statuses.pending_row(pending), self._log.row(message)))

    def close(self) -> None:
        self._commit.close()
