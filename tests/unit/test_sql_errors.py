"""Which database errors the sinks wait out, and which escalate."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from adapters.sql import transient


class DriverError(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OperationalError("x", {}, DriverError(None)), True),  # no server reached
        (OperationalError("x", {}, DriverError("08006")), True),  # connection failure
        (OperationalError("x", {}, DriverError("57P01")), True),  # admin shutdown
        (OperationalError("x", {}, DriverError("53200")), True),  # out of memory
        (DBAPIError("x", {}, DriverError("40P01")), True),  # deadlock
        (ProgrammingError("x", {}, DriverError("42P01")), False),  # undefined table: a bug
        (DBAPIError("x", {}, DriverError("22001")), False),  # data too long: bad data
        (DBAPIError("x", {}, DriverError(None)), False),
    ],
)
def test_transient(error: DBAPIError, expected: bool) -> None:
    assert transient(error) is expected


def test_lost_connection_is_transient() -> None:
    error = DBAPIError("x", {}, DriverError("42000"), connection_invalidated=True)
    assert transient(error)
