"""Retry-with-backoff for outages: the dataflow waits for a dependency rather than drop data."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import structlog

from domain.ports import Unavailable

T = TypeVar("T")
log = structlog.get_logger("sinks")


def until_available(
    action: Callable[[], T],
    what: str,
    *,
    first_delay: float = 0.1,
    max_delay: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``action`` until it stops raising Unavailable, backing off exponentially.

    Only outages are retried; any other exception is a bug or bad data and escalates.
    """
    delay = first_delay
    attempt = 1
    while True:
        try:
            return action()
        except Unavailable as exc:
            log.warning(
                "dependency unavailable, retrying", what=what, attempt=attempt, error=str(exc)
            )
            sleep(delay)
            delay = min(delay * 2, max_delay)
            attempt += 1
