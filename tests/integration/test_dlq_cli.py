"""`trade-store dlq list|show|redrive` on real dead letters, in both profiles: the embedded log
file (SQLite) and Kafka + dynoxide + PostgreSQL. Each test queues an undecodable record and
a decodable one the dataflow refused (a schema version it does not know), lets a running
processor dead-letter both, then reads and redrives them through the command."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest import mock

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from adapters import wiring
from adapters.dynamodb import DynamoStatusStore
from adapters.inbound_log import decode_headers
from cli.main import main
from config.clock import business_today
from config.settings import Settings, get_settings
from domain.redrive import redrive_key_name
from domain.status import RequestState, RequestStatus
from tests.conftest import settings_env, unique
from tests.integration import test_processor
from tests.integration.test_processor import Processor
from tests.support import start, stop, wait_for, write_pending

TODAY = business_today("UTC")
own = test_processor.own  # the fixture: a test's own topics and recovery folder


def refused_body(request_id: str, trade_id: str) -> bytes:
    """A record whose trade is sound but whose envelope the dataflow refuses."""
    trade = {
        "trade_id": trade_id,
        "version": 1,
        "counterparty_id": "CP-1",
        "book_id": "B1",
        "maturity_date": (TODAY + timedelta(days=30)).isoformat(),
        "created_date": TODAY.isoformat(),
    }
    return json.dumps({"schema_version": 99, "request_id": request_id, "trade": trade}).encode()


@dataclass
class Letters:
    """One test's dead letters: where they came from and how to look at the stores."""

    settings: Settings
    garbage_request: str
    refused_request: str
    state: Callable[[str], RequestState | None]
    queued: Callable[[], list[dict[str, str]]]  # the inbound records' headers, in order


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def dlq(settings: Settings, *args: str) -> Done:
    """``trade-store dlq ...`` in this process (a child would take seconds to import on a
    busy machine), with ``settings`` as its whole environment; stdout is not a TTY."""
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, settings_env(settings), clear=True),
        # main's interpreter-wide hooks (config.logs.capture_uncaught) are put back after
        mock.patch.object(sys, "excepthook", sys.excepthook),
        mock.patch.object(sys, "unraisablehook", sys.unraisablehook),
        mock.patch.object(threading, "excepthook", threading.excepthook),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = main(["dlq", *args])
        finally:
            get_settings.cache_clear()  # main's settings were this environment's
    return Done(code, out.getvalue(), err.getvalue())


def listed(settings: Settings, *args: str) -> list[dict[str, object]]:
    done = dlq(settings, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def held(settings: Settings, letter_id: str) -> bool:
    store = wiring.dead_letters(settings)[1]
    return asyncio.run(wiring.held_keys(settings)(redrive_key_name(store, letter_id))) is not None


def terminal(letters: Letters, request_id: str) -> RequestState | None:
    state = letters.state(request_id)
    return state if state is not None and state.terminal else None


def check_the_commands(letters: Letters) -> None:
    settings = letters.settings
    both = listed(settings)
    assert [row["request_id"] for row in both] == [
        letters.refused_request,  # newest first: it was queued after the garbage
        letters.garbage_request,
    ]
    refused, garbage = both
    assert refused["reason"] == "unsupported schema_version 99"
    assert garbage["reason"] == "value is not JSON"
    assert listed(settings, "--reason", "SCHEMA") == [refused]
    assert listed(settings, "--limit", "1") == [refused]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert listed(settings, "--since", future) == []
    plain = dlq(settings, "list").stdout.splitlines()  # not a TTY: plain lines
    assert [line.split("\t")[:3] for line in plain] == [
        [str(row["id"]), str(row["at"]), str(row["reason"])] for row in both
    ]

    shown = json.loads(dlq(settings, "show", str(refused["id"]), "--json").stdout)
    assert shown["value"]["schema_version"] == 99
    assert ["dlq_reason", "unsupported schema_version 99"] in shown["headers"]
    assert shown["redriven_as"] is None
    shown = json.loads(dlq(settings, "show", str(garbage["id"]), "--json").stdout)
    assert shown["value_escaped"] == "garbage\\x00"
    assert "value" not in shown
    assert dlq(settings, "show", "999999" if settings.embedded else "0:999999").returncode == 1

    ids = [str(refused["id"]), str(garbage["id"])]
    before = letters.queued()
    dry = dlq(settings, "redrive", "--dry-run", *ids)
    assert dry.returncode == 1  # the garbage is skipped
    assert dry.stdout.startswith(f"{refused['id']}\twould redrive\ttrade ")
    assert "still undecodable (value is not JSON)" in dry.stderr
    assert letters.queued() == before
    assert not held(settings, ids[0])  # the dry run claimed nothing

    done = dlq(settings, "redrive", *ids)
    assert done.returncode == 1, done.stderr
    [line] = done.stdout.splitlines()
    letter_id, new_request = line.split("\t")
    assert letter_id == refused["id"]
    assert f"{garbage['id']}: skipped: still undecodable" in done.stderr
    assert wait_for(lambda: terminal(letters, new_request), 90, "the redrive decided") is (
        RequestState.SUCCESS
    )
    assert letters.state(letters.refused_request) is RequestState.FAILED
    assert letters.state(letters.garbage_request) is RequestState.FAILED
    [redriven] = letters.queued()[len(before) :]
    assert redriven["request_id"] == new_request
    assert redriven["redriven_from"] == refused["id"]
    assert json.loads(dlq(settings, "show", ids[0], "--json").stdout)["redriven_as"] == (
        new_request
    )

    again = dlq(settings, "redrive", ids[0])
    assert again.returncode == 1
    assert again.stdout == ""
    assert f"refused: redriven before as {new_request}" in again.stderr
    every = dlq(settings, "redrive", "--all")  # the one left is the garbage
    assert every.returncode == 1
    assert every.stdout == ""
    assert "0 redriven, 1 skipped, 1 refused" in every.stderr
    assert len(letters.queued()) == len(before) + 1

    forced = dlq(settings, "redrive", "--force", ids[0])
    assert forced.returncode == 0, forced.stderr
    [line] = forced.stdout.splitlines()
    newer = line.split("\t")[1]
    assert newer != new_request
    assert wait_for(lambda: terminal(letters, newer), 90, "the forced redrive decided") is (
        RequestState.SUCCESS
    )
    assert letters.queued()[-1]["redriven_from"] == refused["id"]
    assert letters.state(letters.refused_request) is RequestState.FAILED


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[Settings, subprocess.Popen[bytes]]]:
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", inbound_partitions=2)
    env = settings_env(settings)
    subprocess.run([sys.executable, "-m", "cli.main", "migrate"], env=env, check=True)
    wiring.create_topics(settings)
    processor = start("dlq-embedded-processor", ["process"], env)
    yield settings, processor
    stop(processor)


def test_dlq_commands_on_the_embedded_log(
    embedded: tuple[Settings, subprocess.Popen[bytes]],
) -> None:
    settings, _ = embedded
    path = wiring.inbound_log_path(settings)
    statuses = wiring.status_store(settings)
    assert not isinstance(statuses, DynamoStatusStore)
    garbage, refused = unique("garbage"), unique("refused")
    now = datetime.now(UTC)
    write_pending(
        statuses,
        *(RequestStatus(r, RequestState.PENDING, "T", 1, now, now) for r in (garbage, refused)),
    )
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO inbound_log (partition, key, value, headers) VALUES (0, ?, ?, ?)",
            [
                (b"T", b"garbage\x00", json.dumps([["request_id", garbage]])),
                (b"T", refused_body(refused, unique("T")), json.dumps([["request_id", refused]])),
            ],
        )

    def state(request_id: str) -> RequestState | None:
        status = statuses.get(request_id)
        return status.state if status else None

    def queued() -> list[dict[str, str]]:
        with sqlite3.connect(path) as conn:
            rows = conn.execute("SELECT headers FROM inbound_log ORDER BY seq").fetchall()
        return [{k: v.decode() for k, v in decode_headers(h)} for (h,) in rows]

    letters = Letters(settings, garbage, refused, state, queued)
    for request in (garbage, refused):
        assert wait_for(lambda r=request: terminal(letters, r), 60, "dead-lettered") is (
            RequestState.FAILED
        )
    check_the_commands(letters)


def test_dlq_commands_on_kafka(own: Settings) -> None:
    settings = own
    statuses = wiring.status_store(settings)
    assert isinstance(statuses, DynamoStatusStore)
    garbage, refused = unique("garbage"), unique("refused")
    now = datetime.now(UTC)
    for request in (garbage, refused):
        pending = RequestStatus(request, RequestState.PENDING, "T", 1, now, now)
        asyncio.run(statuses.put_pending(pending))
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for request, value in ((garbage, b"garbage\x00"), (refused, refused_body(refused, "T"))):
        producer.produce(
            settings.inbound_topic,
            key=b"T",
            value=value,
            headers=[("request_id", request.encode())],
        )
    assert producer.flush(30) == 0

    def state(request_id: str) -> RequestState | None:
        status = statuses.get(request_id)
        return status.state if status else None

    def queued() -> list[dict[str, str]]:
        """Every inbound record's headers, by partition then offset (one trade: one
        partition, so in the order queued)."""
        consumer = Consumer(
            {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": unique("t")}
        )
        meta = consumer.list_topics(settings.inbound_topic, timeout=10)
        partitions = sorted(meta.topics[settings.inbound_topic].partitions)
        got: list[dict[str, str]] = []
        for p in partitions:
            tp = TopicPartition(settings.inbound_topic, p, 0)
            _, high = consumer.get_watermark_offsets(tp, timeout=10)
            consumer.assign([tp])
            records = []
            while len(records) < high:
                records += [m for m in consumer.consume(100, 1) if m.error() is None]
            got += [{k: (v or b"").decode() for k, v in m.headers() or []} for m in records]
        consumer.close()
        return got

    letters = Letters(settings, garbage, refused, state, queued)
    processor = Processor(settings)
    try:
        for request in (garbage, refused):
            assert wait_for(lambda r=request: terminal(letters, r), 90, "dead-lettered") is (
                RequestState.FAILED
            )
        wait_for(lambda: len(listed(settings)) == 2, 30, "both dead letters on the topic")
        check_the_commands(letters)
    finally:
        processor.stop()
