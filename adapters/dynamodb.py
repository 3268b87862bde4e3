"""The DynamoDB request-status store (boto3), also served locally by dynalite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import boto3
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.batching import Batcher
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
            parameter_validation=False,  # our items are built by _item(), already well-formed
        ),
    )


class BatchWriter:
    """BatchWriteItem with a body serialised in one orjson call, signed by botocore.

    botocore's generic serializer walks its service model for every attribute of every
    item: about 75 µs of CPU per item here, the largest single cost of both the API's
    PENDING writes and the processor's outcomes. This sends the same request, signed with
    the client's own credentials and SigV4, over the client's own HTTP session.
    """

    TARGET = "DynamoDB_20120810.BatchWriteItem"

    def __init__(self, client: Any, table: str) -> None:
        self._table = table
        self._url = client.meta.endpoint_url
        self._region = client.meta.region_name
        self._credentials = client._request_signer._credentials
        self._http = client._endpoint.http_session

    def _send(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        request = AWSRequest(
            method="POST",
            url=self._url,
            data=orjson.dumps({"RequestItems": {self._table: requests}}),
            headers={
                "Content-Type": "application/x-amz-json-1.0",
                "X-Amz-Target": self.TARGET,
            },
        )
        SigV4Auth(self._credentials.get_frozen_credentials(), "dynamodb", self._region).add_auth(
            request
        )
        try:
            response = self._http.send(request.prepare())
        except BotoCoreError as exc:
            raise Unavailable(f"status store batch_write_item: {exc}") from exc
        body: dict[str, Any] = orjson.loads(response.content) if response.content else {}
        if response.status_code == 200:
            return body
        code = str(body.get("__type", "")).rpartition("#")[2]
        if response.status_code >= 500 or code in TRANSIENT:
            raise Unavailable(f"status store batch_write_item: {code or response.status_code}")
        raise RuntimeError(f"status store batch_write_item: {code}: {body.get('message')}")

    def put_all(self, items: list[dict[str, Any]]) -> None:
        """Put up to 25 items, retrying whatever DynamoDB leaves unprocessed."""
        requests = [{"PutRequest": {"Item": item}} for item in items]
        delay = 0.02
        for _ in range(10):
            requests = self._send(requests).get("UnprocessedItems", {}).get(self._table, [])
            if not requests:
                return
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise Unavailable(f"status store: {len(requests)} items left unprocessed")


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


BATCH = 25  # BatchWriteItem's limit


class DynamoStatusStore:
    """Status store on DynamoDB, written in BatchWriteItem batches.

    Batched puts cannot be conditional, so correctness comes from ordering instead: the API
    writes PENDING before it queues the trade (the request id is fresh, nothing to clobber),
    and every later write is a terminal outcome that the decision log makes identical on
    every replay, so rewriting it changes nothing. Terminal states are therefore final.
    """

    def __init__(self, client: Any, table: str, ttl_days: int, writers: int = 8) -> None:
        self._client = client
        self._table = table
        self._ttl = timedelta(days=ttl_days)
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="status-writer")
        self._pending: Batcher[dict[str, Any]] | None = None
        self._writer = BatchWriter(client, table)

    def _expires_at(self, now: datetime) -> int:
        return int((now + self._ttl).timestamp())

    def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, operation)(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in TRANSIENT:
                raise Unavailable(f"status store {operation}: {code}") from exc
            raise
        except BotoCoreError as exc:
            raise Unavailable(f"status store {operation}: {exc}") from exc

    async def put_pending(self, status: RequestStatus) -> None:
        if self._pending is None:
            self._pending = Batcher(
                # One call in flight: requests arriving meanwhile share the next batch.
                self._writer.put_all,
                max_batch=BATCH,
                writers=1,
                name="pending",
            )
        await self._pending.submit(_item(status, self._expires_at(status.created_at)))

    async def withdraw(self, request_id: str) -> None:
        try:
            await asyncio.to_thread(
                self._call,
                "delete_item",
                TableName=self._table,
                Key={"request_id": {"S": request_id}},
                ConditionExpression="#s = :pending",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={":pending": {"S": RequestState.PENDING.value}},
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != CONDITION_FAILED:
                raise

    def complete(self, outcomes: Sequence[Outcome]) -> None:
        now = utc_now()
        items = {
            o.request_id: _item(
                RequestStatus(
                    request_id=o.request_id,
                    state=o.state,
                    trade_id=o.trade_id,
                    version=o.version,
                    created_at=o.accepted_at or now,
                    updated_at=now,
                    reason_code=o.reason_code,
                    failure_reason=o.failure_reason,
                ),
                self._expires_at(now),
            )
            for o in outcomes
        }
        chunks = [list(items.values())[i : i + BATCH] for i in range(0, len(items), BATCH)]
        # list() re-raises the first failure after every chunk has been attempted.
        list(self._pool.map(self._writer.put_all, chunks))

    def get(self, request_id: str) -> RequestStatus | None:
        reply = self._call(
            "get_item",
            TableName=self._table,
            Key={"request_id": {"S": request_id}},
            ConsistentRead=True,
        )
        item = reply.get("Item")
        # DynamoDB deletes expired items lazily (and emulators never): hide them on read.
        if not item or int(item["expires_at"]["N"]) < utc_now().timestamp():
            return None
        return _status(item)

    def ping(self) -> None:
        self._call("describe_table", TableName=self._table)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.close()
        self._pool.shutdown(wait=True)

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
