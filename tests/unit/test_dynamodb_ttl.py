"""Turning TTL on at set-up: which refusals are fine, which are warned about, which fail."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import structlog
from botocore.stub import Stubber
from structlog.testing import capture_logs
from structlog.typing import EventDict

from adapters import dynamodb
from adapters.dynamodb import BATCH_INDEX, DynamoStatusStore

TABLE = "trade-requests"
TTL_SPEC = {"Enabled": True, "AttributeName": "expires_at"}


@pytest.fixture
def stubbed() -> Iterator[tuple[DynamoStatusStore, Stubber]]:
    """A store whose client answers from a queue of canned replies, in call order."""
    client = boto3.client(
        "dynamodb",
        endpoint_url="http://127.0.0.1:1",
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    with Stubber(client) as stubber:
        stubber.add_client_error("create_table", "ResourceInUseException")
        index = {"IndexName": BATCH_INDEX, "IndexStatus": "ACTIVE"}
        table = {"TableStatus": "ACTIVE", "GlobalSecondaryIndexes": [index]}
        stubber.add_response("describe_table", {"Table": table})
        store = DynamoStatusStore(client, TABLE, ttl_days=7, writers=1)
        yield store, stubber
        store.close()
        stubber.assert_no_pending_responses()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[EventDict]]:
    """What the store logs, through a logger of its own: the module's may be cached with the
    processors of an earlier test's logging set-up that a later one replaced (each
    create_app configures logging), and would write past the capture."""
    with capture_logs() as captured:
        monkeypatch.setattr(dynamodb, "log", structlog.get_logger("adapters"))
        yield captured


def refuse_update(stubber: Stubber, code: str, message: str = "") -> None:
    stubber.add_client_error(
        "update_time_to_live",
        code,
        message,
        expected_params={"TableName": TABLE, "TimeToLiveSpecification": TTL_SPEC},
    )


def describe(stubber: Stubber, **description: Any) -> None:
    stubber.add_response(
        "describe_time_to_live",
        {"TimeToLiveDescription": description},
        expected_params={"TableName": TABLE},
    )


def test_an_endpoint_without_the_ttl_api_is_warned_about(
    stubbed: tuple[DynamoStatusStore, Stubber],
    logs: list[EventDict],
) -> None:
    store, stubber = stubbed
    refuse_update(stubber, "UnknownOperationException")
    store.ensure_table()
    (warning,) = logs
    assert warning["log_level"] == "warning"
    assert "TTL NOT enabled" in warning["event"]
    assert warning["table"] == TABLE


def test_ttl_already_on_expires_at_is_fine(
    stubbed: tuple[DynamoStatusStore, Stubber], logs: list[EventDict]
) -> None:
    store, stubber = stubbed
    refuse_update(stubber, "ValidationException", "TimeToLive is already enabled")
    describe(stubber, TimeToLiveStatus="ENABLED", AttributeName="expires_at")
    store.ensure_table()
    assert logs == []


def test_ttl_on_another_attribute_is_an_error(stubbed: tuple[DynamoStatusStore, Stubber]) -> None:
    store, stubber = stubbed
    refuse_update(stubber, "ValidationException", "TimeToLive is active on a different attribute")
    describe(stubber, TimeToLiveStatus="ENABLED", AttributeName="ttl")
    with pytest.raises(RuntimeError, match=r"could not enable TTL on trade-requests\.expires_at"):
        store.ensure_table()


def test_any_other_refusal_is_an_error(stubbed: tuple[DynamoStatusStore, Stubber]) -> None:
    store, stubber = stubbed
    refuse_update(stubber, "AccessDeniedException", "not allowed: dynamodb:UpdateTimeToLive")
    with pytest.raises(RuntimeError, match="AccessDeniedException: not allowed"):
        store.ensure_table()
