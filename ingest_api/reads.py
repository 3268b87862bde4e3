"""The API's reads run on a few threads of their own, so a flood of reads takes neither
the threads nor the interpreter time that submissions and health need."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from domain.ports import Overloaded

T = TypeVar("T")

# How much nicer than the event loop a read thread is to the OS scheduler: the reads'
# database work (the GIL released) then yields the two cores to the loop that acknowledges
# POSTs. Measured with the read flood: flooded POST p99 14 ms against 18 ms (medians of 3).
READ_NICENESS = 10


def _nicer() -> None:
    """Lower the calling thread's scheduling priority (Linux: per thread; allowed unprivileged)."""
    thread = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + READ_NICENESS)


class ReadPool:
    """``threads`` threads for reads; at most ``max_waiting`` more reads wait for one, and
    any beyond are Overloaded at once (429 + Retry-After) instead of queueing without end.

    A read given up while it runs keeps its thread until it ends, so the queue may briefly
    hold up to ``threads`` more than its bound; the threads never grow.
    """

    def __init__(self, threads: int, max_waiting: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="read", initializer=_nicer)
        self._bound = threads + max_waiting
        self.busy = 0

    async def run(self, read: Callable[..., T], *args: Any) -> T:
        """``read(*args)`` on a read thread, in this request's context (its log fields)."""
        if self.busy >= self._bound:
            raise Overloaded(f"{self.busy} reads are running or waiting")
        self.busy += 1
        try:
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, partial(context.run, read, *args)
            )
        finally:
            self.busy -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
