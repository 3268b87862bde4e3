"""The DynamoDB request-status store (boto3), also served locally by dynoxide."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, cast
from urllib.parse import urlsplit

import boto3
import httptools
import orjson
import structlog
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from adapters.batching import Batcher
from config.clock import utc_now
from domain.ports import Unavailable
from domain.status import Outcome, RequestState, RequestStatus
from domain.trade import ReasonCode

log = structlog.get_logger("adapters")

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


CONNECT_TIMEOUT_S = 2
READ_TIMEOUT_S = 2


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
            parameter_validation=False,  # our items are built by _item(), already well-formed
        ),
    )


class _Signer:
    """Signs DynamoDB JSON API calls with the client's own credentials (botocore's SigV4)."""

    def __init__(self, client: Any) -> None:
        self.url = client.meta.endpoint_url
        parts = urlsplit(self.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        default = 443 if self.https else 80
        self.port = parts.port or default
        # The Host header as SigV4 signs it: without the scheme's default port.
        self.netloc = self.host if self.port == default else f"{self.host}:{self.port}"
        self._region = client.meta.region_name
        self._credentials = client._request_signer._credentials

    def sign(self, target: str, body: bytes) -> AWSRequest:
        request = AWSRequest(
            method="POST",
            url=self.url,
            data=body,
            headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": target},
        )
        credentials = self._credentials.get_frozen_credentials()
        SigV4Auth(credentials, "dynamodb", self._region).add_auth(request)
        return request


def _batch_body(table: str, requests: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"RequestItems": {table: requests}})


def _reply(status: int, content: bytes, operation: str) -> dict[str, Any]:
    """A JSON API reply's body; Unavailable for throttling and 5xx, RuntimeError for any
    other error."""
    body: dict[str, Any] = orjson.loads(content) if content else {}
    if status == 200:
        return body
    code = str(body.get("__type", "")).rpartition("#")[2]
    if status >= 500 or code in TRANSIENT:
        raise Unavailable(f"status store {operation}: {code or status}")
    raise RuntimeError(f"status store {operation}: {code}: {body.get('message')}")


def _unprocessed(status: int, content: bytes, table: str) -> list[dict[str, Any]]:
    """The put requests a BatchWriteItem reply left unprocessed."""
    body = _reply(status, content, "batch_write_item")
    left: list[dict[str, Any]] = body.get("UnprocessedItems", {}).get(table, [])
    return left


# Delays between BatchWriteItem rounds while DynamoDB leaves items unprocessed.
BACKOFF_S = tuple(min(0.02 * 2**i, 1.0) for i in range(9))


BATCH_TARGET = "DynamoDB_20120810.BatchWriteItem"
GET_TARGET = "DynamoDB_20120810.BatchGetItem"
GET_BATCH = 100  # BatchGetItem's limit


class BatchWriter:
    """BatchWriteItem with a body serialised in one orjson call, signed by botocore.

    botocore's generic serializer walks its service model for every attribute of every
    item: about 75 µs of CPU per item here, the largest single cost of the processor's
    outcomes. This sends the same request, signed with the client's own credentials and
    SigV4, over the client's own HTTP session (blocking: for the processor's threads).
    """

    def __init__(self, client: Any, table: str) -> None:
        self._table = table
        self._signer = _Signer(client)
        self._http = client._endpoint.http_session

    def _post(self, target: str, body: bytes) -> tuple[int, bytes]:
        request = self._signer.sign(target, body)
        try:
            response = self._http.send(request.prepare())
        except BotoCoreError as exc:
            raise Unavailable(f"status store {target}: {exc}") from exc
        return response.status_code, response.content

    def _send(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        status, content = self._post(BATCH_TARGET, _batch_body(self._table, requests))
        return _unprocessed(status, content, self._table)

    def terminal(self, request_ids: list[str]) -> set[str]:
        """Which of up to 100 request ids hold a terminal status (consistent reads)."""
        keys = [{"request_id": {"S": rid}} for rid in request_ids]
        found: set[str] = set()
        for delay in (0.0, *BACKOFF_S):
            if not keys:
                return found
            time.sleep(delay)
            wanted = {
                "Keys": keys,
                "ConsistentRead": True,
                "ProjectionExpression": "request_id, #s",
                "ExpressionAttributeNames": {"#s": "status"},
            }
            status, content = self._post(
                GET_TARGET, orjson.dumps({"RequestItems": {self._table: wanted}})
            )
            body = _reply(status, content, "batch_get_item")
            for item in body.get("Responses", {}).get(self._table, []):
                if item["status"]["S"] != RequestState.PENDING.value:
                    found.add(item["request_id"]["S"])
            keys = body.get("UnprocessedKeys", {}).get(self._table, {}).get("Keys", [])
        raise Unavailable(f"status store: {len(keys)} keys left unread")

    def put_all(self, items: list[dict[str, Any]]) -> None:
        """Put up to 25 items, retrying whatever DynamoDB leaves unprocessed."""
        requests = self._send([{"PutRequest": {"Item": item}} for item in items])
        for delay in BACKOFF_S:
            if not requests:
                return
            time.sleep(delay)
            requests = self._send(requests)
        if requests:
            raise Unavailable(f"status store: {len(requests)} items left unprocessed")


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one exchange at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._reply: asyncio.Future[tuple[int, bytes]] | None = None
        self._transport: asyncio.Transport | None = None
        self.reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.loop = asyncio.get_running_loop()
        self.reusable = True

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self._parser.should_keep_alive()
        reply, self._reply = self._reply, None
        if reply is not None and not reply.done():
            reply.set_result((self._parser.get_status_code(), b"".join(self._body)))
        self._body = []

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionResetError("connection closed by the status store"))

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(exc)

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("connection closed by the status store")
        self._reply = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return await self._reply

    def close(self) -> None:
        self.reusable = False
        if self._transport is not None:
            self._transport.close()


class AsyncBatchWriter:
    """BatchWriteItem on the running event loop, for the API's PENDING records.

    Same request as BatchWriter, but sent over keep-alive connections of our own: no
    writer thread to hand each batch to and back from, and no urllib3 (about 330 µs of
    CPU per call here, more than the rest of the request).
    """

    def __init__(self, client: Any, table: str) -> None:
        self._table = table
        self._signer = _Signer(client)
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if self._signer.https else None

    async def _connect(self) -> _Connection:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, conn = await asyncio.get_running_loop().create_connection(
                _Connection, self._signer.host, self._signer.port, ssl=self._ssl
            )
        return conn

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        """One request/response, on an idle connection when there is one.

        A server may close an idle keep-alive connection just as we reuse it; the request
        then goes again once on a new connection (BatchWriteItem puts are idempotent).
        """
        while self._idle:
            conn = self._idle.pop()
            if conn.loop is not asyncio.get_running_loop():
                continue  # left over from a loop that has ended (tests run one per test)
            if not conn.reusable:
                conn.close()
                continue
            try:
                return await self._on(conn, request)
            except ConnectionError:
                break
        return await self._on(await self._connect(), request)

    async def _on(self, conn: _Connection, request: bytes) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                reply = await conn.exchange(request)
        except BaseException:
            conn.close()
            raise
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()
        return reply

    def _wire(self, body: bytes) -> bytes:
        signed = self._signer.sign(BATCH_TARGET, body)
        head = "".join(f"{k}: {v}\r\n" for k, v in signed.headers.items())
        return (
            f"POST / HTTP/1.1\r\nHost: {self._signer.netloc}\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n"
        ).encode() + body

    async def _send(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            status, content = await self._exchange(self._wire(_batch_body(self._table, requests)))
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            raise Unavailable(f"status store batch_write_item: {exc!r}") from exc
        return _unprocessed(status, content, self._table)

    async def put_all(self, items: list[dict[str, Any]]) -> None:
        """Put up to 25 items, retrying whatever DynamoDB leaves unprocessed."""
        await self._write_all([{"PutRequest": {"Item": item}} for item in items])

    async def delete_all(self, items: list[dict[str, Any]]) -> None:
        """Delete up to 25 items (by their keys), retrying whatever is left unprocessed."""
        keys = [{"request_id": item["request_id"]} for item in items]
        await self._write_all([{"DeleteRequest": {"Key": key}} for key in keys])

    async def _write_all(self, requests: list[dict[str, Any]]) -> None:
        requests = await self._send(requests)
        for delay in BACKOFF_S:
            if not requests:
                return
            await asyncio.sleep(delay)
            requests = await self._send(requests)
        if requests:
            raise Unavailable(f"status store: {len(requests)} items left unprocessed")

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


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
# Tries to delete abandoned PENDING records while the store recovers; after that they
# expire with the status TTL (nobody holds their ids).
UNDO_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 16.0)
UNDO_CONFIRM_S = 2.0


class DynamoStatusStore:
    """Status store on DynamoDB, written in BatchWriteItem batches.

    Batched puts cannot be conditional, so ``complete`` first reads which of its requests
    are terminal already (BatchGetItem, consistent) and puts only the others. That is a
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
            self._pending_writer.put_all, max_batch=BATCH, writers=1, abandoned=self._undo
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
        await self._pending.submit(_item(status, self._expires_at(status.created_at)))

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

    def complete(self, outcomes: Sequence[Outcome]) -> None:
        items = {
            o.request_id: _item(o.as_status(), self._expires_at(o.logged_at())) for o in outcomes
        }
        ids = list(items)
        reads = [ids[i : i + GET_BATCH] for i in range(0, len(ids), GET_BATCH)]
        terminal = set().union(*self._pool.map(self._writer.terminal, reads))
        puts = [item for rid, item in items.items() if rid not in terminal]
        chunks = [puts[i : i + BATCH] for i in range(0, len(puts), BATCH)]
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
        self._pending_writer.close()
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
