"""The DynamoDB request-status store (boto3), also served locally by dynalite."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from config.clock import utc_now
from domain.ports import Unavailable
from domain.status import Outcome, RequestState, RequestStatus
from domain.trade import ReasonCode

CONDITION_FAILED = "ConditionalCheckFailedException"
# Codes that mean "try again later", not "your request is wrong".
TRANSIENT = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "ResourceNotFoundException",
}


def make_client(endpoint_url: str | None, region: str, pool: int = 32) -> Any:
    """A thread-safe low-level client; short timeouts so an outage is noticed quickly."""
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            max_pool_connections=pool,
            connect_timeout=2,
            read_timeout=5,
            retries={"mode": "standard", "max_attempts": 3},
        ),
    )


def _item(status: RequestStatus, expires_at: int) -> dict[str, Any]:
    item: dict[str, Any] = {
        "request_id": {"S": status.request_id},
        "status": {"S": status.state.value},
        "trade_id": {"S": status.trade_id},
        "version": {"N": str(status.version)},
        "created_at": {"S": status.created_at.isoformat()},
        "updated_at": {"S": status.updated_at.isoformat()},
        "expires_at": {"N": str(expires_at)},
    }
    if status.reason_code is not None:
        item["reason_code"] = {"S": status.reason_code.value}
    if status.failure_reason is not None:
        item["failure_reason"] = {"S": status.failure_reason}
    return item


def _status(item: dict[str, Any]) -> RequestStatus:
    return RequestStatus(
        request_id=item["request_id"]["S"],
        state=RequestState(item["status"]["S"]),
        trade_id=item["trade_id"]["S"],
        version=int(item["version"]["N"]),
        created_at=datetime.fromisoformat(item["created_at"]["S"]),
        updated_at=datetime.fromisoformat(item["updated_at"]["S"]),
        reason_code=ReasonCode(item["reason_code"]["S"]) if "reason_code" in item else None,
        failure_reason=item.get("failure_reason", {}).get("S"),
    )


class DynamoStatusStore:
    """Status store on DynamoDB; terminal states are final by conditional writes."""

    def __init__(self, client: Any, table: str, ttl_days: int, writers: int = 16) -> None:
        self._client = client
        self._table = table
        self._ttl = timedelta(days=ttl_days)
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="status-writer")

    def _expires_at(self, now: datetime) -> int:
        return int((now + self._ttl).timestamp())

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, operation)(TableName=self._table, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in TRANSIENT:
                raise Unavailable(f"status store {operation}: {code}") from exc
            raise
        except BotoCoreError as exc:
            raise Unavailable(f"status store {operation}: {exc}") from exc

    def put_pending(self, status: RequestStatus) -> None:
        try:
            self._call(
                "put_item",
                Item=_item(status, self._expires_at(status.created_at)),
                ConditionExpression="attribute_not_exists(request_id)",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != CONDITION_FAILED:
                raise

    def _complete_one(self, outcome: Outcome, now: datetime) -> None:
        values: dict[str, Any] = {
            ":state": {"S": outcome.state.value},
            ":pending": {"S": RequestState.PENDING.value},
            ":trade_id": {"S": outcome.trade_id},
            ":version": {"N": str(outcome.version)},
            ":now": {"S": now.isoformat()},
            ":expires": {"N": str(self._expires_at(now))},
        }
        sets = [
            "#s = :state",
            "trade_id = :trade_id",
            "version = :version",
            "updated_at = :now",
            "created_at = if_not_exists(created_at, :now)",
            "expires_at = :expires",
        ]
        if outcome.reason_code is not None:
            values[":code"] = {"S": outcome.reason_code.value}
            sets.append("reason_code = :code")
        if outcome.failure_reason is not None:
            values[":reason"] = {"S": outcome.failure_reason}
            sets.append("failure_reason = :reason")
        try:
            self._call(
                "update_item",
                Key={"request_id": {"S": outcome.request_id}},
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression="attribute_not_exists(request_id) OR #s = :pending",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != CONDITION_FAILED:
                raise

    def complete(self, outcomes: Sequence[Outcome]) -> None:
        now = utc_now()
        # list() re-raises the first failure after every write has been attempted.
        list(self._pool.map(lambda o: self._complete_one(o, now), outcomes))

    def get(self, request_id: str) -> RequestStatus | None:
        reply = self._call("get_item", Key={"request_id": {"S": request_id}}, ConsistentRead=True)
        item = reply.get("Item")
        # DynamoDB deletes expired items lazily (and emulators never): hide them on read.
        if not item or int(item["expires_at"]["N"]) < utc_now().timestamp():
            return None
        return _status(item)

    def ping(self) -> None:
        self._call("describe_table")

    def ensure_table(self, timeout_s: float = 30.0) -> None:
        """Create the table (on-demand billing, TTL on ``expires_at``) if it does not exist."""
        try:
            self._client.create_table(
                TableName=self._table,
                AttributeDefinitions=[{"AttributeName": "request_id", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "request_id", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
        deadline = time.monotonic() + timeout_s
        while self._client.describe_table(TableName=self._table)["Table"]["TableStatus"] != (
            "ACTIVE"
        ):
            if time.monotonic() > deadline:
                raise Unavailable(f"table {self._table} did not become ACTIVE")
            time.sleep(0.2)
        self._enable_ttl()

    def _enable_ttl(self) -> None:
        try:
            self._client.update_time_to_live(
                TableName=self._table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            # Already enabled, or an emulator without the TTL API: expires_at is still written.
            if code not in {"ValidationException", "UnknownOperationException"}:
                raise
