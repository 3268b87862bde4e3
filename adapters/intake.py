"""The API's intakes, one per profile, and the bound every intake runs under, so a hung
dependency costs each request a bounded wait.

Services: PENDING in the status store, then the trade in the queue (``PendingThenQueue``).
Embedded: both in one transaction of the inbound log's SQLite file (``SqliteIntake``).
"""

from __future__ import annotations

import asyncio

import structlog

from adapters.inbound_log import APPEND, SqliteInboundLog
from adapters.sqlite_file import GroupCommit, Params, Writer
from adapters.sqlite_status import PUT_PENDING, SqliteStatusStore
from domain.message import TradeMessage
from domain.ports import Intake, PendingWriter, TradeQueue, Unavailable
from domain.status import RequestStatus

log = structlog.get_logger("adapters")


class Overloaded(Exception):
    """Too many requests already wait on a dependency; the caller may retry later."""


class PendingThenQueue:
    """Two stores, one order: PENDING first, so the dataflow's outcome can never be
    overwritten by it; if the trade then cannot be queued, or the caller gives up waiting
    for the queue, the PENDING record is withdrawn (in the background) and the caller
    gets Unavailable."""

    def __init__(self, statuses: PendingWriter, queue: TradeQueue) -> None:
        self._statuses = statuses
        self._queue = queue
        self._withdrawing: set[asyncio.Task[None]] = set()

    async def accept(self, pending: RequestStatus, message: TradeMessage) -> None:
        await self._statuses.put_pending(pending)
        try:
            await self._queue.publish(message)
        except (Unavailable, asyncio.CancelledError):
            # In the background: the caller's 503 does not wait on the status store.
            task = asyncio.get_running_loop().create_task(self._withdraw(message.request_id))
            self._withdrawing.add(task)
            task.add_done_callback(self._withdrawing.discard)
            raise

    async def _withdraw(self, request_id: str) -> None:
        try:
            await self._statuses.withdraw(request_id)
        except Unavailable as exc:
            # Its id was never returned to anyone; the status TTL removes it.
            log.warning("could not withdraw PENDING record", request_id=request_id, error=str(exc))


class SqliteIntake:
    """The embedded intake: the PENDING record and the log entry in one transaction.

    The status table lives in the log's own file, so one group commit (one fsync) makes
    both durable, and a failure leaves neither: nothing to withdraw.
    """

    def __init__(self, log: SqliteInboundLog, statuses: SqliteStatusStore) -> None:
        if statuses.path != log.path:
            raise ValueError("the embedded status table must live in the inbound log's file")
        self._log = log
        self._statuses = statuses
        self._commit: GroupCommit[tuple[Params, Params]] = GroupCommit(log.path, self._write)

    @staticmethod
    def _write(writer: Writer, accepted: list[tuple[Params, Params]]) -> None:
        with writer.transaction("inbound log") as conn:
            conn.executemany(PUT_PENDING, [pending for pending, _ in accepted])
            conn.executemany(APPEND, [entry for _, entry in accepted])

    async def accept(self, pending: RequestStatus, message: TradeMessage) -> None:
        await self._commit.submit((self._statuses.pending_row(pending), self._log.row(message)))

    def close(self) -> None:
        self._commit.close()


class BoundedIntake:
    """At most ``max_waiting`` requests of this worker wait on the intake at once (beyond:
    Overloaded, at once), and none waits longer than ``timeout_s`` (then Unavailable).

    A request that gives up is cancelled inside the intake, which undoes what it had
    started (its queued PENDING write is dropped, a written one withdrawn).
    """

    def __init__(self, intake: Intake, what: str, max_waiting: int, timeout_s: float) -> None:
        self._intake = intake
        self._what = what
        self._max_waiting = max_waiting
        self._timeout_s = timeout_s
        self.waiting = 0

    async def accept(self, pending: RequestStatus, message: TradeMessage) -> None:
        if self.waiting >= self._max_waiting:
            raise Overloaded(f"{self.waiting} requests are waiting on the {self._what}")
        self.waiting += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._intake.accept(pending, message)
        except TimeoutError:
            ms = round(self._timeout_s * 1000)
            raise Unavailable(f"{self._what} did not answer within {ms} ms") from None
        finally:
            self.waiting -= 1
