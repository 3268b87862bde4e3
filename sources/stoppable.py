"""A source that ends when asked: how the processor stops cleanly on a signal.

Once the event is set, every partition of the wrapped source ends at its next read, on
whichever worker thread of this process reads it. Bytewax snapshots a partition where it
ends and closes its epoch, so once every input has ended the dataflow completes as a
bounded one does: every item read is decided and written, the last snapshot is kept and
the run returns. A restart resumes from those snapshots.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Generic

from bytewax.inputs import FixedPartitionedSource, S, StatefulSourcePartition, X


class _StoppablePartition(StatefulSourcePartition[X, S], Generic[X, S]):
    def __init__(self, part: StatefulSourcePartition[X, S], stop: threading.Event) -> None:
        self._part = part
        self._stop = stop

    def next_batch(self) -> Iterable[X]:
        if self._stop.is_set():
            raise StopIteration
        return self._part.next_batch()

    def next_awake(self) -> datetime | None:
        return self._part.next_awake()

    def snapshot(self) -> S:
        return self._part.snapshot()

    def close(self) -> None:
        self._part.close()


class Stoppable(FixedPartitionedSource[X, S], Generic[X, S]):
    """``source``, whose partitions all end once ``stop`` is set."""

    def __init__(self, source: FixedPartitionedSource[X, S], stop: threading.Event) -> None:
        self._source = source
        self._stop = stop

    def list_parts(self) -> list[str]:
        return self._source.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: S | None
    ) -> _StoppablePartition[X, S]:
        part = self._source.build_part(step_id, for_part, resume_state)
        return _StoppablePartition(part, self._stop)
