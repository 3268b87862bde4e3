"""Bytewax sources of queued trade messages.

Every source yields records with the shape of ``RawRecord``, so the dataflow does not care
which queue they came from.
"""

from __future__ import annotations

from typing import Protocol


class RawRecord(Protocol):
    """A queued message as read: raw bytes plus headers (request_id, correlation_id), and
    where it was read from (topic, partition, offset), which a dead letter names."""

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> list[tuple[str, bytes]]: ...

    @property
    def topic(self) -> str | None: ...

    @property
    def partition(self) -> int | None: ...

    @property
    def offset(self) -> int | None: ...
