"""The event-loop Batcher: many awaited writes become few batches, failures reach every caller."""

from __future__ import annotations

import asyncio

import pytest

from adapters.batching import Batcher


class Store:
    """Records each batch; one write at a time takes ``delay`` seconds."""

    def __init__(self, delay: float = 0.01, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.delay = delay
        self.fail = fail

    async def write(self, items: list[int]) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise OSError("disk full")
            self.batches.append(items)
        finally:
            self.in_flight -= 1


async def test_items_arriving_together_share_batches() -> None:
    store = Store()
    batcher: Batcher[int] = Batcher(store.write, max_batch=25)
    await asyncio.gather(*(batcher.submit(i) for i in range(60)))
    assert sorted(i for b in store.batches for i in b) == list(range(60))
    assert [len(b) for b in store.batches] == [25, 25, 10]
    assert store.most_in_flight == 1


async def test_writers_bounds_batches_in_flight() -> None:
    store = Store()
    batcher: Batcher[int] = Batcher(store.write, max_batch=5, writers=3)
    await asyncio.gather(*(batcher.submit(i) for i in range(40)))
    assert store.most_in_flight == 3
    assert len(store.batches) == 8


async def test_items_queued_during_a_write_go_in_the_next_batch() -> None:
    store = Store(delay=0.05)
    batcher: Batcher[int] = Batcher(store.write, max_batch=100)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)  # the first batch is in flight now
    await asyncio.gather(first, *(batcher.submit(i) for i in range(1, 8)))
    assert store.batches == [[0], [1, 2, 3, 4, 5, 6, 7]]


async def test_a_failed_write_fails_every_item_of_its_batch() -> None:
    batcher: Batcher[int] = Batcher(Store(fail=True).write, max_batch=10)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)


async def test_a_cancelled_caller_does_not_disturb_the_others() -> None:
    store = Store(delay=0.05)
    batcher: Batcher[int] = Batcher(store.write, max_batch=10)
    doomed = asyncio.ensure_future(batcher.submit(1))
    kept = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await kept
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert store.batches == [[1, 2]]  # written all the same: the write had begun


async def test_a_caller_giving_up_while_queued_is_never_written() -> None:
    """A request that gave up (its PENDING record never returned to anyone) must not be
    written later, when the store answers again."""
    store = Store(delay=0.05)
    abandoned: list[list[int]] = []
    batcher: Batcher[int] = Batcher(store.write, max_batch=10, abandoned=abandoned.append)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.sleep(0.01)  # 0 is being written; 1 and 2 wait behind it
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await batcher.submit(1)
    await asyncio.gather(first, batcher.submit(2))
    assert store.batches == [[0], [2]]
    assert abandoned == []


async def test_callers_giving_up_during_their_write_are_handed_back() -> None:
    """Their items may be stored (the write went on): they go to ``abandoned`` to be undone."""
    store = Store(delay=0.05)
    abandoned: list[list[int]] = []
    batcher: Batcher[int] = Batcher(store.write, max_batch=10, abandoned=abandoned.append)
    doomed = asyncio.ensure_future(batcher.submit(1))
    kept = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await kept
    assert store.batches == [[1, 2]]
    assert abandoned == [[1]]


async def test_a_caller_cancelled_as_its_write_ends_is_handed_back() -> None:
    """Cancelled once its batch was written but before it resumed (its timeout firing as
    the store answered), it sees CancelledError: its item is undone like one given up
    mid-write (the fault suite found a PENDING record left for an id answered 503)."""
    store = Store(delay=0)
    abandoned: list[list[int]] = []
    loop = asyncio.get_running_loop()

    async def write(items: list[int]) -> None:
        await store.write(items)
        # Runs after the write's end callback resolves the caller, before the caller resumes.
        loop.call_soon(loop.call_soon, caller.cancel)

    batcher: Batcher[int] = Batcher(write, max_batch=10, abandoned=abandoned.append)
    caller = asyncio.ensure_future(batcher.submit(1))
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert store.batches == [[1]]
    assert abandoned == [[1]]


async def test_a_failed_write_is_handed_back_whole() -> None:
    """A write that failed may still have been applied (the reply was lost): every item of
    its batch goes to ``abandoned``, while its callers get the error."""
    store = Store(fail=True)
    abandoned: list[list[int]] = []
    batcher: Batcher[int] = Batcher(store.write, max_batch=10, abandoned=abandoned.append)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    assert abandoned == [[1, 2]]
