"""Retry-with-backoff for outages: the dataflow waits for a dependency rather than drop data.

Waiting is logged, rate-limited: an outage gives one line when it starts, at most one per
``LOG_EVERY_S`` while it lasts and one when it ends; a call that neither fails nor returns
(a frozen dependency) is reported by the watchdog after ``BLOCKED_AFTER_S``, at the same
rate per dependency.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import structlog

from domain.ports import Unavailable

T = TypeVar("T")
log = structlog.get_logger("adapters.retry")

LOG_EVERY_S = 10.0
BLOCKED_AFTER_S = 5.0


@dataclass(eq=False)
class _Call:
    what: str
    since: float
    reported: bool = False


class Watchdog:
    """Knows which dependency each call is waiting on, since when; logs those blocked."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        check_every_s: float | None = 1.0,
        blocked_after_s: float = BLOCKED_AFTER_S,
    ) -> None:
        self._clock = clock
        self._check_every_s = check_every_s  # None: no thread, check() is called by hand
        self._blocked_after_s = blocked_after_s
        self._calls: set[_Call] = set()
        self._reported: dict[str, float] = {}  # dependency → when last logged blocked
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, what: str) -> Iterator[None]:
        call = _Call(what, self._clock())
        with self._lock:
            self._calls.add(call)
            if self._thread is None and self._check_every_s is not None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._check_every_s,), name="watchdog", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._calls.discard(call)
            if call.reported:
                log.info(
                    "dependency call ended",
                    what=what,
                    blocked_s=round(self._clock() - call.since, 1),
                )

    def check(self) -> None:
        """Log each call blocked for ``blocked_after_s``; one line per dependency per
        ``LOG_EVERY_S`` at most, however many calls wait on it or time out in turn."""
        now = self._clock()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            due = max(
                call.since + self._blocked_after_s,
                self._reported.get(call.what, -math.inf) + LOG_EVERY_S,
            )
            if now >= due:
                call.reported = True
                self._reported[call.what] = now
                log.warning(
                    "dependency call blocked", what=call.what, blocked_s=round(now - call.since, 1)
                )

    def _run(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            self.check()


WATCHDOG = Watchdog()


def until_available(
    action: Callable[[], T],
    what: str,
    *,
    first_delay: float = 0.1,
    max_delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    watchdog: Watchdog = WATCHDOG,
) -> T:
    """Run ``action`` until it stops raising Unavailable, backing off exponentially.

    Only outages are retried; any other exception is a bug or bad data and escalates.
    """
    delay = first_delay
    attempt = 1
    started = logged = 0.0
    while True:
        begun = clock()
        try:
            with watchdog.watching(what):
                result = action()
        except Unavailable as exc:
            now = clock()
            if attempt == 1:  # the outage began with this call, however long it blocked
                started, logged = begun, now
                log.warning("dependency unavailable, retrying", what=what, error=str(exc))
            elif now - logged >= LOG_EVERY_S:
                logged = now
                log.warning(
                    "dependency still unavailable",
                    what=what,
                    attempts=attempt,
                    outage_s=round(now - started, 1),
                    error=str(exc),
                )
            sleep(delay)
            delay = min(delay * 2, max_delay)
            attempt += 1
        else:
            if attempt > 1:
                log.info(
                    "dependency available again",
                    what=what,
                    attempts=attempt,
                    outage_s=round(clock() - started, 1),
                )
            return result
