"""The embedded inbound log: a durable, partitioned queue in one SQLite file (the embedded
Kafka), with the table of the dead letters read from it."""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from adapters.sqlite_file import (
    READ_PRAGMAS,
    Params,
    add_column,
    connect,
    delete_in_chunks,
    write_once,
    writer_of,
)
from config.clock import utc_now
from domain.message import TradeMessage, encode
from domain.ports import Unavailable
from domain.redrive import REDRIVEN_FROM_HEADER, StoredDeadLetter

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


# How long the health probe waits for the log's write lock: a writer holding it longer
# makes every append wait, so health says so within this, not after the appends' 2 s.
PROBE_LOCK_WAIT_S = 0.2

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
    a global, strictly increasing position that readers snapshot to resume. The API appends
    through the embedded intake (``adapters.intake.SqliteIntake``), with this log's ``row``.
    """

    def __init__(self, path: Path, partitions: int) -> None:
        self.path = path
        self.partitions = partitions

    def ensure_schema(self) -> None:
        """Create or upgrade the file, and refuse a partition count it was not written with.

        The count is recorded when the file is created (a file from before the record
        adopts the current setting, once): another count would route trade_ids to other
        partitions, breaking per-trade order (raised) or stranding entries (lowered).
        """
        with writer_of(self.path) as writer:
            writer.conn.executescript(LOG_SCHEMA)
            with writer.transaction("inbound log") as conn:
                add_column(conn, "inbound_log", "accepted_at", "INTEGER")
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
        """``APPEND``'s parameters for one message (its headers with its trace context)."""
        key = message.trade.trade_id
        headers = [
            ("request_id", message.request_id),
            ("correlation_id", message.correlation_id),
            *message.trace,
        ]
        if message.redriven_from is not None:
            headers.append((REDRIVEN_FROM_HEADER, message.redriven_from))
        return (
            partition_of(key, self.partitions),
            key.encode(),
            encode(message),
            encode_headers(headers),
            int(message.accepted_at.timestamp()),
        )

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

    def ping(self) -> None:
        """Raise Unavailable unless the log takes appends (API health): its write lock, ours
        then SQLite's, is free within ``PROBE_LOCK_WAIT_S`` and its table reads. The probe
        writes nothing; it holds the lock for an empty transaction."""
        try:
            with (
                writer_of(self.path, PROBE_LOCK_WAIT_S) as writer,
                writer.transaction("inbound log") as conn,
            ):
                conn.execute("SELECT 1 FROM inbound_log LIMIT 1")
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"inbound log: {exc}") from exc


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


DEAD_LETTERS_SINCE = (
    "SELECT seq, created_at, reason, key, value, headers FROM dead_letters"
    " WHERE created_at >= ? ORDER BY seq"
)
ONE_DEAD_LETTER = (
    "SELECT seq, created_at, reason, key, value, headers FROM dead_letters WHERE seq = ?"
)
READ_CHUNK = 100


class SqliteDeadLetters:
    """The log file's dead letters, read back (``trade-store dlq``); a letter's id is its
    row's ``seq``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def letters(self, since: datetime | None = None) -> Iterator[StoredDeadLetter]:
        cutoff = "" if since is None else since.astimezone(UTC).isoformat()
        conn = connect(self.path, READ_PRAGMAS)
        try:
            rows = conn.execute(DEAD_LETTERS_SINCE, (cutoff,))
            while chunk := rows.fetchmany(READ_CHUNK):
                yield from (_stored(row) for row in chunk)
        finally:
            conn.close()

    def letter(self, letter_id: str) -> StoredDeadLetter | None:
        if not letter_id.isdecimal():
            raise ValueError(f"{letter_id!r} is not an embedded dead-letter id (a number)")
        conn = connect(self.path, READ_PRAGMAS)
        try:
            row = conn.execute(ONE_DEAD_LETTER, (int(letter_id),)).fetchone()
        finally:
            conn.close()
        return None if row is None else _stored(row)


def _stored(row: tuple[int, str, str, bytes | None, bytes | None, str]) -> StoredDeadLetter:
    seq, created_at, reason, key, value, headers = row
    return StoredDeadLetter(
        str(seq), datetime.fromisoformat(created_at), reason, key, value, decode_headers(headers)
    )


# What `trade-store status` reads of the log (cli/status.py): read-only, each query indexed
# or bounded by the last minute's entries.
def read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot create or change the file (a missing file is an error)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)


def first_accepted_after(conn: sqlite3.Connection, positions: Mapping[int, int]) -> list[int]:
    """``accepted_at`` (unix seconds) of the first entry after each partition's position."""
    found = (
        conn.execute(
            "SELECT accepted_at FROM inbound_log WHERE partition = ? AND seq > ?"
            " ORDER BY seq LIMIT 1",
            (partition, seq),
        ).fetchone()
        for partition, seq in positions.items()
    )
    return [row[0] for row in found if row is not None and row[0] is not None]


def appended_since(conn: sqlite3.Connection, since: datetime) -> int:
    """Entries accepted at or after ``since``: those after the last one accepted before it,
    found walking back from the newest (entries are appended in order of acceptance)."""
    (count,) = conn.execute(
        "SELECT count(*) FROM inbound_log WHERE seq > coalesce((SELECT seq FROM inbound_log"
        " WHERE accepted_at < ? ORDER BY seq DESC LIMIT 1), 0)",
        (int(since.timestamp()),),
    ).fetchone()
    return int(count)


def dead_letter_count(conn: sqlite3.Connection) -> int:
    (count,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
    return int(count)
