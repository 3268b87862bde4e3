"""The queue deadline: a message appended after it was answered 503 and is not accepted.

The API gives the queue until ``accepted_at + produce timeout`` to acknowledge a message
and carries that deadline in the message's headers. A message the client was told 503
for can still reach the log later (librdkafka times out a message that is already on the
wire to a stalled broker; the broker writes it when it resumes). The broker stamps every
message of a ``LogAppendTime`` topic with the time it appended it, and the producer's
delivery report carries the same stamp, so the API and the dataflow apply one rule to one
number: appended after the deadline means not accepted, on every replay.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

DEADLINE_HEADER = "queue_deadline_ms"
LOG_APPEND_TIME = 2  # Kafka's timestamp type for a stamp set by the broker on append


def deadline_ms(accepted_at: datetime, timeout_ms: int) -> int:
    """The last moment (epoch ms) at which the queue may append the message."""
    return int(accepted_at.timestamp() * 1000) + timeout_ms


def appended_late(deadline: int | None, timestamp: tuple[int, int] | None) -> str | None:
    """Why a message appended at ``timestamp`` (Kafka's (type, ms)) is not accepted, or None.

    Only a broker's append stamp decides; a producer's create time, or no deadline (messages
    of earlier versions), accepts the message.
    """
    if deadline is None or timestamp is None or timestamp[0] != LOG_APPEND_TIME:
        return None
    if timestamp[1] <= deadline:
        return None
    return (
        f"queued after the API answered 503: appended {timestamp[1] - deadline} ms"
        " after its deadline"
    )


def deadline_of(headers: Iterable[tuple[str, bytes | str | None]] | None) -> int | None:
    """The deadline a message carries, or None (none, or not a number)."""
    for key, value in headers or ():
        if key == DEADLINE_HEADER and value:
            try:
                return int(value)
            except ValueError:
                return None
    return None
