"""Hand-written in-memory fakes of the ports, for tests of our own logic."""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime

from domain.decided import Decided, apply_in_queue_order
from domain.message import TradeMessage
from domain.ports import StoredTrade, TradeFilter, Unavailable
from domain.status import Outcome, RequestState, RequestStatus
from domain.trade import Trade, maturity_passed


def now() -> datetime:
    return datetime.now(UTC)


class FakeTradeStore:
    """Same contract as the PostgreSQL store, including the version guard."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], StoredTrade] = {}
        self.log: dict[str, Outcome] = {}
        self.lookups = 0
        self.down = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise Unavailable("fake trade store is down")

    def highest_versions(self, trade_ids: Collection[str]) -> dict[str, int]:
        self._check()
        with self._lock:
            self.lookups += 1
            heads: dict[str, int] = {}
            for tid, version in self.rows:
                if tid in trade_ids:
                    heads[tid] = max(version, heads.get(tid, 0))
            return heads

    def apply(self, trades: Sequence[Trade]) -> set[tuple[str, int]]:
        self._check()
        written = set()
        with self._lock:
            for t in sorted(trades, key=lambda t: (t.trade_id, t.version)):
                head = max((v for tid, v in self.rows if tid == t.trade_id), default=0)
                if t.version < head:
                    continue
                key = (t.trade_id, t.version)
                old = self.rows.get(key)
                stamp = now()
                self.rows[key] = StoredTrade(t, False, old.created_at if old else stamp, stamp)
                written.add(key)
        return written

    def record(self, decided: Sequence[Decided]) -> list[Outcome]:
        self._check()
        fresh = [d for d in decided if d.message.request_id not in self.log]
        for outcome in apply_in_queue_order(fresh, self.apply):
            self.log[outcome.request_id] = outcome
        return [self.log[d.message.request_id] for d in decided]

    def _view(self, row: StoredTrade, as_of: date) -> StoredTrade:
        return replace(row, expired=row.expired or maturity_passed(row.trade.maturity_date, as_of))

    def versions(self, trade_id: str, as_of: date) -> list[StoredTrade]:
        self._check()
        return [self._view(self.rows[k], as_of) for k in sorted(self.rows) if k[0] == trade_id]

    def page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> list[StoredTrade]:
        self._check()
        out = []
        for key in sorted(self.rows, key=lambda k: (k[0].encode(), k[1])):
            if after is not None and (key[0].encode(), key[1]) <= (after[0].encode(), after[1]):
                continue
            row = self._view(self.rows[key], as_of)
            if where.book_id is not None and row.trade.book_id != where.book_id:
                continue
            if where.counterparty_id is not None and row.trade.counterparty_id != (
                where.counterparty_id
            ):
                continue
            if where.expired is not None and row.expired != where.expired:
                continue
            out.append(row)
        return out[:limit]

    def expire(self, as_of: date) -> int:
        self._check()
        count = 0
        for key, row in self.rows.items():
            if not row.expired and maturity_passed(row.trade.maturity_date, as_of):
                self.rows[key] = replace(row, expired=True, updated_at=now())
                count += 1
        return count

    def ping(self) -> None:
        self._check()


class FakeStatusStore:
    """Same contract as the DynamoDB store: terminal states are final."""

    def __init__(self) -> None:
        self.items: dict[str, RequestStatus] = {}
        self.down = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise Unavailable("fake status store is down")

    async def put_pending(self, status: RequestStatus) -> None:
        self._check()
        with self._lock:
            self.items.setdefault(status.request_id, status)

    async def withdraw(self, request_id: str) -> None:
        self._check()
        with self._lock:
            if self.items[request_id].state is RequestState.PENDING:
                del self.items[request_id]

    def complete(self, outcomes: Sequence[Outcome]) -> None:
        self._check()
        with self._lock:
            for o in outcomes:
                old = self.items.get(o.request_id)
                if old is not None and old.state.terminal:
                    continue
                stamp = now()
                self.items[o.request_id] = RequestStatus(
                    request_id=o.request_id,
                    state=o.state,
                    trade_id=old.trade_id if old else o.trade_id,
                    version=old.version if old else o.version,
                    created_at=old.created_at if old else stamp,
                    updated_at=stamp,
                    reason_code=o.reason_code,
                    failure_reason=o.failure_reason,
                )

    def get(self, request_id: str) -> RequestStatus | None:
        self._check()
        return self.items.get(request_id)

    def ping(self) -> None:
        self._check()

    def states(self) -> dict[str, RequestState]:
        return {k: v.state for k, v in self.items.items()}


class FakeQueue:
    """Records published messages; ``down`` makes publish fail like an unreachable broker."""

    def __init__(self) -> None:
        self.messages: list[TradeMessage] = []
        self.down = False

    async def publish(self, message: TradeMessage) -> None:
        if self.down:
            raise Unavailable("fake queue is down")
        self.messages.append(message)

    def ping(self) -> None:
        if self.down:
            raise Unavailable("fake queue is down")
