"""Turns many small awaited writes into few batched ones: items submitted on the event loop
wait on asyncio futures; once per loop iteration whatever is queued is written as one
batch, so batches grow exactly as fast as the load does and an idle system adds no delay."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Pending = list[tuple[T, "asyncio.Future[None]"]]


def resolve(done: asyncio.Future[None], error: BaseException | None) -> None:
    """Settle a caller's future, unless the caller was cancelled meanwhile."""
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


class Batcher(Generic[T]):
    """``await submit(item)`` returns once the batch holding ``item`` is written.

    At most ``writers`` batches are written at a time (1 for a single-writer store such as
    SQLite, and to let batches fill while one is in flight); a failed write fails every
    item of its batch. A caller that gives up (is cancelled) while its item still waits
    takes the item out of the queue, so it is never written later. Items whose callers
    gave up while their batch was being written (or as it ended), and every item of a
    batch whose write failed, go to ``abandoned`` once that write ends (written or maybe
    written: the store may have applied it before the reply was lost), to be undone.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Coroutine[Any, Any, None]],
        *,
        max_batch: int,
        writers: int = 1,
        abandoned: Callable[[list[T]], None] | None = None,
    ) -> None:
        self._write = write
        self._max_batch = max_batch
        self._writers = writers
        self._abandoned = abandoned
        self._queued: Pending[T] = []
        self._in_flight = 0
        self._scheduled = False

    async def submit(self, item: T) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        entry = (item, done)
        self._queued.append(entry)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush, loop)
        try:
            await done
        except asyncio.CancelledError:
            if done.done() and not done.cancelled():
                # Written, but cancelled before it resumed (a timeout firing as the store
                # answered): it gave up all the same. A failed write was handed back whole.
                if done.exception() is None and self._abandoned is not None:
                    self._abandoned([item])
                raise
            for i, queued in enumerate(self._queued):
                if queued is entry:  # not yet in a batch: never to be written
                    del self._queued[i]
                    break
            raise

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        while self._queued and self._in_flight < self._writers:
            batch = self._queued[: self._max_batch]
            del self._queued[: self._max_batch]
            self._in_flight += 1
            written = loop.create_task(self._write([i for i, _ in batch]))
            written.add_done_callback(partial(self._batch_written, loop, batch))

    def _batch_written(
        self, loop: asyncio.AbstractEventLoop, batch: Pending[T], written: asyncio.Task[None]
    ) -> None:
        self._in_flight -= 1
        error = written.exception()
        gave_up = [item for item, done in batch if error is not None or done.cancelled()]
        for _, done in batch:
            resolve(done, error)
        if gave_up and self._abandoned is not None:
            self._abandoned(gave_up)
        if self._queued:
            self._flush(loop)
