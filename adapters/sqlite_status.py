"""The embedded profile's status store: request statuses in the inbound log's SQLite file.

PENDING records and batch records are not written here: the embedded intake
(``adapters.intake.SqliteIntake``) commits each one with its log entries, with this module's
``PUT_PENDING`` and ``SqliteStatusStore.pending_row`` (``PUT_BATCH`` and ``batch_row``). The
processor writes outcomes; the API reads.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from adapters.sqlite_file import Params, Readers, Writer, add_column, delete_in_chunks, writer_of
from config.clock import utc_now
from domain.ports import Unavailable
from domain.status import Batch, BatchProgress, Outcome, ReasonCode, RequestState, RequestStatus

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
    expires_at INTEGER NOT NULL,
    client_id TEXT,
    batch_id TEXT,
    batch_index INTEGER
);
CREATE INDEX IF NOT EXISTS request_status_expires ON request_status (expires_at);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    client_id TEXT,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_expires ON batches (expires_at);
"""
# After the columns it names exist (older files gain them in ensure_schema); partial, like
# DynamoDB's sparse index: a single POST's record is not in it.
BATCH_INDEX = """
CREATE INDEX IF NOT EXISTS request_status_batch ON request_status (batch_id, batch_index)
WHERE batch_id IS NOT NULL
"""

PUT_PENDING = """
INSERT INTO request_status (request_id, status, trade_id, version, created_at, updated_at,
                            expires_at, client_id, batch_id, batch_index)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO NOTHING
"""

# A stream's record is written with each chunk, its accepted count growing.
PUT_BATCH = """
INSERT INTO batches (batch_id, created_at, accepted, client_id, expires_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (batch_id) DO UPDATE SET accepted = excluded.accepted
"""

# Terminal is final: only a missing or PENDING record takes an outcome (keeping its client_id,
# batch_id and batch_index).
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

# The columns of the separate status files of earlier versions, which had no client_id.
ADOPTED = (
    "request_id, status, trade_id, version, created_at, updated_at, reason_code,"
    " failure_reason, expires_at"
)

DELETE_EXPIRED = """
DELETE FROM request_status WHERE rowid IN (
    SELECT rowid FROM request_status WHERE expires_at < ? LIMIT ?)
"""
DELETE_EXPIRED_BATCHES = """
DELETE FROM batches WHERE rowid IN (SELECT rowid FROM batches WHERE expires_at < ? LIMIT ?)
"""

COLUMNS = (
    "request_id, status, trade_id, version, created_at, updated_at, reason_code,"
    " failure_reason, client_id, batch_id, batch_index"
)


FAIL_PENDING = """
UPDATE request_status
SET status = ?, updated_at = ?, reason_code = ?, failure_reason = ?, expires_at = ?
WHERE request_id = ? AND status = 'PENDING'
"""


class SqliteStatusStore:
    """Request statuses in a SQLite file, under the status contract (``domain.ports``) for
    what the processor and the API's reads need of it; PENDING records come from the intake.

    Reads share at most ``readers`` connections (the API's read threads and its health
    probe); the processor's writers keep one per thread.
    """

    def __init__(self, path: Path, ttl_days: int, readers: int = 2) -> None:
        self.path = path
        self._ttl = timedelta(days=ttl_days)
        self._local = threading.local()
        self._readers = Readers(path, readers)

    def ensure_schema(self) -> None:
        with writer_of(self.path) as writer:
            writer.conn.executescript(STATUS_SCHEMA)
            with writer.transaction("status store") as conn:  # files from before auth, batches
                add_column(conn, "request_status", "client_id", "TEXT")
                add_column(conn, "request_status", "batch_id", "TEXT")
                add_column(conn, "request_status", "batch_index", "INTEGER")
                conn.execute(BATCH_INDEX)

    def adopt(self, old: Path) -> None:
        """Take over the statuses of a separate status file (where earlier versions kept
        them), then rename it ``*.adopted`` so it is read once."""
        if not old.exists() or old == self.path:
            return
        with writer_of(self.path) as writer:
            writer.conn.execute("ATTACH DATABASE ? AS old", (str(old),))
            try:
                with writer.transaction("status store") as conn:
                    conn.execute(
                        f"INSERT OR IGNORE INTO request_status ({ADOPTED})"  # noqa: S608
                        f" SELECT {ADOPTED} FROM old.request_status"
                    )
            finally:
                writer.conn.execute("DETACH DATABASE old")
        old.rename(old.with_name(old.name + ".adopted"))

    def _writer(self) -> Writer:
        writer: Writer | None = getattr(self._local, "writer", None)
        if writer is None:
            writer = self._local.writer = Writer(self.path)
        return writer

    def _expires(self, moment: datetime) -> int:
        return int((moment + self._ttl).timestamp())

    def pending_row(self, status: RequestStatus) -> Params:
        """``PUT_PENDING``'s parameters for a new request (the embedded intake writes them)."""
        at = status.created_at
        return (
            status.request_id,
            status.state.value,
            status.trade_id,
            status.version,
            at.isoformat(),
            status.updated_at.isoformat(),
            self._expires(at),
            status.client_id,
            status.batch_id,
            status.batch_index,
        )

    def batch_row(self, batch: Batch) -> Params:
        """``PUT_BATCH``'s parameters for a batch record (the embedded intake writes them);
        it expires with a status written when the batch was."""
        return (
            batch.batch_id,
            batch.created_at.isoformat(),
            batch.accepted,
            batch.client_id,
            self._expires(batch.created_at),
        )

    def write_outcomes(self, outcomes: Sequence[Outcome]) -> None:
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
        gone; DynamoDB's TTL does the same in the services profile), batch records too;
        return how many statuses went."""
        expired = (int(now.timestamp()),)
        with writer_of(self.path) as writer:
            delete_in_chunks(writer, DELETE_EXPIRED_BATCHES, expired, "status store")
            return delete_in_chunks(writer, DELETE_EXPIRED, expired, "status store")

    @contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Connection, int]]:
        """A read connection, in one read transaction (one snapshot of the file), and the
        moment before which records count as expired; a SQLite error is Unavailable."""
        try:
            with self._readers.connection("status store") as conn:
                conn.execute("BEGIN")
                try:
                    yield conn, int(utc_now().timestamp())
                finally:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise Unavailable(f"status store: {exc}") from exc

    def get(self, request_id: str) -> RequestStatus | None:
        found = self.get_many([request_id])
        return found.get(request_id)

    def get_many(self, request_ids: Sequence[str]) -> dict[str, RequestStatus]:
        wanted = list(dict.fromkeys(request_ids))
        marks = ", ".join("?" * len(wanted))
        with self._read() as (conn, now):
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM request_status"  # noqa: S608 (only placeholders)
                f" WHERE request_id IN ({marks}) AND expires_at >= ?",
                (*wanted, now),
            ).fetchall()
        return {row[0]: _status(row) for row in rows}

    def batch_record(self, batch_id: str) -> Batch | None:
        with self._read() as (conn, now):
            return _batch(conn, batch_id, now)

    def batch(self, batch_id: str) -> BatchProgress | None:
        with self._read() as (conn, now):
            header = _batch(conn, batch_id, now)
            if header is None:
                return None
            counts = dict(
                conn.execute(
                    "SELECT status, count(*) FROM request_status"
                    " WHERE batch_id = ? AND expires_at >= ? GROUP BY status",
                    (batch_id, now),
                ).fetchall()
            )
        return BatchProgress(
            batch=header,
            pending=counts.get(RequestState.PENDING.value, 0),
            success=counts.get(RequestState.SUCCESS.value, 0),
            failed=counts.get(RequestState.FAILED.value, 0),
        )

    def batch_items(
        self, batch_id: str, state: RequestState | None, after: int | None, limit: int
    ) -> list[RequestStatus]:
        in_state = "" if state is None else " AND status = ?"
        with self._read() as (conn, now):
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM request_status"  # noqa: S608 (only placeholders)
                f" WHERE batch_id = ? AND batch_index > ?{in_state} AND expires_at >= ?"
                " ORDER BY batch_index LIMIT ?",
                (
                    batch_id,
                    -1 if after is None else after,
                    *(() if state is None else (state.value,)),
                    now,
                    limit,
                ),
            ).fetchall()
        return [_status(row) for row in rows]

    def ping(self) -> None:
        try:
            with self._readers.connection("status store") as conn:
                conn.execute("SELECT 1 FROM request_status LIMIT 1")
        except sqlite3.Error as exc:
            raise Unavailable(f"status store: {exc}") from exc


def _status(row: Params) -> RequestStatus:
    """A ``COLUMNS`` row as a status."""
    return RequestStatus(
        request_id=row[0],
        state=RequestState(row[1]),
        trade_id=row[2],
        version=row[3],
        created_at=datetime.fromisoformat(row[4]),
        updated_at=datetime.fromisoformat(row[5]),
        reason_code=ReasonCode(row[6]) if row[6] else None,
        failure_reason=row[7],
        client_id=row[8],
        batch_id=row[9],
        batch_index=row[10],
    )


def _batch(conn: sqlite3.Connection, batch_id: str, now: int) -> Batch | None:
    row = conn.execute(
        "SELECT created_at, accepted, client_id FROM batches"
        " WHERE batch_id = ? AND expires_at >= ?",
        (batch_id, now),
    ).fetchone()
    if row is None:
        return None
    return Batch(batch_id, datetime.fromisoformat(row[0]), row[1], row[2])
