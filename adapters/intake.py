"""The API's intakes, one per profile, and the admission control every intake runs under,
so an overload is refused at once and a hung dependency costs each request a bounded wait.

Services: the key claimed, PENDING in the status store, then the trades in the queue
(``PendingThenQueue``). Embedded: all in one transaction of the inbound log's SQLite file
(``SqliteIntake``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import structlog

from adapters.idempotency import hold
from adapters.inbound_log import APPEND, SqliteInboundLog
from adapters.sqlite_file import GroupCommit, Params, Writer
from adapters.sqlite_status import PUT_BATCH, PUT_PENDING, SqliteStatusStore
from domain.idempotency import KeyInProgress, KeyRecord
from domain.message import TradeMessage
from domain.ports import (
    Intake,
    Overloaded,
    PendingWriter,
    Submission,
    TradeQueue,
    Unavailable,
)
from domain.status import RequestStatus

log = structlog.get_logger("adapters")


class KeyClaims(Protocol):
    """Where the services intake claims idempotency keys (``adapters.idempotency``)."""

    async def claim(self, record: KeyRecord) -> KeyRecord | None: ...

    async def complete(self, record: KeyRecord) -> None: ...

    async def release(self, record: KeyRecord) -> None: ...


class PendingThenQueue:
    """Two stores, one order: PENDING first, so the dataflow's outcome can never be
    overwritten by it; if a trade then cannot be queued, or the caller gives up waiting
    for the queue, its PENDING record is withdrawn (in the background) and the caller
    gets Unavailable. A key is claimed before anything is written and released if the
    submission fails; trades of a failed batch that were queued stay queued (they are
    decided; a retry queues them again, as new requests of the same versions).
    """

    def __init__(self, statuses: PendingWriter, queue: TradeQueue, keys: KeyClaims) -> None:
        self._statuses = statuses
        self._queue = queue
        self._keys = keys
        self._background: set[asyncio.Task[None]] = set()

    async def accept(self, submission: Submission) -> KeyRecord | None:
        key = submission.key
        if key is not None:
            held = await self._keys.claim(key)
            if held is not None:
                return held
        try:
            if len(submission.accepted) == 1:
                await self._take_in(*submission.accepted[0])
            else:
                taken = await asyncio.gather(
                    *(self._take_in(p, m) for p, m in submission.accepted),
                    return_exceptions=True,
                )
                failed = next((t for t in taken if isinstance(t, BaseException)), None)
                if failed is not None:
                    raise failed
            if submission.batch is not None:
                await self._statuses.put_batch(submission.batch)
            if key is not None:
                await self._keys.complete(key)
        except (Exception, asyncio.CancelledError):
            if key is not None:
                self._in_background(self._release(key))
            raise
        return None

    async def _take_in(self, pending: RequestStatus, message: TradeMessage) -> None:
        await self._statuses.put_pending(pending)
        try:
            await self._queue.publish(message)
        except (Unavailable, Overloaded, asyncio.CancelledError):
            # In the background: the caller's answer does not wait on the status store.
            self._in_background(self._withdraw(message.request_id))
            raise

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _withdraw(self, request_id: str) -> None:
        try:
            await self._statuses.withdraw(request_id)
        except Unavailable as exc:
            # Its id was never returned to anyone; the status TTL removes it.
            log.warning("could not withdraw PENDING record", request_id=request_id, error=str(exc))

    async def _release(self, key: KeyRecord) -> None:
        try:
            await self._keys.release(key)
        except Unavailable as exc:
            # Held until its claim's lease ends; a retry meanwhile is told 409.
            log.warning("could not release an idempotency key", error=str(exc))


@dataclass(slots=True)
class _Entry:
    """One submission on its way through the embedded group commit; ``held`` is set on the
    writer thread when its key was held already."""

    submission: Submission
    pendings: list[Params]
    appends: list[Params]
    held: KeyRecord | None = None


class SqliteIntake:
    """The embedded intake: PENDING records, log entries, the batch and the key in one
    transaction.

    The status table lives in the log's own file, so one group commit (one fsync) makes
    all durable, and a failure leaves none: nothing to withdraw.
    """

    def __init__(
        self, log: SqliteInboundLog, statuses: SqliteStatusStore, key_ttl: timedelta
    ) -> None:
        if statuses.path != log.path:
            raise ValueError("the embedded status table must live in the inbound log's file")
        self._log = log
        self._statuses = statuses
        self._key_ttl = key_ttl
        self._commit: GroupCommit[_Entry] = GroupCommit(log.path, self._write)

    def _write(self, writer: Writer, entries: list[_Entry]) -> None:
        pendings: list[Params] = []
        appends: list[Params] = []
        with writer.transaction("inbound log") as conn:
            for entry in entries:
                submission = entry.submission
                if submission.key is not None:
                    entry.held = hold(conn, submission.key, self._key_ttl)
                    if entry.held is not None:
                        continue
                pendings += entry.pendings
                appends += entry.appends
                if submission.batch is not None:
                    conn.execute(PUT_BATCH, self._statuses.batch_row(submission.batch))
            conn.executemany(PUT_PENDING, pendings)
            conn.executemany(APPEND, appends)

    async def accept(self, submission: Submission) -> KeyRecord | None:
        entry = _Entry(
            submission,
            [self._statuses.pending_row(p) for p, _ in submission.accepted],
            [self._log.row(m) for _, m in submission.accepted],
        )
        await self._commit.submit(entry)
        return entry.held

    def close(self) -> None:
        self._commit.close()


class DrainRate:
    """Trades acknowledged per second, as last observed: what a refused caller's wait is
    reckoned from."""

    def __init__(self) -> None:
        self._second = 0
        self._this = 0
        self._last = 0

    def add(self, trades: int) -> None:
        second = int(time.monotonic())
        if second != self._second:
            self._last = self._this if second == self._second + 1 else 0
            self._second, self._this = second, 0
        self._this += trades

    def per_second(self) -> int:
        second = int(time.monotonic())
        if second == self._second:
            return max(self._last, self._this)
        return self._this if second == self._second + 1 else 0


def retry_after_s(in_flight: int, per_second: int, most: int) -> int:
    """Seconds until what is in flight has drained at the rate observed (1 to ``most``)."""
    return max(1, min(most, -(-in_flight // max(per_second, 1))))


class BoundedIntake:
    """Admission control for one API worker: at most ``max_in_flight`` trades wait on the
    intake at once (beyond: Overloaded at once, with a Retry-After from the drain rate; a
    submission larger than the cap is taken alone), a key is in one request at a time
    (another: KeyInProgress), and no request waits longer than ``timeout_s`` (then
    Unavailable).

    A request that gives up is cancelled inside the intake, which undoes what it had
    started (its queued PENDING write is dropped, a written one withdrawn).
    """

    def __init__(
        self, intake: Intake, what: str, max_in_flight: int, timeout_s: float, most_s: int
    ) -> None:
        self._intake = intake
        self._what = what
        self._max_in_flight = max_in_flight
        self._timeout_s = timeout_s
        # Whatever is in flight is answered within timeout_s: no refused caller need wait
        # longer (with no drain observed yet, e.g. just started, the rate alone says most_s).
        self._most_s = min(most_s, math.ceil(timeout_s))
        self._keys: set[str] = set()
        self._drained = DrainRate()
        self.in_flight = 0

    async def accept(self, submission: Submission) -> KeyRecord | None:
        trades = len(submission.accepted)
        if self.in_flight and self.in_flight + trades > self._max_in_flight:
            wait_s = retry_after_s(self.in_flight, self._drained.per_second(), self._most_s)
            raise Overloaded(f"{self.in_flight} trades are waiting on the {self._what}", wait_s)
        key = submission.key.key if submission.key is not None else None
        if key is not None:
            if key in self._keys:
                raise KeyInProgress(key)
            self._keys.add(key)
        self.in_flight += trades
        try:
            async with asyncio.timeout(self._timeout_s):
                held = await self._intake.accept(submission)
        except TimeoutError:
            ms = round(self._timeout_s * 1000)
            raise Unavailable(f"{self._what} did not answer within {ms} ms") from None
        finally:
            self.in_flight -= trades
            if key is not None:
                self._keys.discard(key)
        self._drained.add(trades)
        return held
