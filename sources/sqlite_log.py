"""The embedded inbound log as a Bytewax source: one partition per log partition.

The snapshot is the last ``seq`` read, so a restart resumes right after it and replays only
what followed the last recovery snapshot (at-least-once, per-partition order kept).
"""

from __future__ import annotations

import pickle
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from adapters.inbound_log import LogRecord, read_partition
from adapters.sqlite_file import connect


class _LogPartition(StatefulSourcePartition[LogRecord, int]):
    def __init__(
        self, path: Path, partition: int, after_seq: int, batch_size: int, idle: timedelta
    ) -> None:
        self._conn = connect(path)
        self._partition = partition
        self._after = after_seq
        self._batch_size = batch_size
        self._idle = idle
        self._awake: datetime | None = None

    def next_batch(self) -> list[LogRecord]:
        batch = read_partition(self._conn, self._partition, self._after, self._batch_size)
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
    """Reads the embedded inbound log (see adapters.inbound_log.SqliteInboundLog)."""

    def __init__(
        self,
        path: Path,
        partitions: int,
        batch_size: int = 1000,
        idle: timedelta = timedelta(milliseconds=5),
    ) -> None:
        self._path = path
        self._partitions = partitions
        self._batch_size = batch_size
        self._idle = idle

    def list_parts(self) -> list[str]:
        return [str(p) for p in range(self._partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _LogPartition:
        return _LogPartition(
            self._path, int(for_part), resume_state or 0, self._batch_size, self._idle
        )


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
