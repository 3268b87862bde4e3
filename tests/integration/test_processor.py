"""The processor (`trade-store process`) on real Kafka, PostgreSQL and dynoxide (DynamoDB)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from adapters import wiring
from adapters.dynamodb import DynamoStatusStore
from adapters.kafka import KafkaTradeQueue, headers_of
from adapters.sql import SqlTradeStore
from config.clock import business_today
from config.settings import Settings
from domain.deadline import deadline_ms
from domain.message import TradeMessage, encode
from domain.status import RequestState, RequestStatus
from domain.trade import Trade
from tests.conftest import own_topics, settings_env, unique
from tests.support import free_port, start, stop, wait_for

TODAY = business_today("UTC")


@pytest.fixture
def own(migrated: Settings, tmp_path: Path) -> Settings:
    """This test's own topics and recovery folder."""
    return own_topics(migrated, tmp_path, source_batch_size=50)


class Processor:
    def __init__(self, settings: Settings, *args: str) -> None:
        self.settings = settings
        self.proc = start(
            f"processor-{settings.inbound_topic}", ["process", *args], settings_env(settings)
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop(self.proc, sig)


@pytest.fixture
def processors() -> Iterator[Callable[..., Processor]]:
    """Start processors at will; every one still running is stopped at teardown."""
    started: list[Processor] = []

    def start_one(settings: Settings, *args: str) -> Processor:
        started.append(Processor(settings, *args))
        return started[-1]

    yield start_one
    for p in started:
        p.stop()


@pytest.fixture
def processor(own: Settings, processors: Callable[..., Processor]) -> Processor:
    return processors(own)


def message(trade_id: str, version: int, maturity_days: int = 30) -> TradeMessage:
    return TradeMessage(
        request_id=str(uuid.uuid4()),
        correlation_id=unique("corr"),
        accepted_on=TODAY,
        accepted_at=datetime.now(UTC),
        trade=Trade(trade_id, version, "CP-1", "B1", TODAY + timedelta(days=maturity_days), TODAY),
    )


async def publish(settings: Settings, rounds: list[list[TradeMessage]]) -> None:
    """Publish round by round: every message of a round concurrently, rounds in order."""
    queue = wiring.trade_queue(settings)
    assert isinstance(queue, KafkaTradeQueue)
    for batch in rounds:
        await asyncio.gather(*(queue.publish(m) for m in batch))
    queue.close()


def terminal(store: DynamoStatusStore, request_ids: list[str]) -> dict[str, RequestState] | None:
    states = {}
    for rid in request_ids:
        status = store.get(rid)
        if status is None or not status.state.terminal:
            return None
        states[rid] = status.state
    return states


def decided_in_order(
    settings: Settings, trade_store: SqlTradeStore, status_store: DynamoStatusStore
) -> None:
    """Four rounds of versions (1, 2, 1, 2) of twelve trades end SUCCESS, SUCCESS, FAILED
    (stale), SUCCESS, with versions 1 and 2 stored."""
    ids = [unique("T") for _ in range(12)]
    rounds = [[message(tid, v) for tid in ids] for v in (1, 2, 1, 2)]
    asyncio.run(publish(settings, rounds))
    states = wait_for(
        lambda: terminal(status_store, [m.request_id for r in rounds for m in r]),
        60,
        "all requests terminal",
    )
    expected = [
        RequestState.SUCCESS,
        RequestState.SUCCESS,
        RequestState.FAILED,
        RequestState.SUCCESS,
    ]
    for i, tid in enumerate(ids):
        assert [states[r[i].request_id] for r in rounds] == expected
        assert [r.trade.version for r in trade_store.versions(tid, TODAY)] == [1, 2]
    stale = status_store.get(rounds[2][0].request_id)
    assert stale is not None
    assert stale.reason_code is not None
    assert stale.reason_code.value == "STALE_VERSION"


@pytest.mark.parametrize("workers", [1, 3])
def test_decides_and_persists(
    own: Settings,
    processors: Callable[..., Processor],
    trade_store: SqlTradeStore,
    status_store: DynamoStatusStore,
    workers: int,
) -> None:
    """Scaling out is one flag: with 3 workers, each trade is still decided in order."""
    processor = processors(own.model_copy(update={"processor_workers": workers}))
    decided_in_order(processor.settings, trade_store, status_store)


def test_a_cluster_of_two_processes_decides_in_order(
    own: Settings,
    processors: Callable[..., Processor],
    trade_store: SqlTradeStore,
    status_store: DynamoStatusStore,
) -> None:
    """Scaling across hosts: two processes started together on one shared recovery folder
    split the partitions between them, and each trade is still decided in order."""
    addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    for index in range(2):
        processors(own, "--process-id", str(index), "--addresses", addresses)
    decided_in_order(own, trade_store, status_store)


def test_bad_data_goes_to_dead_letter_topic(
    processor: Processor, status_store: DynamoStatusStore
) -> None:
    settings = processor.settings
    bad_request = unique("bad")
    now = datetime.now(UTC)
    pending = RequestStatus(bad_request, RequestState.PENDING, "T", 1, now, now)
    asyncio.run(status_store.put_pending(pending))  # as the API does before queueing
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    producer.produce(
        settings.inbound_topic,
        key=b"T",
        value=b"{broken",
        headers=[("request_id", bad_request.encode()), ("correlation_id", b"c-bad")],
    )
    producer.flush(10)
    good = message(unique("T"), 1)
    asyncio.run(publish(settings, [[good]]))
    wait_for(lambda: terminal(status_store, [bad_request, good.request_id]), 60, "terminal")
    failed = status_store.get(bad_request)
    assert failed is not None
    assert failed.state is RequestState.FAILED
    assert failed.reason_code is not None
    assert failed.reason_code.value == "INVALID_MESSAGE"

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "t"})
    consumer.assign([TopicPartition(settings.dlq_topic, 0, 0)])
    letters = wait_for(lambda: consumer.consume(10, 0.5), 30, "a dead letter")
    consumer.close()
    assert letters[0].value() == b"{broken"
    headers = dict(letters[0].headers())
    assert headers["request_id"] == bad_request.encode()
    assert headers["dlq_reason"] == b"value is not JSON"


def test_restart_mid_stream_loses_nothing_and_lost_state_replays_cleanly(
    own: Settings,
    processors: Callable[..., Processor],
    trade_store: SqlTradeStore,
    status_store: DynamoStatusStore,
) -> None:
    """Kill -9 mid-stream, restart; then wipe recovery and replay the whole topic."""
    ids = [unique("T") for _ in range(300)]
    rounds = [[message(tid, v) for tid in ids] for v in range(1, 9)]
    rounds.append([message(tid, 3) for tid in ids])  # stale
    request_ids = [m.request_id for r in rounds for m in r]
    asyncio.run(publish(own, rounds))

    first = processors(own)
    wait_for(lambda: trade_store.heads(ids), 60, "some progress", every=0.01)
    first.stop(signal.SIGKILL)
    heads = trade_store.heads(ids)
    assert len(heads) < len(ids) or min(heads.values()) < 8, "killed too late to test a restart"

    second = processors(own)
    states = wait_for(lambda: terminal(status_store, request_ids), 120, "all terminal")
    second.stop()
    expected = {m.request_id: RequestState.SUCCESS for r in rounds[:-1] for m in r}
    expected.update({m.request_id: RequestState.FAILED for m in rounds[-1]})
    assert states == expected
    rows_before = {tid: trade_store.versions(tid, TODAY) for tid in ids}
    assert all(
        [r.trade.version for r in rows] == list(range(1, 9)) for rows in rows_before.values()
    )

    shutil.rmtree(own.recovery_dir)
    third = processors(own)
    sentinels = publish_sentinels(own)
    wait_for(lambda: terminal(status_store, sentinels), 120, "replay of every partition")
    third.stop()
    assert terminal(status_store, request_ids) == expected
    rows_after = {tid: trade_store.versions(tid, TODAY) for tid in ids}
    assert {t: [(r.trade, r.created_at) for r in rows] for t, rows in rows_after.items()} == {
        t: [(r.trade, r.created_at) for r in rows] for t, rows in rows_before.items()
    }


def publish_sentinels(settings: Settings) -> list[str]:
    """One fresh message at the end of every partition: when all are decided, all is read."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    sentinels = []
    for partition in range(settings.inbound_partitions):
        m = message(unique("sentinel"), 1)
        producer.produce(
            settings.inbound_topic,
            key=m.trade.trade_id.encode(),
            value=encode(m),
            partition=partition,
            headers=[("request_id", m.request_id.encode())],
        )
        sentinels.append(m.request_id)
    producer.flush(10)
    return sentinels


def test_a_record_appended_after_its_deadline_is_refused(
    processor: Processor, trade_store: SqlTradeStore, status_store: DynamoStatusStore
) -> None:
    """A message the API answered 503 for, written by the broker later anyway (as after a
    frozen broker resumes), is dead-lettered: not stored, and its request gets no status."""
    settings = processor.settings
    late = message(unique("T-late"), 1)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    overdue = deadline_ms(late.accepted_at - timedelta(seconds=10), settings.produce_timeout_ms)
    producer.produce(
        settings.inbound_topic,
        key=late.trade.trade_id.encode(),
        value=encode(late),
        headers=headers_of(late, overdue),
    )
    producer.flush(10)
    good = message(unique("T"), 1)
    asyncio.run(publish(settings, [[good]]))
    wait_for(lambda: terminal(status_store, [good.request_id]), 60, "the good request terminal")

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": "t"})
    consumer.assign([TopicPartition(settings.dlq_topic, 0, 0)])
    letters = wait_for(lambda: consumer.consume(10, 0.5), 30, "a dead letter")
    consumer.close()
    assert [letter.value() for letter in letters] == [encode(late)]
    reason = dict(letters[0].headers())["dlq_reason"].decode()
    assert reason.startswith("queued after the API answered 503")
    assert status_store.get(late.request_id) is None
    assert trade_store.versions(late.trade.trade_id, TODAY) == []
