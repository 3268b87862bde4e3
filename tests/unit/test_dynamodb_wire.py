"""The status store's own DynamoDB wire code: the request it signs (what real DynamoDB checks
and the local emulator does not), how it reads replies, its retry schedule, both transports
against a scripted HTTP server, and the botocore internals it reads."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import orjson
import pytest
from botocore.credentials import Credentials

from adapters.dynamodb_wire import (
    ROUNDS_S,
    AsyncBatchWriter,
    BatchWriter,
    Reply,
    Rounds,
    Signer,
    parse,
    stored_rounds,
    write_rounds,
)
from domain.ports import Unavailable

TABLE = "trade-requests"


def client_for(endpoint: str) -> Any:
    session = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        aws_session_token="session-token",
        region_name="eu-west-1",
    )
    return session.client("dynamodb", endpoint_url=endpoint)


def wire(endpoint: str) -> tuple[list[str], bytes]:
    signer = Signer(client_for(endpoint))
    head, _, body = signer.http11("BatchWriteItem", b'{"RequestItems":{}}').partition(b"\r\n\r\n")
    return head.decode().split("\r\n"), body


def header(lines: list[str], name: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in lines[1:] if line.lower().startswith(name + ":")]


def test_the_host_sent_is_the_host_signed_without_the_default_port() -> None:
    lines, body = wire("https://dynamodb.eu-west-1.amazonaws.com:443")
    assert lines[0] == "POST / HTTP/1.1"
    assert header(lines, "host") == ["dynamodb.eu-west-1.amazonaws.com"]
    (auth,) = header(lines, "authorization")
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/dynamodb/aws4_request" in auth
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target" in auth
    assert header(lines, "x-amz-security-token") == ["session-token"]
    assert header(lines, "x-amz-target") == ["DynamoDB_20120810.BatchWriteItem"]
    assert header(lines, "content-length") == [str(len(body))]


def test_a_non_default_port_stays_in_the_host() -> None:
    lines, _ = wire("http://127.0.0.1:4567")
    assert header(lines, "host") == ["127.0.0.1:4567"]


# -- replies ---------------------------------------------------------------------------


def error(status: int, code: str, message: str = "") -> Reply:
    return status, orjson.dumps(
        {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}
    )


def test_a_reply_is_its_body_or_an_error_by_kind() -> None:
    assert parse((200, b'{"UnprocessedItems":{}}'), "BatchWriteItem") == {"UnprocessedItems": {}}
    assert parse((200, b""), "BatchWriteItem") == {}
    with pytest.raises(Unavailable, match="status store BatchWriteItem: ThrottlingException"):
        parse(error(400, "ThrottlingException"), "BatchWriteItem")
    with pytest.raises(Unavailable, match="status store BatchGetItem: 503"):
        parse((503, b""), "BatchGetItem")
    with pytest.raises(RuntimeError, match="ValidationException: item too large"):
        parse(error(400, "ValidationException", "item too large"), "BatchWriteItem")


# -- the retry schedule (no I/O) -----------------------------------------------------------


def put(rid: str) -> dict[str, Any]:
    return {"PutRequest": {"Item": {"request_id": {"S": rid}}}}


def left(*requests: dict[str, Any]) -> Reply:
    return 200, orjson.dumps({"UnprocessedItems": {TABLE: list(requests)} if requests else {}})


def drive(rounds: Rounds[Any], replies: list[Reply]) -> tuple[list[tuple[float, str, Any]], Any]:
    """Every call the rounds make, answered from ``replies`` in order, and their result."""
    calls = []
    try:
        call = next(rounds)
        while True:
            delay, operation, body = call
            calls.append((delay, operation, orjson.loads(body)["RequestItems"][TABLE]))
            call = rounds.send(replies.pop(0))
    except StopIteration as done:
        return calls, done.value


def test_only_what_is_left_unprocessed_goes_again_after_the_next_delay() -> None:
    a, b, c = put("a"), put("b"), put("c")
    calls, _ = drive(write_rounds(TABLE, [a, b, c]), [left(b, c), left(c), left()])
    assert calls == [
        (0.0, "BatchWriteItem", [a, b, c]),
        (ROUNDS_S[1], "BatchWriteItem", [b, c]),
        (ROUNDS_S[2], "BatchWriteItem", [c]),
    ]


def test_items_never_processed_fail_after_ten_rounds_backing_off_to_a_second() -> None:
    a = put("a")
    rounds = write_rounds(TABLE, [a])
    delays = [next(rounds)[0]]
    for _ in ROUNDS_S[1:]:
        delays.append(rounds.send(left(a))[0])
    assert delays == list(ROUNDS_S) == [0.0, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0, 1.0]
    with pytest.raises(Unavailable, match="1 items left unprocessed"):
        rounds.send(left(a))


def test_throttling_is_unavailable_at_once() -> None:
    rounds = write_rounds(TABLE, [put("a")])
    next(rounds)
    with pytest.raises(Unavailable, match="ProvisionedThroughputExceededException"):
        rounds.send(error(400, "ProvisionedThroughputExceededException"))


def found(*items: tuple[str, str], unread: list[str] | None = None) -> Reply:
    body: dict[str, Any] = {
        "Responses": {TABLE: [{"request_id": {"S": r}, "status": {"S": s}} for r, s in items]}
    }
    if unread:
        body["UnprocessedKeys"] = {TABLE: {"Keys": [{"request_id": {"S": r}} for r in unread]}}
    return 200, orjson.dumps(body)


def test_stored_reads_consistently_keeps_what_is_found_and_rereads_unprocessed_keys() -> None:
    replies = [found(("a", "SUCCESS"), ("b", "PENDING"), unread=["c", "d"]), found(("c", "FAILED"))]
    calls, stored = drive(stored_rounds(TABLE, ["a", "b", "c", "d"]), replies)
    assert {rid: item["status"]["S"] for rid, item in stored.items()} == {
        "a": "SUCCESS",
        "b": "PENDING",
        "c": "FAILED",
    }  # d is absent
    (_, operation, first), (delay, _, second) = calls
    assert operation == "BatchGetItem"
    assert first["ConsistentRead"] is True
    assert [k["request_id"]["S"] for k in first["Keys"]] == ["a", "b", "c", "d"]
    assert (delay, [k["request_id"]["S"] for k in second["Keys"]]) == (ROUNDS_S[1], ["c", "d"])


def test_keys_never_read_fail_after_ten_rounds() -> None:
    rounds = stored_rounds(TABLE, ["a"])
    next(rounds)
    for _ in ROUNDS_S[1:]:
        rounds.send(found(unread=["a"]))
    with pytest.raises(Unavailable, match="1 keys left unread"):
        rounds.send(found(unread=["a"]))


# -- both transports, against a scripted HTTP/1.1 server -----------------------------------


class Scripted(http.server.ThreadingHTTPServer):
    """Answers each POST with the next scripted reply; keeps what it was sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.replies: list[Reply] = []
        self.received: list[tuple[dict[str, str], bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self) -> list[Any]:
        return [orjson.loads(body)["RequestItems"][TABLE] for _, body in self.received]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as DynamoDB
    server: Scripted

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status, content = self.server.replies.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Scripted]:
    scripted = Scripted()
    thread = threading.Thread(target=scripted.serve_forever, daemon=True)
    thread.start()
    yield scripted
    scripted.shutdown()
    scripted.server_close()


def item(rid: str) -> dict[str, Any]:
    return {"request_id": {"S": rid}, "status": {"S": "PENDING"}}


def test_the_blocking_writer_puts_again_what_is_left(server: Scripted) -> None:
    server.replies = [left(put("b")), left()]
    BatchWriter(client_for(server.url), TABLE).put_all([item("a"), item("b")])
    assert server.bodies() == [
        [{"PutRequest": {"Item": item("a")}}, {"PutRequest": {"Item": item("b")}}],
        [put("b")],  # what the first reply left unprocessed
    ]
    headers, _ = server.received[0]
    assert headers["x-amz-target"] == "DynamoDB_20120810.BatchWriteItem"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")


def test_the_blocking_writer_reads_what_is_stored(server: Scripted) -> None:
    server.replies = [found(("a", "FAILED"), ("b", "PENDING"))]
    stored = BatchWriter(client_for(server.url), TABLE).stored(["a", "b"])
    assert {rid: item["status"]["S"] for rid, item in stored.items()} == {
        "a": "FAILED",
        "b": "PENDING",
    }


def test_an_unreachable_store_is_unavailable_to_the_blocking_writer() -> None:
    writer = BatchWriter(client_for("http://127.0.0.1:1"), TABLE)
    with pytest.raises(Unavailable, match="status store BatchWriteItem"):
        writer.put_all([item("a")])


async def test_the_async_writer_puts_and_deletes_on_one_kept_alive_connection(
    server: Scripted,
) -> None:
    server.replies = [left(), left(), error(400, "ThrottlingException")]
    writer = AsyncBatchWriter(client_for(server.url), TABLE)
    await writer.put_all([item("a")])
    await writer.delete_all([item("a")])
    with pytest.raises(Unavailable, match="status store BatchWriteItem: ThrottlingException"):
        await writer.put_all([item("b")])
    writer.close()
    assert server.bodies() == [
        [{"PutRequest": {"Item": item("a")}}],
        [{"DeleteRequest": {"Key": {"request_id": {"S": "a"}}}}],
        [{"PutRequest": {"Item": item("b")}}],
    ]
    assert [h["host"] for h, _ in server.received] == [server.url.removeprefix("http://")] * 3


# -- the botocore internals this code reads (fails the day a botocore bump changes them) --


def test_the_botocore_internals_read_are_there_and_behave(server: Scripted) -> None:
    client = client_for(server.url)
    credentials = client._request_signer._credentials
    assert isinstance(credentials, Credentials)
    frozen = credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == (
        "AKIDEXAMPLE",
        "secret",
        "session-token",
    )
    server.replies = [(200, b'{"UnprocessedItems":{}}')]
    request = Signer(client).sign("BatchWriteItem", b'{"RequestItems":{}}').prepare()
    response = client._endpoint.http_session.send(request)
    assert (response.status_code, response.content) == (200, b'{"UnprocessedItems":{}}')
    headers, body = server.received[0]
    assert body == b'{"RequestItems":{}}'
    assert "x-amz-security-token" in headers
