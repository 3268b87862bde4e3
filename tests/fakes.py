"""Hand-written in-memory fakes of the ports, for tests of our own logic."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

from domain.idempotency import KeyRecord
from domain.message import TradeMessage
from domain.ports import EncodedPage, StoredTrade, TradeFilter, Unavailable
from domain.status import Batch, BatchProgress, Outcome, RequestState, RequestStatus
from domain.trade import Trade, maturity_passed
from ingest_api.reads import trades_json


def now() -> datetime:
    return datetime.now(UTC)


class FakeTradeStore:
    """The SQL trade store's primitives in memory, including the version guard."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], StoredTrade] = {}
        self.log: dict[str, Outcome] = {}
        self.lookups = 0
        self.down = False
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise Unavailable("fake trade store is down")

    def heads(self, trade_ids: Collection[str]) -> dict[str, int]:
        self._check()
        with self._lock:
            self.lookups += 1
            heads: dict[str, int] = {}
            for tid, version in self.rows:
                if tid in trade_ids:
                    heads[tid] = max(version, heads.get(tid, 0))
            return heads

    @contextmanager
    def transaction(self) -> Iterator[FakeDecisionLog]:
        """The DecisionLog primitives, so the use cases run their real algorithm here;
        all or nothing, like a database transaction."""
        self._check()
        with self._lock:
            rows, log = dict(self.rows), dict(self.log)
            try:
                yield FakeDecisionLog(self)
            except BaseException:
                self.rows, self.log = rows, log
                raise

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

    def encoded_page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> EncodedPage:
        """``page`` encoded by the API's own encoder, which the SQL store's JSON matches."""
        rows = self.page(after, limit + 1, where, as_of)
        last = rows[:limit][-1].trade if rows else None
        key = (last.trade_id, last.version) if last else None
        return EncodedPage(trades_json(rows[:limit]), key, len(rows) > limit)

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


class FakeDecisionLog:
    """The fake store's rows and log seen as one transaction's DecisionLog."""

    def __init__(self, store: FakeTradeStore) -> None:
        self._store = store

    def logged(self, request_ids: Sequence[str]) -> dict[str, Outcome]:
        return {rid: self._store.log[rid] for rid in request_ids if rid in self._store.log}

    def upsert(self, trades: Sequence[Trade]) -> set[tuple[str, int]]:
        """Like the trigger (the store's guard): a row below its trade's head is skipped."""
        rows = self._store.rows
        written = set()
        for t in sorted(trades, key=lambda t: (t.trade_id, t.version)):
            head = max((v for tid, v in rows if tid == t.trade_id), default=0)
            if t.version < head:
                continue
            key = (t.trade_id, t.version)
            old = rows.get(key)
            stamp = now()
            rows[key] = StoredTrade(t, False, old.created_at if old else stamp, stamp)
            written.add(key)
        return written

    def log(self, outcomes: Sequence[Outcome]) -> None:
        for o in outcomes:
            self._store.log.setdefault(o.request_id, o)


class FakeStatusStore:
    """Same contract as the real stores (domain.ports: OutcomeWriter, StatusReader, PendingWriter): terminal states are
    final, a record expires ``ttl`` after its last write."""

    def __init__(self, ttl: timedelta = timedelta(days=7)) -> None:
        self.items: dict[str, RequestStatus] = {}
        self.batches: dict[str, Batch] = {}
        self.ttl = ttl
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

    def write_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        self._check()
        with self._lock:
            for o in outcomes:
                old = self.items.get(o.request_id)
                if old is None or not old.state.terminal:
                    self.items[o.request_id] = _terminal(o, old)

    def fail_pending(self, outcomes: Sequence[Outcome]) -> None:
        self._check()
        with self._lock:
            for o in outcomes:
                old = self.items.get(o.request_id)
                if old is not None and old.state is RequestState.PENDING:
                    self.items[o.request_id] = _terminal(o, old)

    async def put_batch(self, batch: Batch) -> None:
        self._check()
        with self._lock:
            self.batches[batch.batch_id] = batch  # a stream's record grows with each chunk

    def get(self, request_id: str) -> RequestStatus | None:
        self._check()
        status = self.items.get(request_id)
        if status is None or status.updated_at + self.ttl < now():
            return None
        return status

    def get_many(self, request_ids: Sequence[str]) -> dict[str, RequestStatus]:
        found = {rid: self.get(rid) for rid in request_ids}
        return {rid: status for rid, status in found.items() if status is not None}

    def batch_record(self, batch_id: str) -> Batch | None:
        self._check()
        batch = self.batches.get(batch_id)
        if batch is None or batch.created_at + self.ttl < now():
            return None
        return batch

    def _of(self, batch_id: str) -> list[RequestStatus]:
        """The batch's live requests, by batch_index."""
        with self._lock:
            mine = [s for s in self.items.values() if s.batch_id == batch_id]
        live = [s for s in mine if s.updated_at + self.ttl >= now()]
        return sorted(live, key=lambda s: s.batch_index or 0)

    def batch(self, batch_id: str) -> BatchProgress | None:
        batch = self.batch_record(batch_id)
        if batch is None:
            return None
        states = [s.state for s in self._of(batch_id)]
        return BatchProgress(
            batch,
            states.count(RequestState.PENDING),
            states.count(RequestState.SUCCESS),
            states.count(RequestState.FAILED),
        )

    def batch_items(
        self, batch_id: str, state: RequestState | None, after: int | None, limit: int
    ) -> list[RequestStatus]:
        self._check()
        start = -1 if after is None else after
        wanted = [
            s
            for s in self._of(batch_id)
            if (s.batch_index or 0) > start and (state is None or s.state is state)
        ]
        return wanted[:limit]

    def ping(self) -> None:
        self._check()

    def states(self) -> dict[str, RequestState]:
        return {k: v.state for k, v in self.items.items()}


def _terminal(o: Outcome, old: RequestStatus | None) -> RequestStatus:
    """A terminal status as every store writes it, over a PENDING record's identity."""
    status = o.as_status()
    if old is None:
        return status
    return replace(
        status,
        trade_id=old.trade_id,
        version=old.version,
        created_at=old.created_at,
        client_id=old.client_id,
        batch_id=old.batch_id,
        batch_index=old.batch_index,
    )


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


class FakeKeys:
    """Same contract as ``adapters.idempotency.DynamoKeys`` (shared contract tests): a key
    is claimed once until released or expired; a done claim holds its answer."""

    def __init__(self, ttl: timedelta = timedelta(days=7)) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.ttl = ttl

    async def claim(self, record: KeyRecord) -> KeyRecord | None:
        held = self.records.get(record.key)
        if held is not None and held.created_at + self.ttl >= now():
            return held
        self.records[record.key] = record
        return None

    async def complete(self, record: KeyRecord) -> None:
        self.records[record.key] = replace(self.records[record.key], done=True)

    async def release(self, record: KeyRecord) -> None:
        held = self.records.get(record.key)
        if held is not None and not held.done and held.fingerprint == record.fingerprint:
            del self.records[record.key]
