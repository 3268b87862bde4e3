"""The replay's planning, without a queue: flags, offsets files, and each partition's
stretch from what a (fake) queue holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cli import replay
from cli.replay import (
    BEGINNING,
    Bound,
    Summary,
    UsageError,
    Watch,
    bound,
    format_plan,
    parse_from,
    parse_instant,
    parse_until,
    plan,
    read_offsets,
    shown,
    target_url,
)
from tests.support import wait_for

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


class FakeExtent:
    """Two partitions: 0 holds offsets 10..19 stamped T0 + offset minutes, 1 holds none."""

    def watermarks(self) -> dict[int, tuple[int, int]]:
        return {0: (10, 20), 1: (5, 5)}

    def positions_at(self, when: datetime) -> dict[int, int]:
        minutes = (when - T0) / timedelta(minutes=1)
        first = max(10, int(-(-minutes // 1)))
        return {0: first} if first < 20 else {}

    def count(self, partition: int, start: int, end: int) -> int:
        return end - start

    def close(self) -> None:
        pass


def test_instants_are_iso_8601_and_utc_unless_they_say() -> None:
    assert parse_instant("2026-11-28T10:00:00Z") == T0
    assert parse_instant("2026-11-28T10:00:00") == T0
    assert parse_instant("2026-11-28") == T0 - timedelta(hours=10)
    assert parse_instant("2026-11-28T11:00:00+01:00") == T0
    assert parse_instant("2026-11-28T11:00:00+01:00").tzinfo == timezone(timedelta(hours=1))
    with pytest.raises(UsageError, match="ISO-8601"):
        parse_instant("yesterday")


def test_from_and_until() -> None:
    assert parse_from("beginning") == BEGINNING
    assert parse_from("2026-11-28T10:00:00Z") == T0
    assert parse_until("now") is None
    assert parse_until("2026-11-28T10:00:00Z") == T0


def test_an_offsets_file_maps_partitions_to_offsets(tmp_path: Path) -> None:
    path = tmp_path / "offsets.json"
    path.write_text('{"0": 1200, "3": 0}')
    assert parse_from(f"offsets:{path}") == {0: 1200, 3: 0}
    with pytest.raises(UsageError, match="offsets file"):
        parse_from(f"offsets:{tmp_path / 'missing.json'}")


@pytest.mark.parametrize(
    "text",
    ["[1, 2]", '{"a": 1}', '{"0": "12"}', '{"0": -1}', '{"0": true}', '{"0": 1.5}', "0=12"],
)
def test_an_offsets_file_that_is_not_partition_to_offset_is_refused(text: str) -> None:
    with pytest.raises(UsageError):
        read_offsets(text)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (None, None, (20, 20)),  # nothing at or after the time: nothing to replay
        (10, None, (10, 20)),
        (3, None, (10, 20)),  # before the low watermark (deleted): from what is held
        (25, None, (20, 20)),  # past the high watermark
        (12, 15, (12, 15)),
        (12, 30, (12, 20)),  # --until in the future: the high watermark pinned now
        (16, 14, (14, 14)),  # ends before it starts: nothing
    ],
)
def test_a_stretch_stays_within_what_the_partition_holds(
    start: int | None, end: int | None, expected: tuple[int, int]
) -> None:
    assert bound(10, 20, start, end) == expected


def test_the_plan_from_the_beginning_ends_at_the_high_watermarks() -> None:
    assert plan(FakeExtent(), BEGINNING, None) == [Bound(0, 10, 20, 10), Bound(1, 5, 5, 0)]


def test_the_plan_between_two_times() -> None:
    since, until = T0 + timedelta(minutes=12), T0 + timedelta(minutes=15, seconds=30)
    assert plan(FakeExtent(), since, until) == [Bound(0, 12, 16, 4), Bound(1, 5, 5, 0)]
    assert plan(FakeExtent(), T0 + timedelta(hours=1), None)[0] == Bound(0, 20, 20, 0)


def test_the_plan_from_an_offsets_file_leaves_out_the_partitions_it_does_not_name() -> None:
    assert plan(FakeExtent(), {0: 17}, None) == [Bound(0, 17, 20, 3), Bound(1, 5, 5, 0)]
    with pytest.raises(UsageError, match="no partition 7"):
        plan(FakeExtent(), {7: 0}, None)


def test_until_before_from_is_refused() -> None:
    with pytest.raises(UsageError, match="before"):
        plan(FakeExtent(), T0, T0 - timedelta(seconds=1))


def test_the_plan_as_printed() -> None:
    text = format_plan([Bound(0, 10, 20, 10), Bound(1, 5, 5, 0)], "topic t", "x.db", "skip")
    assert text.splitlines() == [
        "replay plan: topic t -> x.db (statuses: skip)",
        "partition         start           end       count",
        "        0            10            20          10",
        "        1             5             5           0",
        "    total                                      10",
    ]


def test_a_target_is_a_url_or_a_sqlite_path(tmp_path: Path) -> None:
    assert target_url("postgresql+psycopg://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert target_url(str(tmp_path / "t.db")) == f"sqlite:///{tmp_path / 't.db'}"
    assert "secret" not in shown("postgresql+psycopg://u:secret@h/db")


def test_the_summary() -> None:
    summary = Summary(
        reached_end=True,
        read=10,
        planned=10,
        elapsed_s=2.0,
        rows_before=3,
        rows_after=8,
        decided={("SUCCESS", ""): 7, ("FAILED", "STALE_VERSION"): 3},
        dead_letters=0,
    )
    lines = summary.text().splitlines()
    assert lines[0] == "replay finished in 2.0 s: 10 of 10 records read (5/s)"
    assert lines[1] == "target rows: 3 -> 8 (+5)"
    assert lines[3].split() == ["FAILED", "STALE_VERSION", "3"]
    assert lines[4].split() == ["SUCCESS", "-", "7"]


def test_a_queue_without_partitions_is_refused() -> None:
    class Missing(FakeExtent):
        def watermarks(self) -> dict[int, tuple[int, int]]:
            return {}

    with pytest.raises(UsageError, match="no partitions"):
        plan(Missing(), BEGINNING, None)


def test_progress_without_a_terminal_is_a_log_line_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replay, "PROGRESS_LOG_EVERY_S", 0.05)
    done = iter(range(10, 1000, 10))
    with capture_logs() as logs, Watch(1000, lambda: next(done), tty=False):
        wait_for(lambda: len(logs) >= 3, 5, "three progress lines", every=0.01)
    lines = [e for e in logs if e["event"] == "replay progress"]
    assert [e["done"] for e in lines[:3]] == [10, 20, 30]
    assert all(e["total"] == 1000 for e in lines)
    assert all(e["rate_per_s"] > 0 and e["eta_s"] >= 0 for e in lines)
