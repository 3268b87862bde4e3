"""The PENDING writer's own HTTP request: what real DynamoDB checks and the local emulator does not."""

from __future__ import annotations

import boto3

from adapters.dynamodb import AsyncBatchWriter


def wire(endpoint: str) -> tuple[list[str], bytes]:
    session = boto3.session.Session(
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="secret",
        aws_session_token="session-token",
        region_name="eu-west-1",
    )
    client = session.client("dynamodb", endpoint_url=endpoint)
    writer = AsyncBatchWriter(client, "trade-requests")
    head, _, body = writer._wire(b'{"RequestItems":{}}').partition(b"\r\n\r\n")
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
