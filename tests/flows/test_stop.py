"""The processor's clean stop, on the dataflow: once the input ends, the flow completes
with every partition snapshotted where it stood, and a restart reads on from there."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import cluster_main, run_main

from domain.message import decode
from sources.stoppable import Stoppable
from tests.flows.conftest import Pipeline, Record, record


class Queue(FixedPartitionedSource[Record, int]):
    """Partitions of records that may grow, read one a batch from where a snapshot
    resumes; ``caught_up`` is set once all queued has been handed out (the signal)."""

    def __init__(self, parts: dict[str, list[Record]]) -> None:
        self.parts = parts
        self.read: list[str] = []  # the request ids handed out, over every run
        self.caught_up = threading.Event()

    def list_parts(self) -> list[str]:
        return list(self.parts)

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Part:
        return _Part(self, self.parts[for_part], resume_state or 0)


class _Part(StatefulSourcePartition[Record, int]):
    def __init__(self, queue: Queue, items: list[Record], start: int) -> None:
        self._queue = queue
        self._items = items
        self._next = start

    def next_batch(self) -> list[Record]:
        if self._next == len(self._items):
            if len(self._queue.read) >= sum(len(p) for p in self._queue.parts.values()):
                self._queue.caught_up.set()
            return []
        item = self._items[self._next]
        self._next += 1
        self._queue.read.append(decode(item.value or b"").request_id)
        return [item]

    def snapshot(self) -> int:
        return self._next


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stopped_flow_resumes_where_it_stopped(
    pipeline: Pipeline, tmp_path: Path, workers: int
) -> None:
    """Snapshots an hour apart: only the one taken as the input ended can hold where
    each partition stood. With two workers the stop ends the partitions of both."""
    init_db_dir(tmp_path, 2)
    parts = {"0": [record("r1", "T1", 1), record("r2", "T1", 2)], "1": [record("r3", "T2", 1)]}
    queue = Queue(parts)
    flow = pipeline.flow_of(Stoppable(queue, queue.caught_up))
    config = RecoveryConfig(tmp_path)

    def run() -> None:
        if workers == 1:
            run_main(flow, epoch_interval=timedelta(hours=1), recovery_config=config)
        else:
            cluster_main(
                flow,
                [],
                0,
                epoch_interval=timedelta(hours=1),
                recovery_config=config,
                worker_count_per_proc=workers,
            )

    run()
    assert sorted(queue.read) == ["r1", "r2", "r3"]
    parts["0"].append(record("r4", "T1", 1))
    parts["1"].append(record("r5", "T2", 2))
    queue.caught_up.clear()
    run()
    assert sorted(queue.read) == ["r1", "r2", "r3", "r4", "r5"]  # none read twice
    assert {rid: s.state.value for rid, s in pipeline.statuses.items.items()} == {
        "r1": "SUCCESS",
        "r2": "SUCCESS",
        "r3": "SUCCESS",
        "r4": "FAILED",
        "r5": "SUCCESS",
    }
    assert sorted(pipeline.trades.rows) == [("T1", 1), ("T1", 2), ("T2", 1), ("T2", 2)]
