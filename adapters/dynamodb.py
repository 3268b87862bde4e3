"""The DynamoDB request-status store, also served locally by dynoxide: its batch calls
through adapters.dynamodb_wire, the rest through boto3."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.batching import Batcher
from adapters.dynamodb_wire import (
    CONNECT_TIMEOUT_S,
    GET_BATCH,
    READ_TIMEOUT_S,
    TRANSIENT,
    WRITE_BATCH,
    AsyncBatchWriter,
    BatchWriter,
)
from config.clock import utc_now
from domain.ports import Unavailable
from domain.status import Batch, BatchProgress, Outcome, ReasonCode, RequestState, RequestStatus

log = structlog.get_logger("adapters")

CONDITION_FAILED = "ConditionalCheckFailedException"
# The health probe's key: no request has it (request ids are UUIDs), so deleting it writes
# nothing, yet DynamoDB authorises, meters and applies it as a write.
HEALTH_KEY = "health-probe"
# A batch record's key: ``batch/<batch_id>`` in the statuses' table. A request id never
# holds a "/", so no request can be read as a batch record, or the other way round.
BATCH_KEY = "batch/"
# The sparse index of the requests that came in a batch: (batch_id, batch_index), every
# attribute projected; a single POST's record has neither key and is not in it.
BATCH_INDEX = "batch_items"
BATCH_INDEX_SPEC = {
    "IndexName": BATCH_INDEX,
    "KeySchema": [
        {"AttributeName": "batch_id", "KeyType": "HASH"},
        {"AttributeName": "batch_index", "KeyType": "RANGE"},
    ],
    "Projection": {"ProjectionType": "ALL"},
}
ATTRIBUTES = [
    {"AttributeName": "request_id", "AttributeType": "S"},
    {"AttributeName": "batch_id", "AttributeType": "S"},
    {"AttributeName": "batch_index", "AttributeType": "N"},
]
# Items read per Query page when a state filter drops some (DynamoDB's Limit counts the
# items read, before the filter).
FILTERED_PAGE = 1000


def make_client(endpoint_url: str | None, region: str, pool: int = 32) -> Any:
    """A thread-safe low-level client; short timeouts and one retry (a keep-alive
    connection the server closed), so a call to a hung store ends within two read timeouts
    and an API read is answered 503 in time; the sinks retry with backoff themselves."""
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            max_pool_connections=pool,
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"mode": "standard", "max_attempts": 2},
            parameter_validation=False,  # our items are built by status_item(), well-formed
        ),
    )


def status_item(status: RequestStatus, expires_at: int) -> dict[str, Any]:
    """A status as the table holds it (what the bench's ceiling writes too)."""
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
    if status.client_id is not None:
        item["client_id"] = {"S": status.client_id}
    if status.batch_id is not None:
        item["batch_id"] = {"S": status.batch_id}
    if status.batch_index is not None:
        item["batch_index"] = {"N": str(status.batch_index)}
    return item


def batch_item(batch: Batch, expires_at: int) -> dict[str, Any]:
    """A batch record as the table holds it: under ``BATCH_KEY``, without the index's keys."""
    item: dict[str, Any] = {
        "request_id": {"S": BATCH_KEY + batch.batch_id},
        "created_at": {"S": batch.created_at.isoformat()},
        "accepted": {"N": str(batch.accepted)},
        "expires_at": {"N": str(expires_at)},
    }
    if batch.client_id is not None:
        item["client_id"] = {"S": batch.client_id}
    return item


def _live(item: dict[str, Any] | None) -> bool:
    """DynamoDB deletes expired items lazily (and emulators never): hide them on read."""
    return item is not None and int(item["expires_at"]["N"]) >= utc_now().timestamp()


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
        client_id=item.get("client_id", {}).get("S"),
        batch_id=item.get("batch_id", {}).get("S"),
        batch_index=int(item["batch_index"]["N"]) if "batch_index" in item else None,
    )


# Tries to delete abandoned PENDING records while the store recovers; after that they
# expire with the status TTL (nobody holds their ids).
UNDO_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 16.0)
UNDO_CONFIRM_S = 2.0


class DynamoStatusStore:
    """Status store on DynamoDB, written in BatchWriteItem batches.

    Batched puts cannot be conditional, so ``complete`` first reads which of its requests
    are terminal already (BatchGetItem, consistent) and puts only the others, each with the
    client id its PENDING record names (a put replaces the whole item). That is a
    check, then a write, not one atomic step: it holds because one request's outcomes come
    from one worker of one dataflow, in order. The API writes PENDING before it queues the
    trade (the request id is fresh, nothing to clobber); dead letters use conditional
    updates, one per letter (they are rare).
    """

    def __init__(self, client: Any, table: str, ttl_days: int, writers: int = 8) -> None:
        self._client = client
        self._table = table
        self._ttl = timedelta(days=ttl_days)
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="status-writer")
        self._writer = BatchWriter(client, table)
        self._pending_writer = AsyncBatchWriter(client, table)
        # One call in flight: requests arriving meanwhile share the next batch.
        self._pending = Batcher(
            self._pending_writer.put_all, max_batch=WRITE_BATCH, writers=1, abandoned=self._undo
        )
        self._undoing: set[asyncio.Task[None]] = set()

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
        await self._pending.submit(status_item(status, self._expires_at(status.created_at)))

    def _undo(self, items: list[dict[str, Any]]) -> None:
        """Delete PENDING records whose callers gave up while they were being written."""
        task = asyncio.get_running_loop().create_task(self._delete(items))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def _delete(self, items: list[dict[str, Any]]) -> None:
        """Unconditional: nobody was given these ids and none was queued, so no outcome
        exists. Deleted twice, ``UNDO_CONFIRM_S`` apart: a put a frozen store still held
        when the first delete came may be applied after it."""
        deleted = 0
        for delay in UNDO_BACKOFF_S:
            try:
                await self._pending_writer.delete_all(items)
                deleted += 1
                if deleted == 2:
                    return
                await asyncio.sleep(UNDO_CONFIRM_S)
            except Unavailable:
                await asyncio.sleep(delay)
        log.warning("could not delete abandoned PENDING records", count=len(items))

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

    def write_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        items = {
            o.request_id: status_item(o.as_status(), self._expires_at(o.logged_at()))
            for o in outcomes
        }
        ids = list(items)
        reads = [ids[i : i + GET_BATCH] for i in range(0, len(ids), GET_BATCH)]
        stored: dict[str, dict[str, Any]] = {}
        for part in self._pool.map(self._writer.stored, reads):
            stored |= part
        puts = []
        for rid, item in items.items():
            old = stored.get(rid, {})
            if old and old["status"]["S"] != RequestState.PENDING.value:
                continue  # terminal is final
            # A put replaces the item: keep who submitted it, and in which batch.
            for kept in ("client_id", "batch_id", "batch_index"):
                if kept in old:
                    item[kept] = old[kept]
            puts.append(item)
        chunks = [puts[i : i + WRITE_BATCH] for i in range(0, len(puts), WRITE_BATCH)]
        # list() re-raises the first failure after every chunk has been attempted.
        list(self._pool.map(self._writer.put_all, chunks))

    def fail_pending(self, outcomes: Sequence[Outcome]) -> None:
        for o in outcomes:
            values: dict[str, Any] = {
                ":pending": {"S": RequestState.PENDING.value},
                ":state": {"S": o.state.value},
                ":updated": {"S": o.logged_at().isoformat()},
                ":expires": {"N": str(self._expires_at(o.logged_at()))},
            }
            sets = ["#s = :state", "updated_at = :updated", "expires_at = :expires"]
            if o.reason_code is not None:
                values[":code"] = {"S": o.reason_code.value}
                sets.append("reason_code = :code")
            if o.failure_reason is not None:
                values[":reason"] = {"S": o.failure_reason}
                sets.append("failure_reason = :reason")
            try:
                self._call(
                    "update_item",
                    TableName=self._table,
                    Key={"request_id": {"S": o.request_id}},
                    UpdateExpression="SET " + ", ".join(sets),
                    ConditionExpression="#s = :pending",
                    ExpressionAttributeNames={"#s": "status"},
                    ExpressionAttributeValues=values,
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != CONDITION_FAILED:
                    raise

    async def put_batch(self, batch: Batch) -> None:
        await asyncio.to_thread(
            self._call,
            "put_item",
            TableName=self._table,
            Item=batch_item(batch, self._expires_at(batch.created_at)),
        )

    def _item(self, key: str) -> dict[str, Any] | None:
        reply = self._call(
            "get_item", TableName=self._table, Key={"request_id": {"S": key}}, ConsistentRead=True
        )
        item: dict[str, Any] | None = reply.get("Item")
        return item if _live(item) else None

    def get(self, request_id: str) -> RequestStatus | None:
        if "/" in request_id:  # never a request's: a batch record's key
            return None
        item = self._item(request_id)
        return _status(item) if item else None

    def get_many(self, request_ids: Sequence[str]) -> dict[str, RequestStatus]:
        wanted = list(dict.fromkeys(rid for rid in request_ids if "/" not in rid))
        if len(wanted) > GET_BATCH:
            raise ValueError(f"at most {GET_BATCH} request ids at once")
        found = self._writer.items(wanted) if wanted else {}
        return {rid: _status(item) for rid, item in found.items() if _live(item)}

    def batch_record(self, batch_id: str) -> Batch | None:
        item = self._item(BATCH_KEY + batch_id)
        if item is None:
            return None
        return Batch(
            batch_id=batch_id,
            created_at=datetime.fromisoformat(item["created_at"]["S"]),
            accepted=int(item["accepted"]["N"]),
            client_id=item.get("client_id", {}).get("S"),
        )

    def _query(
        self,
        batch_id: str,
        after: int,
        state: RequestState | None,
        limit: int | None,
        projection: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The batch's live requests above ``after`` by batch_index, from the index (which
        is eventually consistent: a write may show a moment later), page by page."""
        values: dict[str, Any] = {
            ":b": {"S": batch_id},
            ":after": {"N": str(after)},
            ":now": {"N": str(int(utc_now().timestamp()))},
        }
        where = "expires_at >= :now"
        if state is not None:
            values[":state"] = {"S": state.value}
            where += " AND #s = :state"
        query: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": BATCH_INDEX,
            "KeyConditionExpression": "batch_id = :b AND batch_index > :after",
            "FilterExpression": where,
            "ExpressionAttributeValues": values,
        }
        if projection is not None:
            query["ProjectionExpression"] = projection
        if "#s" in where or projection:  # DynamoDB refuses a name no expression uses
            query["ExpressionAttributeNames"] = {"#s": "status"}
        if limit is not None:
            query["Limit"] = limit if state is None else max(limit, FILTERED_PAGE)
        while True:
            reply = self._call("query", **query)
            yield from reply.get("Items", [])
            if "LastEvaluatedKey" not in reply:
                return
            query["ExclusiveStartKey"] = reply["LastEvaluatedKey"]

    def batch(self, batch_id: str) -> BatchProgress | None:
        header = self.batch_record(batch_id)
        if header is None:
            return None
        counts = Counter(i["status"]["S"] for i in self._query(batch_id, -1, None, None, "#s"))
        return BatchProgress(
            batch=header,
            pending=counts[RequestState.PENDING.value],
            success=counts[RequestState.SUCCESS.value],
            failed=counts[RequestState.FAILED.value],
        )

    def batch_items(
        self, batch_id: str, state: RequestState | None, after: int | None, limit: int
    ) -> list[RequestStatus]:
        items = self._query(batch_id, -1 if after is None else after, state, limit)
        return [_status(item) for item in islice(items, limit)]

    def ping(self) -> None:
        """Raise Unavailable unless the table takes a write: an unconditional DeleteItem of
        ``HEALTH_KEY`` (the API role's DeleteItem permission; no PutItem needed, nothing
        left behind). Any refusal counts, a missing permission too."""
        try:
            self._call("delete_item", TableName=self._table, Key={"request_id": {"S": HEALTH_KEY}})
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise Unavailable(f"status store delete_item: {code}") from exc

    def close(self) -> None:
        self._pending_writer.close()
        self._pool.shutdown(wait=True)

    def ensure_table(self, timeout_s: float = 30.0) -> None:
        """Create the table (on-demand billing, TTL on ``expires_at``, the ``batch_items``
        index) if it does not exist; add the index to a table made before it."""
        try:
            self._client.create_table(
                TableName=self._table,
                AttributeDefinitions=ATTRIBUTES,
                KeySchema=[{"AttributeName": "request_id", "KeyType": "HASH"}],
                GlobalSecondaryIndexes=[BATCH_INDEX_SPEC],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceInUseException":
                raise
        table = self._wait_active(timeout_s)
        if not any(i["IndexName"] == BATCH_INDEX for i in table.get("GlobalSecondaryIndexes", [])):
            self._client.update_table(
                TableName=self._table,
                AttributeDefinitions=ATTRIBUTES[1:],
                GlobalSecondaryIndexUpdates=[{"Create": BATCH_INDEX_SPEC}],
            )
            self._wait_active(timeout_s)
        self._enable_ttl()

    def _wait_active(self, timeout_s: float) -> dict[str, Any]:
        """The table's description once it and its indexes are ACTIVE (an index added to a
        table with items is backfilled first: queries on it fail until then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            table: dict[str, Any] = self._client.describe_table(TableName=self._table)["Table"]
            indexes = table.get("GlobalSecondaryIndexes", [])
            if table["TableStatus"] == "ACTIVE" and all(
                i.get("IndexStatus") == "ACTIVE" for i in indexes
            ):
                return table
            if time.monotonic() > deadline:
                raise Unavailable(f"table {self._table} did not become ACTIVE")
            time.sleep(0.2)

    def _enable_ttl(self) -> None:
        """Turn TTL on for ``expires_at``; an endpoint without the TTL API is a warning, since
        reads hide expired statuses anyway, but nothing then deletes them."""
        try:
            self._client.update_time_to_live(
                TableName=self._table,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires_at"},
            )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            if code == "UnknownOperationException":
                log.warning(
                    "status store: TTL NOT enabled, the endpoint does not implement "
                    "UpdateTimeToLive; expired statuses are hidden but never deleted",
                    table=self._table,
                    endpoint=self._client.meta.endpoint_url,
                )
                return
            # DynamoDB refuses to enable TTL twice with a ValidationException; any other
            # refusal (TTL on another attribute, changed too often) is an error.
            if code != "ValidationException" or not self._ttl_on():
                raise RuntimeError(
                    f"status store: could not enable TTL on {self._table}.expires_at: "
                    f"{code}: {error.get('Message', '')}"
                ) from exc

    def _ttl_on(self) -> bool:
        ttl = self._client.describe_time_to_live(TableName=self._table)
        description = ttl.get("TimeToLiveDescription", {})
        return bool(
            description.get("TimeToLiveStatus") in {"ENABLED", "ENABLING"}
            and description.get("AttributeName") == "expires_at"
        )
