"""The DynamoDB status store on dynalite: the lifecycle and terminal finality."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from adapters.dynamodb import DynamoStatusStore, make_client
from domain.ports import Unavailable
from domain.status import Outcome, RequestState, RequestStatus
from domain.trade import ReasonCode
from tests.conftest import unique


def pending(rid: str, created: datetime | None = None) -> RequestStatus:
    at = created or datetime.now(UTC)
    return RequestStatus(rid, RequestState.PENDING, "T1", 3, at, at)


def test_lifecycle(status_store: DynamoStatusStore) -> None:
    rid = unique("r")
    status_store.put_pending(pending(rid))
    got = status_store.get(rid)
    assert got is not None
    assert got.state is RequestState.PENDING
    assert (got.trade_id, got.version) == ("T1", 3)
    status_store.complete([Outcome(rid, "T1", 3, RequestState.SUCCESS)])
    done = status_store.get(rid)
    assert done is not None
    assert done.state is RequestState.SUCCESS
    assert done.created_at == got.created_at
    assert done.updated_at >= got.updated_at


def test_terminal_is_final(status_store: DynamoStatusStore) -> None:
    rid = unique("r")
    status_store.put_pending(pending(rid))
    failed = Outcome(rid, "T1", 3, RequestState.FAILED, ReasonCode.STALE_VERSION, "stale")
    status_store.complete([failed])
    status_store.complete([Outcome(rid, "T1", 3, RequestState.SUCCESS)])
    status_store.put_pending(pending(rid))
    got = status_store.get(rid)
    assert got is not None
    assert got.state is RequestState.FAILED
    assert got.reason_code is ReasonCode.STALE_VERSION
    assert got.failure_reason == "stale"


def test_outcome_before_pending_is_kept(status_store: DynamoStatusStore) -> None:
    """The dataflow may finish before the API writes PENDING; PENDING must not overwrite it."""
    rid = unique("r")
    status_store.complete([Outcome(rid, "T1", 3, RequestState.SUCCESS)])
    status_store.put_pending(pending(rid))
    got = status_store.get(rid)
    assert got is not None
    assert got.state is RequestState.SUCCESS
    assert got.trade_id == "T1"


def test_many_outcomes_at_once(status_store: DynamoStatusStore) -> None:
    rids = [unique("r") for _ in range(60)]
    status_store.complete([Outcome(r, "T", 1, RequestState.SUCCESS) for r in rids])
    assert all(status_store.get(r).state is RequestState.SUCCESS for r in rids)  # type: ignore[union-attr]


def test_expired_records_are_hidden(status_store: DynamoStatusStore) -> None:
    rid = unique("r")
    status_store.put_pending(pending(rid, datetime.now(UTC) - timedelta(days=8)))
    assert status_store.get(rid) is None
    assert status_store.get(unique("absent")) is None


def test_ensure_table_is_idempotent(status_store: DynamoStatusStore) -> None:
    status_store.ensure_table()
    status_store.ping()


def test_unreachable_endpoint_is_unavailable() -> None:
    store = DynamoStatusStore(make_client("http://127.0.0.1:1", "us-east-1"), "t", 7)
    with pytest.raises(Unavailable):
        store.ping()
