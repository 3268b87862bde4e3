"""The API's health: each dependency's probe, its result reused for a second or so, so
that /api/v1/health is no load amplifier however often it is called."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from adapters.wiring import Services
from domain.ports import Unavailable

PROBE_TIMEOUT_S = 3.0


class Probe:
    """One dependency's check (blocking; raises Unavailable), run at most once per
    ``ttl_s``: callers meanwhile get its last result or share the run in flight."""

    def __init__(
        self, check: Callable[[], None], ttl_s: float, timeout_s: float = PROBE_TIMEOUT_S
    ) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._last: tuple[float, str] | None = None  # (when it ended, its state)
        self._running: asyncio.Future[str] | None = None

    async def state(self) -> str:
        """Either "ok" or "unavailable"."""
        if self._last is not None and time.monotonic() - self._last[0] < self._ttl_s:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._probe())
        # Shielded: a caller that gives up does not cancel the others' probe.
        return await asyncio.shield(self._running)

    async def _probe(self) -> str:
        try:
            await asyncio.wait_for(asyncio.to_thread(self._check), self._timeout_s)
            state = "ok"
        except (Unavailable, TimeoutError):
            state = "unavailable"
        finally:
            self._running = None
        self._last = (time.monotonic(), state)
        return state


class Health:
    """The parts /api/v1/health reports: the trade store ("db"), the queue ("kafka";
    embedded, the inbound log) and the status store, each a cached Probe."""

    def __init__(self, services: Services, ttl_s: float) -> None:
        self._probes = {
            "db": Probe(services.trades.ping, ttl_s),
            "kafka": Probe(services.queue.ping, ttl_s),
            "status_store": Probe(services.statuses.ping, ttl_s),
        }

    async def parts(self) -> dict[str, str]:
        states = await asyncio.gather(*(p.state() for p in self._probes.values()))
        return dict(zip(self._probes, states, strict=True))
