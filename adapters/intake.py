"""The services profile's intake: PENDING in the status store, then the trade in the queue."""

from __future__ import annotations

import structlog

from domain.message import TradeMessage
from domain.ports import StatusStore, TradeQueue, Unavailable
from domain.status import RequestStatus

log = structlog.get_logger("adapters")


class PendingThenQueue:
    """Two stores, one order: PENDING first, so the dataflow's outcome can never be
    overwritten by it (status writes are unconditional batches); if the trade then cannot
    be queued, the PENDING record is withdrawn and the caller gets Unavailable."""

    def __init__(self, statuses: StatusStore, queue: TradeQueue) -> None:
        self._statuses = statuses
        self._queue = queue

    async def accept(self, pending: RequestStatus, message: TradeMessage) -> None:
        await self._statuses.put_pending(pending)
        try:
            await self._queue.publish(message)
        except Unavailable:
            await self._withdraw(message.request_id)
            raise

    async def _withdraw(self, request_id: str) -> None:
        try:
            await self._statuses.withdraw(request_id)
        except Unavailable as exc:
            # Its id was never returned to anyone; the status TTL removes it.
            log.warning("could not withdraw PENDING record", request_id=request_id, error=str(exc))
