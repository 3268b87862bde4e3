"""The status store's batch calls on DynamoDB's JSON API, built, signed and parsed once.

BatchWriteItem and BatchGetItem (the processor's check before it writes outcomes, and
the API's bulk status read), each with its retry schedule for what DynamoDB leaves
unprocessed, written once as a generator of calls (no I/O), and run by a blocking transport
(``BatchWriter``, the processor's threads) or an asyncio one (``AsyncBatchWriter``, the
API's event loop). Everything else the status store calls goes through boto3.

Why not boto3 for these: its serializer walks the service model for every attribute of
every item, and each call crosses botocore's whole pipeline. Measured on 20,000 PENDING
puts in batches of 25 against dynoxide (client CPU per item, median of 3): boto3 70 µs,
boto3 with a pre-serialised body 58 µs, aiobotocore 80 µs (55 µs pre-serialised), this
module 16 µs (async) and 35 µs (blocking). So a body is one orjson call, signed with
botocore's SigV4 and the client's own credentials.

That reads two botocore internals, once, when a writer is built (so a change fails at
start-up, not at the first write): the client's credentials
(``client._request_signer._credentials``) and, for the blocking transport, its HTTP session
(``client._endpoint.http_session``). tests/unit/test_dynamodb_wire.py checks both against
the pinned botocore.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Generator
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httptools
import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError

from domain.ports import Unavailable

T = TypeVar("T")

CONNECT_TIMEOUT_S = 2
READ_TIMEOUT_S = 2

# Codes that mean "try again later", not "your request is wrong".
TRANSIENT = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "ResourceNotFoundException",
}

WRITE_BATCH = 25  # BatchWriteItem's limit
GET_BATCH = 100  # BatchGetItem's limit
# What an outcome's put must carry over from the PENDING record it replaces.
STORED = "request_id, #s, client_id, batch_id, batch_index"

# The delay before each round of a batch call: the first at once, then whatever DynamoDB
# left unprocessed again, backing off to 1 s; ten rounds in all. A throttled call is
# Unavailable at once instead: the sinks retry it with their own backoff, the API says 503.
ROUNDS_S = (0.0, *(min(0.02 * 2**i, 1.0) for i in range(9)))

Call = tuple[float, str, bytes]  # (delay before it, operation, JSON body)
Reply = tuple[int, bytes]  # (HTTP status, body)
Rounds = Generator[Call, Reply, T]


class Signer:
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

    def sign(self, operation: str, body: bytes) -> AWSRequest:
        request = AWSRequest(
            method="POST",
            url=self.url,
            data=body,
            headers={
                "Content-Type": "application/x-amz-json-1.0",
                "X-Amz-Target": f"DynamoDB_20120810.{operation}",
            },
        )
        credentials = self._credentials.get_frozen_credentials()
        SigV4Auth(credentials, "dynamodb", self._region).add_auth(request)
        return request

    def http11(self, operation: str, body: bytes) -> bytes:
        """The signed request as HTTP/1.1 bytes, Host as signed."""
        signed = self.sign(operation, body)
        head = "".join(f"{k}: {v}\r\n" for k, v in signed.headers.items())
        return (
            f"POST / HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Length: {len(body)}\r\n{head}\r\n"
        ).encode() + body


def parse(reply: Reply, operation: str) -> dict[str, Any]:
    """A reply's body; Unavailable for throttling and 5xx, RuntimeError for any other error."""
    status, content = reply
    body: dict[str, Any] = orjson.loads(content) if content else {}
    if status == 200:
        return body
    code = str(body.get("__type", "")).rpartition("#")[2]
    if status >= 500 or code in TRANSIENT:
        raise Unavailable(f"status store {operation}: {code or status}")
    raise RuntimeError(f"status store {operation}: {code}: {body.get('message')}")


def write_rounds(table: str, requests: list[dict[str, Any]]) -> Rounds[None]:
    """BatchWriteItem of up to 25 put or delete requests, again with whatever is left
    unprocessed, on the ``ROUNDS_S`` schedule."""
    for delay in ROUNDS_S:
        if not requests:
            return
        body = orjson.dumps({"RequestItems": {table: requests}})
        reply = parse((yield delay, "BatchWriteItem", body), "BatchWriteItem")
        requests = reply.get("UnprocessedItems", {}).get(table, [])
    if requests:
        raise Unavailable(f"status store: {len(requests)} items left unprocessed")


def stored_rounds(
    table: str, request_ids: list[str], projection: str | None = STORED
) -> Rounds[dict[str, dict[str, Any]]]:
    """Those of up to 100 request ids that have a record (consistent BatchGetItem), by
    request id: the ``projection``'s attributes (every one when None), again with whatever
    keys are left unprocessed, on the ``ROUNDS_S`` schedule."""
    keys = [{"request_id": {"S": rid}} for rid in request_ids]
    found: dict[str, dict[str, Any]] = {}
    for delay in ROUNDS_S:
        if not keys:
            return found
        wanted: dict[str, Any] = {"Keys": keys, "ConsistentRead": True}
        if projection is not None:
            wanted["ProjectionExpression"] = projection
            wanted["ExpressionAttributeNames"] = {"#s": "status"}
        body = orjson.dumps({"RequestItems": {table: wanted}})
        reply = parse((yield delay, "BatchGetItem", body), "BatchGetItem")
        for item in reply.get("Responses", {}).get(table, []):
            found[item["request_id"]["S"]] = item
        keys = reply.get("UnprocessedKeys", {}).get(table, {}).get("Keys", [])
    if keys:
        raise Unavailable(f"status store: {len(keys)} keys left unread")
    return found


def _puts(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"PutRequest": {"Item": item}} for item in items]


class BatchWriter:
    """The batch calls, blocking, over the client's own HTTP session (urllib3's pool): for
    the processor's threads."""

    def __init__(self, client: Any, table: str) -> None:
        self._table = table
        self._signer = Signer(client)
        self._http = client._endpoint.http_session

    def _post(self, delay: float, operation: str, body: bytes) -> Reply:
        if delay:
            time.sleep(delay)
        request = self._signer.sign(operation, body).prepare()
        try:
            response = self._http.send(request)
        except BotoCoreError as exc:
            raise Unavailable(f"status store {operation}: {exc}") from exc
        return response.status_code, response.content

    def _run(self, rounds: Rounds[T]) -> T:
        try:
            call = next(rounds)
            while True:
                call = rounds.send(self._post(*call))
        except StopIteration as done:
            return cast(T, done.value)

    def stored(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """What an outcome keeps (``STORED``) of up to 100 request ids, where there is one."""
        return self._run(stored_rounds(self._table, request_ids))

    def items(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The whole stored items of up to 100 request ids, where there is one."""
        return self._run(stored_rounds(self._table, request_ids, None))

    def put_all(self, items: list[dict[str, Any]]) -> None:
        """Put up to 25 items."""
        self._run(write_rounds(self._table, _puts(items)))


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one exchange at a time."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._reply: asyncio.Future[Reply] | None = None
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

    async def exchange(self, request: bytes) -> Reply:
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
    """The batch calls on the running event loop, for the API's PENDING records.

    Over keep-alive connections of our own: no writer thread to hand each batch to and back
    from, and no urllib3 (about 330 µs of CPU per call here, more than the rest of the
    request).
    """

    def __init__(self, client: Any, table: str) -> None:
        self._table = table
        self._signer = Signer(client)
        self._idle: list[_Connection] = []
        self._ssl = ssl.create_default_context() if self._signer.https else None

    async def _connect(self) -> _Connection:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, conn = await asyncio.get_running_loop().create_connection(
                _Connection, self._signer.host, self._signer.port, ssl=self._ssl
            )
        return conn

    async def _exchange(self, request: bytes) -> Reply:
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

    async def _on(self, conn: _Connection, request: bytes) -> Reply:
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

    async def _post(self, delay: float, operation: str, body: bytes) -> Reply:
        if delay:
            await asyncio.sleep(delay)
        try:
            return await self._exchange(self._signer.http11(operation, body))
        except (OSError, TimeoutError, httptools.HttpParserError) as exc:
            raise Unavailable(f"status store {operation}: {exc!r}") from exc

    async def _run(self, rounds: Rounds[T]) -> T:
        try:
            call = next(rounds)
            while True:
                call = rounds.send(await self._post(*call))
        except StopIteration as done:
            return cast(T, done.value)

    async def put_all(self, items: list[dict[str, Any]]) -> None:
        """Put up to 25 items."""
        await self._run(write_rounds(self._table, _puts(items)))

    async def delete_all(self, items: list[dict[str, Any]]) -> None:
        """Delete up to 25 items (by their keys)."""
        keys = [{"request_id": item["request_id"]} for item in items]
        await self._run(write_rounds(self._table, [{"DeleteRequest": {"Key": k}} for k in keys]))

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
