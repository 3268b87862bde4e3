"""The one status contract, on DynamoDB (dynoxide), SQLite and the fake.

Every contract test runs against each implementation (domain.ports.OutcomeWriter and
StatusReader, with PendingWriter's put_pending and put_batch; withdraw where there is one): a
terminal state is never replaced by a different one, a rewrite of a terminal state is
identical to the byte, a dead letter only moves a PENDING record to FAILED. SQLite takes
its PENDING and batch records as the embedded intake writes them, and never withdraws one
(the intake's one transaction leaves nothing to withdraw).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest

from adapters.dynamodb import BATCH_INDEX, BATCH_KEY, DynamoStatusStore, make_client
from adapters.sqlite_file import write_once
from adapters.sqlite_status import PUT_BATCH, STATUS_SCHEMA, SqliteStatusStore
from config.settings import Settings
from domain.ports import OutcomeWriter, PendingWriter, StatusReader, Unavailable
from domain.status import Batch, Outcome, ReasonCode, RequestState, RequestStatus
from tests.conftest import unique
from tests.fakes import FakeStatusStore
from tests.support import write_pending


class StatusStore(PendingWriter, OutcomeWriter, StatusReader, Protocol):
    """Every role a status store can play, as the contract tests drive it."""


class SqlitePending(SqliteStatusStore):
    """The SQLite store with the embedded intake's PENDING writes, for the shared tests."""

    async def put_pending(self, status: RequestStatus) -> None:
        write_pending(self, status)

    async def put_batch(self, batch: Batch) -> None:
        write_once(self.path, PUT_BATCH, [self.batch_row(batch)], "test")


@pytest.fixture(scope="module", params=["dynamodb", "sqlite", "fake"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StatusStore]:
    if request.param == "dynamodb":
        yield request.getfixturevalue("status_store")
        return
    if request.param == "fake":
        yield FakeStatusStore()
        return
    store = SqlitePending(tmp_path_factory.mktemp("status") / "status.db", ttl_days=7)
    store.ensure_schema()
    yield store


def raw(store: StatusStore, rid: str) -> Any:
    """The record exactly as stored."""
    if isinstance(store, DynamoStatusStore):
        return store._client.get_item(
            TableName=store._table, Key={"request_id": {"S": rid}}, ConsistentRead=True
        ).get("Item")
    if isinstance(store, SqliteStatusStore):
        with sqlite3.connect(store.path) as conn:
            return conn.execute(
                "SELECT * FROM request_status WHERE request_id = ?", (rid,)
            ).fetchone()
    assert isinstance(store, FakeStatusStore)
    return store.items.get(rid)


def pending(rid: str, created: datetime | None = None) -> RequestStatus:
    at = created or datetime.now(UTC)
    return RequestStatus(rid, RequestState.PENDING, "T1", 3, at, at)


def logged(
    rid: str,
    state: RequestState = RequestState.SUCCESS,
    code: ReasonCode | None = None,
    accepted_at: datetime | None = None,
    decided_at: datetime | None = None,
) -> Outcome:
    """An outcome as the decision log hands it back: stamped when it was first logged."""
    return Outcome(
        rid,
        "T1",
        3,
        state,
        code,
        code and f"because {code.value}",
        accepted_at,
        decided_at=decided_at or datetime.now(UTC) - timedelta(seconds=30),
    )


async def test_lifecycle(store: StatusStore) -> None:
    rid = unique("r")
    accepted = pending(rid)
    await store.put_pending(accepted)
    got = store.get(rid)
    assert got is not None
    assert got.state is RequestState.PENDING
    assert (got.trade_id, got.version) == ("T1", 3)
    outcome = logged(rid, accepted_at=accepted.created_at, decided_at=datetime.now(UTC))
    store.write_outcomes([outcome])
    done = store.get(rid)
    assert done is not None
    assert done.state is RequestState.SUCCESS
    assert done.created_at == got.created_at
    assert done.updated_at == outcome.decided_at  # from the decision log, not the clock


async def test_a_terminal_rewrite_is_identical_to_the_byte(store: StatusStore) -> None:
    rid = unique("r")
    await store.put_pending(pending(rid))
    outcome = logged(rid, RequestState.FAILED, ReasonCode.STALE_VERSION)
    store.write_outcomes([outcome])
    first = raw(store, rid)
    await asyncio.sleep(0.01)  # a clock-stamped rewrite would differ now
    store.write_outcomes([outcome])
    assert raw(store, rid) == first


async def test_a_terminal_state_is_never_replaced_by_a_different_one(store: StatusStore) -> None:
    rid = unique("r")
    await store.put_pending(pending(rid))
    store.write_outcomes([logged(rid)])
    first = raw(store, rid)
    store.write_outcomes([logged(rid, RequestState.FAILED, ReasonCode.STALE_VERSION)])
    store.fail_pending([logged(rid, RequestState.FAILED, ReasonCode.INVALID_MESSAGE)])
    assert raw(store, rid) == first
    assert store.get(rid).state is RequestState.SUCCESS  # type: ignore[union-attr]


async def test_a_dead_letter_only_moves_pending_to_failed(store: StatusStore) -> None:
    waiting, never_issued = unique("r"), unique("r")
    await store.put_pending(pending(waiting))
    letter = Outcome(
        waiting,
        "some-key",
        0,
        RequestState.FAILED,
        ReasonCode.INVALID_MESSAGE,
        "value is not JSON",
        decided_at=datetime.now(UTC),
    )
    store.fail_pending(
        [letter, Outcome(never_issued, "k", 0, RequestState.FAILED, decided_at=letter.decided_at)]
    )
    failed = store.get(waiting)
    assert failed is not None
    assert (failed.state, failed.reason_code) == (RequestState.FAILED, ReasonCode.INVALID_MESSAGE)
    assert (failed.trade_id, failed.version) == ("T1", 3)  # the PENDING record's, kept
    assert failed.updated_at == letter.decided_at
    assert store.get(never_issued) is None
    assert raw(store, never_issued) is None
    once = raw(store, waiting)
    store.fail_pending([letter])  # a replay
    assert raw(store, waiting) == once


async def test_the_submitting_client_survives_outcomes_and_dead_letters(
    store: StatusStore,
) -> None:
    """GET /api/v1/requests/{id} shows a request only to the client that submitted it, so
    the PENDING record's client id must outlive every terminal write."""
    decided, dead = unique("r"), unique("r")
    for rid in (decided, dead):
        await store.put_pending(replace(pending(rid), client_id=f"client-of-{rid}"))
        assert store.get(rid).client_id == f"client-of-{rid}"  # type: ignore[union-attr]
    store.write_outcomes([logged(decided)])
    store.fail_pending([logged(dead, RequestState.FAILED, ReasonCode.INVALID_MESSAGE)])
    for rid, state in ((decided, RequestState.SUCCESS), (dead, RequestState.FAILED)):
        got = store.get(rid)
        assert got is not None
        assert (got.state, got.client_id) == (state, f"client-of-{rid}")
    anonymous = unique("r")
    await store.put_pending(pending(anonymous))
    store.write_outcomes([logged(anonymous)])
    assert store.get(anonymous).client_id is None  # type: ignore[union-attr]


def test_outcome_without_pending_record(store: StatusStore) -> None:
    """A decided request whose PENDING record is gone (expired, or a rebuilt status store)
    still ends terminal and readable."""
    rid = unique("r")
    store.write_outcomes([logged(rid, RequestState.FAILED, ReasonCode.STALE_VERSION)])
    got = store.get(rid)
    assert got is not None
    assert got.state is RequestState.FAILED


@pytest.mark.parametrize("store", ["dynamodb", "fake"], indirect=True)
async def test_withdraw_removes_only_pending(store: StatusStore) -> None:
    queued, unqueued = unique("r"), unique("r")
    await store.put_pending(pending(queued))
    await store.put_pending(pending(unqueued))
    store.write_outcomes([logged(queued)])
    await store.withdraw(unqueued)
    await store.withdraw(queued)
    assert store.get(unqueued) is None
    done = store.get(queued)
    assert done is not None
    assert done.state is RequestState.SUCCESS


async def test_many_at_once(store: StatusStore) -> None:
    rids = [unique("r") for _ in range(130)]
    await asyncio.gather(*(store.put_pending(pending(r)) for r in rids))
    store.write_outcomes([logged(r) for r in rids[:40]])
    outcomes = [logged(r) for r in rids]
    store.write_outcomes(outcomes + outcomes[:5])  # duplicates, and some already terminal
    assert all(store.get(r).state is RequestState.SUCCESS for r in rids)  # type: ignore[union-attr]


async def test_expired_records_are_hidden(store: StatusStore) -> None:
    rid = unique("r")
    await store.put_pending(pending(rid, datetime.now(UTC) - timedelta(days=8)))
    assert store.get(rid) is None
    assert store.get(unique("absent")) is None
    old = unique("r")
    store.write_outcomes([logged(old, decided_at=datetime.now(UTC) - timedelta(days=8))])
    assert store.get(old) is None  # expiry counts from the logged decision


async def test_a_status_file_from_before_authentication_gains_client_id(tmp_path: Path) -> None:
    path = tmp_path / "inbound.db"
    old, new = unique("r"), unique("r")
    at = datetime.now(UTC)
    conn = sqlite3.connect(path)
    with conn:
        before = ",\n    client_id TEXT,\n    batch_id TEXT,\n    batch_index INTEGER"
        assert before in STATUS_SCHEMA
        conn.executescript(STATUS_SCHEMA.replace(before, ""))
        conn.execute(
            "INSERT INTO request_status VALUES (?, 'PENDING', 'T1', 3, ?, ?, NULL, NULL, ?)",
            (old, at.isoformat(), at.isoformat(), int(at.timestamp()) + 3600),
        )
    conn.close()
    store = SqlitePending(path, ttl_days=7)
    store.ensure_schema()
    store.ensure_schema()  # and again: nothing left to add
    assert store.get(old).client_id is None  # type: ignore[union-attr]
    await store.put_pending(replace(pending(new), client_id="feed-1", batch_id="b", batch_index=0))
    assert store.get(new).client_id == "feed-1"  # type: ignore[union-attr]
    await store.put_batch(Batch("b", datetime.now(UTC), 1))
    assert [s.request_id for s in store.batch_items("b", None, None, 10)] == [new]


async def put_batch(
    store: StatusStore, states: list[RequestState | None], client_id: str | None = "feed-1"
) -> tuple[Batch, list[str]]:
    """A batch of ``len(states)`` items, each PENDING, then decided (an outcome) or failed
    (a dead letter) as ``states`` says (None: left PENDING), PENDING written in reverse
    order; the batch and its request ids by index."""
    batch = Batch(unique("b"), datetime.now(UTC), len(states), client_id)
    rids = [unique("r") for _ in states]
    for index in reversed(range(len(states))):
        item = replace(pending(rids[index]), client_id=client_id, batch_id=batch.batch_id)
        await store.put_pending(replace(item, batch_index=index))
    await store.put_batch(batch)
    store.write_outcomes(
        [
            logged(rid, state, ReasonCode.STALE_VERSION if state is FAILED else None)
            for rid, state in zip(rids, states, strict=True)
            if state is not None
        ]
    )
    return batch, rids


SUCCESS, FAILED = RequestState.SUCCESS, RequestState.FAILED


async def test_bulk_lookup_leaves_out_missing_and_expired_ids(store: StatusStore) -> None:
    waiting, done, expired, absent = (unique("r") for _ in range(4))
    await store.put_pending(pending(waiting))
    await store.put_pending(pending(done))
    await store.put_pending(pending(expired, datetime.now(UTC) - timedelta(days=8)))
    store.write_outcomes([logged(done)])
    found = store.get_many([waiting, absent, done, expired, waiting])
    assert {rid: s.state for rid, s in found.items()} == {
        waiting: RequestState.PENDING,
        done: RequestState.SUCCESS,
    }
    assert found[done] == store.get(done)
    assert store.get_many([]) == {}
    hundred = [unique("r") for _ in range(100)]
    await asyncio.gather(*(store.put_pending(pending(r)) for r in hundred[::2]))
    assert set(store.get_many(hundred)) == set(hundred[::2])  # BatchGetItem's most, at once


async def test_a_batchs_counts_are_its_items_statuses(store: StatusStore) -> None:
    states: list[RequestState | None] = [SUCCESS, None, FAILED, SUCCESS, None, None, FAILED]
    batch, rids = await put_batch(store, states)
    dead = rids[5]
    store.fail_pending([logged(dead, FAILED, ReasonCode.INVALID_MESSAGE)])
    states[5] = FAILED
    await put_batch(store, [SUCCESS, SUCCESS])  # another batch, not counted
    progress = store.batch(batch.batch_id)
    assert progress is not None
    assert progress.batch == batch
    items = store.batch_items(batch.batch_id, None, None, 1000)
    assert [s.state for s in items] == [s or RequestState.PENDING for s in states]
    counted = (progress.pending, progress.success, progress.failed)
    assert counted == (2, 2, 3)
    for state, count in zip(RequestState, counted, strict=True):
        assert sum(s.state is state for s in items) == count
    assert store.batch(unique("b")) is None
    assert store.batch_items(unique("b"), None, None, 10) == []


async def test_a_batchs_items_page_by_index_in_a_state(store: StatusStore) -> None:
    states: list[RequestState | None] = [SUCCESS, None, None, FAILED, None, SUCCESS, None]
    batch, rids = await put_batch(store, states)

    def pages(state: RequestState | None, limit: int) -> list[list[int]]:
        out: list[list[int]] = []
        after = None
        while page := store.batch_items(batch.batch_id, state, after, limit):
            out.append([s.batch_index for s in page])  # type: ignore[misc]
            after = page[-1].batch_index
        return out

    assert pages(None, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pages(RequestState.PENDING, 2) == [[1, 2], [4, 6]]
    assert pages(SUCCESS, 10) == [[0, 5]]
    assert pages(FAILED, 1) == [[3]]
    first = store.batch_items(batch.batch_id, None, None, 1)[0]
    assert (first.request_id, first.batch_id, first.client_id) == (
        rids[0],
        batch.batch_id,
        "feed-1",
    )


async def test_outcomes_and_dead_letters_keep_the_batch_fields(store: StatusStore) -> None:
    batch, (decided, dead) = await put_batch(store, [SUCCESS, None], client_id=None)
    store.fail_pending([logged(dead, FAILED, ReasonCode.INVALID_MESSAGE)])
    for index, rid in enumerate((decided, dead)):
        got = store.get(rid)
        assert got is not None
        assert got.state.terminal
        assert (got.batch_id, got.batch_index, got.client_id) == (batch.batch_id, index, None)
    single = unique("r")
    await store.put_pending(pending(single))
    store.write_outcomes([logged(single)])
    assert store.get(single).batch_id is None  # type: ignore[union-attr]


async def test_a_batch_record_is_never_a_request_and_expires(store: StatusStore) -> None:
    batch, _ = await put_batch(store, [None])
    key = f"batch/{batch.batch_id}"
    assert store.get(key) is None
    assert store.get_many([key, batch.batch_id]) == {}
    old = Batch(unique("b"), datetime.now(UTC) - timedelta(days=8), 0)
    await store.put_batch(old)
    assert store.batch(old.batch_id) is None


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
async def test_the_sweep_deletes_expired_batch_records(store: StatusStore) -> None:
    """SQLite's sweep does what DynamoDB's TTL does for batch records too."""
    assert isinstance(store, SqliteStatusStore)
    old = Batch(unique("b"), datetime.now(UTC) - timedelta(days=8), 0)
    young, _ = await put_batch(store, [None])
    await store.put_batch(old)
    store.delete_expired(datetime.now(UTC))
    with sqlite3.connect(store.path) as conn:
        kept = {row[0] for row in conn.execute("SELECT batch_id FROM batches")}
    assert young.batch_id in kept
    assert old.batch_id not in kept


async def test_the_batch_index_is_added_to_a_table_made_before_it(migrated: Settings) -> None:
    client = make_client(migrated.dynamodb_endpoint_url, migrated.aws_region)
    table = unique("before-batches")
    client.create_table(
        TableName=table,
        AttributeDefinitions=[{"AttributeName": "request_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "request_id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    try:
        store = DynamoStatusStore(client, table, ttl_days=7)
        at = datetime.now(UTC)
        item = replace(pending(unique("r"), at), batch_id="b1", batch_index=4)
        await store.put_pending(item)  # written before the index exists
        await store.put_batch(Batch("b1", at, 1))
        store.ensure_table()
        indexes = client.describe_table(TableName=table)["Table"]["GlobalSecondaryIndexes"]
        assert [(i["IndexName"], i["IndexStatus"]) for i in indexes] == [(BATCH_INDEX, "ACTIVE")]
        assert store.batch_items("b1", None, None, 10) == [item]  # backfilled
        assert store.batch("b1").pending == 1  # type: ignore[union-attr]
        assert client.get_item(TableName=table, Key={"request_id": {"S": BATCH_KEY + "b1"}})
        store.ensure_table()  # and again: nothing left to add
        store.close()
    finally:
        client.delete_table(TableName=table)


def test_ensure_table_is_idempotent(status_store: DynamoStatusStore) -> None:
    status_store.ensure_table()
    status_store.ping()


def test_unreachable_endpoint_is_unavailable() -> None:
    store = DynamoStatusStore(make_client("http://127.0.0.1:1", "us-east-1"), "t", 7)
    with pytest.raises(Unavailable):
        store.ping()


async def test_unreachable_endpoint_fails_pending_writes_as_unavailable() -> None:
    store = DynamoStatusStore(make_client("http://127.0.0.1:1", "us-east-1"), "t", 7)
    with pytest.raises(Unavailable):
        await store.put_pending(pending(unique("r")))
    store.close()


class DropOnReuse:
    """A TCP proxy to the status store that drops a connection when a second request comes
    on it, unanswered: what a server does when it closes an idle keep-alive connection just
    as the client reuses it."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.dropped = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        upstream, to_upstream = await asyncio.open_connection(*self.upstream)
        answered = asyncio.Event()

        async def back() -> None:
            while data := await upstream.read(65536):
                to_client.write(data)
                answered.set()

        pump = asyncio.create_task(back())
        while data := await client.read(65536):
            if answered.is_set():
                self.dropped += 1
                break
            to_upstream.write(data)
        pump.cancel()
        to_client.close()
        to_upstream.close()


async def test_pending_write_survives_a_keep_alive_connection_closed_on_reuse(
    migrated: Settings, status_store: DynamoStatusStore
) -> None:
    assert migrated.dynamodb_endpoint_url is not None
    proxy = DropOnReuse(migrated.dynamodb_endpoint_url)
    async with proxy as url:
        store = DynamoStatusStore(make_client(url, "us-east-1"), migrated.status_table, 7)
        first, second = unique("r"), unique("r")
        await store.put_pending(pending(first))
        await store.put_pending(pending(second))  # its connection is dropped, then retried
        store.close()
    assert proxy.dropped == 1
    for rid in (first, second):
        got = status_store.get(rid)
        assert got is not None
        assert got.state is RequestState.PENDING
