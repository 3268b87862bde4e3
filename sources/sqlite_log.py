"""The embedded inbound log as a Bytewax source: one partition per log partition.

The snapshot is the last ``seq`` read, so a restart resumes right after it and replays only
what followed the last recovery snapshot (at-least-once, per-partition order kept).

A replay (``cli/replay.py``) reads the log bounded: each partition from a first ``seq`` to
an end pinned when the replay was planned (``LogExtent``), then it stops.
"""

from __future__ import annotations

import pickle
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from adapters.inbound_log import LogRecord, read_partition
from adapters.sqlite_file import connect


class _LogPartition(StatefulSourcePartition[LogRecord, int]):
    def __init__(
        self,
        path: Path,
        partition: int,
        after_seq: int,
        batch_size: int,
        idle: timedelta,
        end: int | None = None,
    ) -> None:
        self._conn = connect(path)
        self._partition = partition
        self._after = after_seq
        self._batch_size = batch_size
        self._idle = idle
        self._end = end
        self._awake: datetime | None = None

    def next_batch(self) -> list[LogRecord]:
        if self._end is not None and self._after >= self._end - 1:
            raise StopIteration
        batch = read_partition(self._conn, self._partition, self._after, self._batch_size)
        if self._end is not None:
            batch = [r for r in batch if r.seq < self._end]
            if not batch:  # every entry below the end existed when it was pinned: all read
                raise StopIteration
        if batch:
            self._after = batch[-1].seq
            self._awake = None
        else:
            # Nothing new: poll again shortly instead of spinning.
            self._awake = datetime.now(UTC) + self._idle
        return batch

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        return self._after

    def close(self) -> None:
        self._conn.close()


class SqliteLogSource(FixedPartitionedSource[LogRecord, int]):
    """Reads the embedded inbound log (see adapters.inbound_log.SqliteInboundLog) and tails
    it; with ``bounds`` (partition → first seq to read, first seq not read), only those
    partitions, from and to there, and then it ends."""

    def __init__(
        self,
        path: Path,
        partitions: int,
        batch_size: int = 1000,
        idle: timedelta = timedelta(milliseconds=5),
        bounds: Mapping[int, tuple[int, int]] | None = None,
    ) -> None:
        self._path = path
        self._partitions = partitions
        self._batch_size = batch_size
        self._idle = idle
        self._bounds = bounds

    def list_parts(self) -> list[str]:
        parts = range(self._partitions) if self._bounds is None else sorted(self._bounds)
        return [str(p) for p in parts]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _LogPartition:
        partition = int(for_part)
        if self._bounds is None:
            after, end = resume_state or 0, None
        else:
            start, end = self._bounds[partition]
            after = start - 1 if resume_state is None else resume_state
        return _LogPartition(self._path, partition, after, self._batch_size, self._idle, end)


class LogExtent:
    """Where the embedded inbound log stands, read-only, for planning a bounded read.

    Positions are ``seq``s, one sequence over every partition, so a partition's count is
    counted, not subtracted. Times are ``accepted_at``, to the second.
    """

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(f"no inbound log at {path}")
        self.path = path
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

    def partitions(self) -> int:
        """The partition count the log was created with (what its writers route by)."""
        (count,) = self._conn.execute(
            "SELECT value FROM log_meta WHERE name = 'partitions'"
        ).fetchone()
        return int(count)

    def watermarks(self) -> dict[int, tuple[int, int]]:
        """Per partition, (first seq held, last seq held + 1); (0, 0) when it holds none."""
        held = {
            p: (low, high + 1)
            for p, low, high in self._conn.execute(
                "SELECT partition, min(seq), max(seq) FROM inbound_log GROUP BY partition"
            )
        }
        return {p: held.get(p, (0, 0)) for p in range(self.partitions())}

    def positions_at(self, when: datetime) -> dict[int, int]:
        """Per partition, the first seq accepted at or after ``when`` (partitions with none
        are absent). Entries are appended in order of acceptance, so it bounds what follows."""
        rows = self._conn.execute(
            "SELECT partition, min(seq) FROM inbound_log WHERE accepted_at >= ? GROUP BY partition",
            (int(when.timestamp()),),
        )
        return dict(rows.fetchall())

    def count(self, partition: int, start: int, end: int) -> int:
        """Entries of ``partition`` from seq ``start`` up to (not including) ``end``."""
        (n,) = self._conn.execute(
            "SELECT count(*) FROM inbound_log WHERE partition = ? AND seq >= ? AND seq < ?",
            (partition, start, end),
        ).fetchone()
        return int(n)

    def close(self) -> None:
        self._conn.close()


def resume_positions(recovery_dir: Path, step_id: str) -> dict[int, int]:
    """The earliest seq each log partition of step ``step_id`` can still resume after.

    Read from Bytewax's recovery partitions (SQLite files whose ``snaps`` table holds each
    state key's pickled snapshot per epoch): per partition, its oldest snapshot kept.
    Bytewax deletes only snapshots no resume can need, and a partition's seq only grows,
    so no restart reads an entry at or below it again. Partitions without a snapshot are
    left out.
    """
    positions: dict[int, int] = {}
    for part in sorted(recovery_dir.glob("part-*.sqlite3")):
        conn = sqlite3.connect(part, timeout=10)
        try:
            rows = conn.execute(
                "SELECT state_key, ser_change FROM snaps AS s WHERE step_id = ? AND snap_epoch ="
                " (SELECT min(snap_epoch) FROM snaps"
                "  WHERE step_id = s.step_id AND state_key = s.state_key)",
                (step_id,),
            ).fetchall()
        finally:
            conn.close()
        for key, change in rows:
            # Our own recovery files, written by Bytewax with pickle.
            seq = pickle.loads(change) if change is not None else None  # noqa: S301
            if isinstance(seq, int):
                positions[int(key)] = min(seq, positions.get(int(key), seq))
    return positions
