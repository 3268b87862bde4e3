"""Idempotency keys (draft-ietf-httpapi-idempotency-key-header): a client that sends a POST
again with the same ``Idempotency-Key`` gets the first answer again, and nothing is queued
twice.

The key is held in a record written with the submission's PENDING records (embedded: in
their transaction; services: claimed by a conditional put before anything is queued), and
it holds the answer the first request gave, so a retry can only ever replay it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

# The draft leaves the length open; a bound keeps the record small and the header sane.
MAX_KEY_LENGTH = 255


class KeyReused(Exception):
    """The key was first sent with another request body."""


class KeyInProgress(Exception):
    """The request that first sent the key is still being taken in."""


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as first given, to be given again to a retry."""

    status: int
    body: bytes
    location: str | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One client's key, the fingerprint of the request that first sent it, and its answer.

    ``done`` is False only while the services intake takes the request in (claimed, not yet
    durable); the embedded intake writes it done, in the same transaction as its requests.
    """

    key: str
    fingerprint: str
    created_at: datetime
    answer: Answer
    done: bool = True


def valid_key(key: str) -> bool:
    """Visible ASCII, 1 to ``MAX_KEY_LENGTH`` characters (the draft's key is an sf-string)."""
    return 0 < len(key) <= MAX_KEY_LENGTH and all(" " < c <= "~" for c in key)


def scoped(client_id: str | None, key: str) -> str:
    """The record's name: one client's key never meets another's (hashed, so any key of
    ``MAX_KEY_LENGTH`` fits and none is stored in clear)."""
    digest = hashlib.sha256(f"{client_id or ''}\n{key}".encode()).hexdigest()
    return f"key/{digest}"


def fingerprint(target: str, content_type: str, body: bytes) -> str:
    """What makes two requests the same: where they went, as what, and the body's bytes."""
    digest = hashlib.sha256(f"{target}\n{content_type}\n".encode())
    digest.update(body)
    return digest.hexdigest()


def replay(held: KeyRecord, fingerprint: str) -> Answer:
    """The answer a retry gets: the first answer, if it is the same request and it is done."""
    if held.fingerprint != fingerprint:
        raise KeyReused(held.key)
    if not held.done:
        raise KeyInProgress(held.key)
    return held.answer
