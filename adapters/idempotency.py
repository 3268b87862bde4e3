"""Where idempotency keys are held: in the inbound log's SQLite file (embedded, written in
the intake's transaction) or as items of the DynamoDB status table (services, claimed with
a conditional put before anything is queued). Either way a key lives as long as a status.
"""

from __future__ import annotations

import asyncio
import sqlite3
import zlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from adapters.dynamodb import CONDITION_FAILED
from adapters.sqlite_file import READ_PRAGMAS, connect, writer_of
from config.clock import utc_now
from domain.idempotency import Answer, KeyRecord
from domain.ports import Unavailable

KEY_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    created_at TEXT NOT NULL,
    status INTEGER NOT NULL,
    location TEXT,
    body BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires ON idempotency_keys (expires_at);
"""

# Held unless it expired (reads treat an expired key as gone; the sweep deletes it later).
HOLD_KEY = """
INSERT INTO idempotency_keys (key, fingerprint, created_at, status, location, body, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    fingerprint = excluded.fingerprint, created_at = excluded.created_at,
    status = excluded.status, location = excluded.location, body = excluded.body,
    expires_at = excluded.expires_at
WHERE idempotency_keys.expires_at < ?
"""
HELD_KEY = (
    "SELECT key, fingerprint, created_at, status, location, body FROM idempotency_keys"
    " WHERE key = ?"
)
DELETE_EXPIRED_KEYS = """
DELETE FROM idempotency_keys WHERE rowid IN (
    SELECT rowid FROM idempotency_keys WHERE expires_at < ? LIMIT ?)
"""


def ensure_key_schema(path: Path) -> None:
    """Create the keys' table in the inbound log's file (where the intake writes them)."""
    with writer_of(path) as writer:
        writer.conn.executescript(KEY_SCHEMA)


def hold(conn: sqlite3.Connection, record: KeyRecord, ttl: timedelta) -> KeyRecord | None:
    """Inside the intake's transaction: hold ``record``'s key (None), or return the record
    that holds it already."""
    at = record.created_at
    first = record.answer
    held = conn.execute(
        HOLD_KEY,
        (
            record.key,
            record.fingerprint,
            at.isoformat(),
            first.status,
            first.location,
            first.body,
            int((at + ttl).timestamp()),
            int(at.timestamp()),
        ),
    )
    if held.rowcount:
        return None
    return _row_record(conn.execute(HELD_KEY, (record.key,)).fetchone())


def _row_record(row: tuple[Any, ...]) -> KeyRecord:
    key, fingerprint, created_at, status, location, body = row
    answer = Answer(status, body, location)
    return KeyRecord(key, fingerprint, datetime.fromisoformat(created_at), answer)


def held_key(path: Path, key: str) -> KeyRecord | None:
    """The record holding ``key`` now, if any: a read, which holds nothing."""
    conn = connect(path, READ_PRAGMAS)
    try:
        row = conn.execute(
            f"{HELD_KEY} AND expires_at >= ?", (key, int(utc_now().timestamp()))
        ).fetchone()
    finally:
        conn.close()
    return None if row is None else _row_record(row)


# A claim whose request died with its API worker may be taken over after this long: far
# beyond any request's wait on the intake (the produce timeout), so never a live one's.
CLAIM_LEASE_S = 60


class DynamoKeys:
    """Keys as items of the status table, named ``key/<digest>`` (a "/" is never in a
    request id, so no status read meets one); the answer is stored compressed (a batch's
    answer can be large, an item at most 400 KB)."""

    def __init__(self, client: Any, table: str, ttl_days: int) -> None:
        self._client = client
        self._table = table
        self._ttl = timedelta(days=ttl_days)

    async def claim(self, record: KeyRecord) -> KeyRecord | None:
        """Claim the key before anything is queued (None), or return its holder's record."""
        for _ in range(3):  # a holder released between our put and our read: claim again
            try:
                await self._call("put_item", **self._claim(record))
                return None
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != CONDITION_FAILED:
                    raise Unavailable(f"status store put_item: {exc}") from exc
            reply = await self._call(
                "get_item",
                TableName=self._table,
                Key={"request_id": {"S": record.key}},
                ConsistentRead=True,
            )
            if "Item" in reply:
                return _record(reply["Item"])
        raise Unavailable("status store: an idempotency key kept changing hands")

    def _claim(self, record: KeyRecord) -> dict[str, Any]:
        now = int(utc_now().timestamp())
        answer = record.answer
        item: dict[str, Any] = {
            "request_id": {"S": record.key},
            "fingerprint": {"S": record.fingerprint},
            "created_at": {"S": record.created_at.isoformat()},
            "done": {"BOOL": False},
            "answer_status": {"N": str(answer.status)},
            "answer_body": {"B": zlib.compress(answer.body)},
            "lease_until": {"N": str(now + CLAIM_LEASE_S)},
            "expires_at": {"N": str(int((record.created_at + self._ttl).timestamp()))},
        }
        if answer.location is not None:
            item["location"] = {"S": answer.location}
        return {
            "TableName": self._table,
            "Item": item,
            "ConditionExpression": (
                "attribute_not_exists(request_id) OR expires_at < :now"
                " OR (done = :false AND lease_until < :now)"
            ),
            "ExpressionAttributeValues": {":now": {"N": str(now)}, ":false": {"BOOL": False}},
        }

    async def held(self, key: str) -> KeyRecord | None:
        """The record holding ``key`` now, if any: a read, which claims nothing."""
        reply = await self._call(
            "get_item",
            TableName=self._table,
            Key={"request_id": {"S": key}},
            ConsistentRead=True,
        )
        item = reply.get("Item")
        if item is None or int(item["expires_at"]["N"]) < utc_now().timestamp():
            return None
        return _record(item)

    async def complete(self, record: KeyRecord) -> None:
        """The request is durable: retries get its answer from now on."""
        await self._call(
            "update_item",
            TableName=self._table,
            Key={"request_id": {"S": record.key}},
            UpdateExpression="SET done = :true",
            ExpressionAttributeValues={":true": {"BOOL": True}},
        )

    async def release(self, record: KeyRecord) -> None:
        """The request failed: a retry with the key is a new request."""
        try:
            await self._call(
                "delete_item",
                TableName=self._table,
                Key={"request_id": {"S": record.key}},
                ConditionExpression="done = :false AND fingerprint = :fingerprint",
                ExpressionAttributeValues={
                    ":false": {"BOOL": False},
                    ":fingerprint": {"S": record.fingerprint},
                },
            )
        except ClientError as exc:  # taken over meanwhile: not ours to release
            if exc.response.get("Error", {}).get("Code") != CONDITION_FAILED:
                raise Unavailable(f"status store delete_item: {exc}") from exc

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(getattr(self._client, operation), **kwargs)
        except BotoCoreError as exc:
            raise Unavailable(f"status store {operation}: {exc}") from exc


def _record(item: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        key=item["request_id"]["S"],
        fingerprint=item["fingerprint"]["S"],
        created_at=datetime.fromisoformat(item["created_at"]["S"]),
        answer=Answer(
            int(item["answer_status"]["N"]),
            zlib.decompress(item["answer_body"]["B"]),
            item.get("location", {}).get("S"),
        ),
        done=item["done"]["BOOL"],
    )
