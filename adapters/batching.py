"""Turns many small writes into few batched ones without making any caller wait longer
than one round trip: a writer thread takes whatever is queued (up to ``max_batch``) and
writes it in one call, so batches grow exactly as fast as the load does."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """``submit`` returns a future settled when the batch holding the item is written."""

    def __init__(
        self,
        write: Callable[[list[T]], None],
        *,
        max_batch: int,
        writers: int = 1,
        name: str = "batcher",
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[T, Future[None]] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
            for i in range(writers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: T) -> Future[None]:
        done: Future[None] = Future()
        self._queue.put((item, done))
        return done

    def _take(self) -> list[tuple[T, Future[None]]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self._max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # leave the stop signal for the next take
                break
            batch.append(nxt)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._write([item for item, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    done.set_exception(exc)
                continue
            for _, done in batch:
                done.set_result(None)

    def close(self) -> None:
        """Write what is queued, then stop the writer threads."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
