"""``trade-store status``'s own logic: the JSON object, the screen's lines, and a
dependency found down blanking its figures without being asked again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from rich.console import Console

from cli.status import Status, as_json, gather, plain, reason, show_rich, summary
from config.settings import Settings

AT = datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)


def full() -> Status:
    return Status(
        profile="services",
        at=AT,
        lag={1: 5, 0: 2},
        snapshot_age_seconds=1.26,
        accepted_per_second=100 / 60,
        decided_per_second=90 / 60,
        dead_letters=3,
        oldest_pending_age_seconds=12.34,
        rows={"trades": 10, "trades_live": 8, "trades_expired": 2, "decision_log": 12},
    )


def test_json_object_is_stable_and_rounded() -> None:
    assert as_json(full()) == {
        "profile": "services",
        "at": "2026-12-01T10:00:00.123456Z",
        "ok": True,
        "lag": {"total": 7, "partitions": {"0": 2, "1": 5}},
        "snapshot_age_seconds": 1.3,
        "throughput": {
            "window_seconds": 60,
            "accepted_per_second": 1.67,
            "decided_per_second": 1.5,
        },
        "dead_letters": 3,
        "oldest_pending_age_seconds": 12.3,
        "rows": {"trades": 10, "trades_live": 8, "trades_expired": 2, "decision_log": 12},
        "unavailable": {},
    }


def test_unreadable_figures_are_null_and_named() -> None:
    shown = replace(
        full(),
        lag=None,
        snapshot_age_seconds=None,
        oldest_pending_age_seconds=None,
        unavailable={"lag": "inbound log: locked"},
    )
    got = as_json(shown)
    assert got["ok"] is False
    assert got["lag"] is None
    assert got["unavailable"] == {"lag": "inbound log: locked"}
    lines = {label: (value, read) for label, value, read in summary(shown)}
    assert lines["lag (records)"] == ("unavailable (inbound log: locked)", False)
    assert lines["oldest pending"] == ("none", True)  # readable, and nothing pending
    assert lines["snapshot age"] == ("none yet", True)


def test_plain_lines_align_and_list_partitions() -> None:
    assert plain(full()).splitlines() == [
        "profile                 services",
        "lag (records)           7",
        "snapshot age            1.3 s",
        "oldest pending          12.3 s",
        "accepted/s (last 60 s)  1.67",
        "decided/s (last 60 s)   1.50",
        "dead letters            3",
        "trades                  10 (8 live, 2 expired)",
        "decision log            12",
        "  partition 0           2",
        "  partition 1           5",
    ]


def test_rich_screen_prints_reasons_as_text() -> None:
    """A reason with brackets (``[Errno 111]``) is shown as is, not taken for markup."""
    console = Console(record=True, width=140, force_terminal=True)
    shown = replace(
        full(), dead_letters=None, unavailable={"dead_letters": "Kafka: [Errno 111] refused"}
    )
    show_rich(shown, console)
    screen = console.export_text()
    assert "unavailable (Kafka: [Errno 111] refused)" in screen
    assert "trade-store status  2026-12-01T10:00:00.123456Z" in screen


class DownQueue:
    name = "Kafka"

    def __init__(self) -> None:
        self.asked = 0

    def _down(self) -> int:
        self.asked += 1
        raise ConnectionError("no broker\n  answered")

    def lag(self, positions: Mapping[int, int]) -> dict[int, int]:
        return {0: self._down()}

    def oldest_unread(self, positions: Mapping[int, int]) -> float | None:
        return self._down()

    def queued_since(self, since: datetime) -> int:
        return self._down()

    def dead_letters(self) -> int:
        return self._down()


def test_a_dependency_down_is_asked_once_and_blanks_its_figures(tmp_path: Path) -> None:
    settings = Settings(profile="embedded", data_dir=tmp_path / "absent")
    queue = DownQueue()
    got = gather(settings, queue, AT)
    assert queue.asked == 1
    assert got.lag is None
    assert got.dead_letters is None
    for figure in ("lag", "oldest_pending_age_seconds", "accepted_per_second", "dead_letters"):
        assert got.unavailable[figure] == "Kafka: no broker answered"
    assert got.unavailable["rows"].startswith("trade store: ")  # no such data folder
    assert "snapshot_age_seconds" not in got.unavailable  # no recovery store yet: none


def test_reasons_are_one_short_line() -> None:
    failure = KafkaError(
        KafkaError._TRANSPORT, "Failed to get metadata: Local: Broker transport failure"
    )
    assert (
        reason(KafkaException(failure)) == "Failed to get metadata: Local: Broker transport failure"
    )
    assert reason(TimeoutError()) == "TimeoutError"
    assert len(reason(ValueError("x" * 1000))) == 300
