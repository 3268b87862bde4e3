"""The status store on dynoxide (DynamoDB) and on SQLite: lifecycle and terminal finality.

Every test runs against both implementations of the one contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from adapters.dynamodb import DynamoStatusStore, make_client
from adapters.sqlite import SqliteStatusStore
from config.settings import Settings
from domain.ports import StatusStore, Unavailable
from domain.status import Outcome, RequestState, RequestStatus
from domain.trade import ReasonCode
from tests.conftest import unique


@pytest.fixture(scope="module", params=["dynamodb", "sqlite"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StatusStore]:
    if request.param == "dynamodb":
        yield request.getfixturevalue("status_store")
        return
    store = SqliteStatusStore(tmp_path_factory.mktemp("status") / "status.db", ttl_days=7)
    store.ensure_schema()
    yield store
    store.close()


def pending(rid: str, created: datetime | None = None) -> RequestStatus:
    at = created or datetime.now(UTC)
    return RequestStatus(rid, RequestState.PENDING, "T1", 3, at, at)


async def test_lifecycle(store: StatusStore) -> None:
    rid = unique("r")
    accepted = pending(rid)
    await store.put_pending(accepted)
    got = store.get(rid)
    assert got is not None
    assert got.state is RequestState.PENDING
    assert (got.trade_id, got.version) == ("T1", 3)
    store.complete([Outcome(rid, "T1", 3, RequestState.SUCCESS, accepted_at=accepted.created_at)])
    done = store.get(rid)
    assert done is not None
    assert done.state is RequestState.SUCCESS
    assert done.created_at == got.created_at
    assert done.updated_at >= got.updated_at


async def test_replayed_outcome_changes_nothing(store: StatusStore) -> None:
    rid = unique("r")
    await store.put_pending(pending(rid))
    failed = Outcome(rid, "T1", 3, RequestState.FAILED, ReasonCode.STALE_VERSION, "stale")
    store.complete([failed])
    store.complete([failed])
    got = store.get(rid)
    assert got is not None
    assert got.state is RequestState.FAILED
    assert got.reason_code is ReasonCode.STALE_VERSION
    assert got.failure_reason == "stale"


def test_outcome_without_pending_record(store: StatusStore) -> None:
    """A dead letter whose PENDING record is gone still ends FAILED and readable."""
    rid = unique("r")
    store.complete([Outcome(rid, "", 0, RequestState.FAILED, ReasonCode.INVALID_MESSAGE, "bad")])
    got = store.get(rid)
    assert got is not None
    assert got.state is RequestState.FAILED


async def test_withdraw_removes_only_pending(store: StatusStore) -> None:
    queued, unqueued = unique("r"), unique("r")
    await store.put_pending(pending(queued))
    await store.put_pending(pending(unqueued))
    store.complete([Outcome(queued, "T1", 3, RequestState.SUCCESS)])
    await store.withdraw(unqueued)
    await store.withdraw(queued)
    assert store.get(unqueued) is None
    done = store.get(queued)
    assert done is not None
    assert done.state is RequestState.SUCCESS


async def test_many_at_once(store: StatusStore) -> None:
    rids = [unique("r") for _ in range(60)]
    await asyncio.gather(*(store.put_pending(pending(r)) for r in rids))
    outcomes = [Outcome(r, "T", 1, RequestState.SUCCESS) for r in rids]
    store.complete(outcomes + outcomes[:5])  # duplicates in one call are fine
    assert all(store.get(r).state is RequestState.SUCCESS for r in rids)  # type: ignore[union-attr]


async def test_expired_records_are_hidden(store: StatusStore) -> None:
    rid = unique("r")
    await store.put_pending(pending(rid, datetime.now(UTC) - timedelta(days=8)))
    assert store.get(rid) is None
    assert store.get(unique("absent")) is None


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
