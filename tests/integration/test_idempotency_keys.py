"""Where idempotency keys are held, one contract for each: the services' claims (DynamoDB on
the emulator, and the fake the unit tests use) and the embedded hold inside the intake's
SQLite transaction."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters import wiring
from adapters.idempotency import ensure_key_schema, hold
from adapters.intake import KeyClaims
from adapters.sqlite_file import writer_of
from config.settings import Settings
from domain.idempotency import Answer, KeyRecord
from tests.fakes import FakeKeys

TTL = timedelta(days=7)


def record(
    fingerprint: str = "f1", *, created_at: datetime | None = None, body: bytes = b"{}"
) -> KeyRecord:
    return KeyRecord(
        key=f"key/{uuid.uuid4().hex}",
        fingerprint=fingerprint,
        created_at=created_at or datetime.now(UTC),
        answer=Answer(202, body, "/api/v1/requests/r1"),
        done=False,
    )


@pytest.fixture(params=["dynamodb", "fake"])
def claims(request: pytest.FixtureRequest) -> KeyClaims:
    if request.param == "fake":
        return FakeKeys(TTL)
    migrated: Settings = request.getfixturevalue("migrated")
    return wiring.key_claims(migrated)


async def test_a_key_is_claimed_once_and_its_holder_is_returned(claims: KeyClaims) -> None:
    first = record()
    assert await claims.claim(first) is None
    held = await claims.claim(KeyRecord(first.key, "f2", first.created_at, Answer(202, b"x")))
    assert held is not None
    assert (held.fingerprint, held.answer, held.done) == ("f1", first.answer, False)


async def test_a_completed_key_holds_its_answer_whole(claims: KeyClaims) -> None:
    big = bytes(range(256)) * 1000  # a 1,000-item batch's answer is this large
    first = record(body=big)
    assert await claims.claim(first) is None
    await claims.complete(first)
    held = await claims.claim(first)
    assert held is not None
    assert held.done
    assert held.answer == Answer(202, big, "/api/v1/requests/r1")


async def test_a_released_key_can_be_claimed_again_but_only_by_its_holder(
    claims: KeyClaims,
) -> None:
    first = record()
    assert await claims.claim(first) is None
    await claims.release(KeyRecord(first.key, "another", first.created_at, first.answer))
    assert await claims.claim(first) is not None  # not released by another request
    await claims.release(first)
    assert await claims.claim(first) is None


async def test_an_expired_key_is_a_new_claim(claims: KeyClaims) -> None:
    old = record(created_at=datetime.now(UTC) - TTL - timedelta(hours=1))
    assert await claims.claim(old) is None
    await claims.complete(old)
    assert await claims.claim(KeyRecord(old.key, "f2", datetime.now(UTC), old.answer)) is None


def test_the_embedded_hold_takes_a_key_once_inside_the_transaction(tmp_path: Path) -> None:
    path = tmp_path / "inbound.db"
    ensure_key_schema(path)
    first = record()
    expired = record(created_at=datetime.now(UTC) - TTL - timedelta(hours=1))
    with writer_of(path) as writer:
        with writer.transaction("inbound log") as conn:
            assert hold(conn, first, TTL) is None
            assert hold(conn, expired, TTL) is None
        with writer.transaction("inbound log") as conn:
            again = hold(conn, KeyRecord(first.key, "f2", datetime.now(UTC), first.answer), TTL)
            renewed = KeyRecord(expired.key, "f3", datetime.now(UTC), expired.answer)
            assert hold(conn, renewed, TTL) is None  # expired: taken over
    assert again is not None
    assert (again.fingerprint, again.answer, again.done) == ("f1", first.answer, True)
