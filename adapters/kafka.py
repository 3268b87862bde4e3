"""The Kafka inbound queue: an idempotent acks=all producer and topic administration."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from adapters.batching import resolve
from config.logs import kafka_logger
from domain.deadline import DEADLINE_HEADER, appended_late, deadline_ms
from domain.message import TradeMessage, encode
from domain.ports import Overloaded, Unavailable
from domain.redrive import REDRIVEN_FROM_HEADER, StoredDeadLetter

# The broker stamps each message with the time it appended it: the stamp the dataflow
# compares with the message's deadline (domain.deadline), also in the delivery report.
INBOUND_TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}


def producer_config(bootstrap: str, timeout_ms: int, linger_ms: int) -> dict[str, Any]:
    """Durable by construction: every in-sync replica acknowledges, retries never duplicate.

    librdkafka reports every message, delivered or failed, within ``delivery.timeout.ms``
    (alias ``message.timeout.ms``) of ``produce()``: the API's produce timeout, so the
    delivery report decides. A message timed out while on the wire may still be appended
    later; its deadline header makes the dataflow refuse it then.
    """
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": linger_ms,
        "delivery.timeout.ms": timeout_ms,
        "request.timeout.ms": min(timeout_ms, 30_000),
        "socket.connection.setup.timeout.ms": max(1_000, min(timeout_ms, 10_000)),
        "compression.type": "lz4",
        "logger": kafka_logger(),
    }


Report = tuple[asyncio.Future[None], Unavailable | None]

# librdkafka's statistics interval for the API's producer: its health is read from the
# broker connections they report, not asked of the cluster on every check.
STATS_INTERVAL_MS = 1000
# Statistics older than this many intervals mean the producer's poll thread stopped.
STATS_STALE_AFTER = 3
REAL_BROKERS = {"configured", "learned"}  # bootstrap servers and brokers from metadata


def _resolve_reports(reports: list[Report]) -> None:
    """On the futures' own loop: each caller learns its delivery report."""
    for acked, failed in reports:
        resolve(acked, failed)


def delivery_error(err: KafkaError | None, deadline: int, msg: Message) -> Unavailable | None:
    """What a delivery report means for the caller: None only if the message was appended
    by its deadline, the same rule the dataflow applies to the record it reads."""
    if err is not None:
        return Unavailable(f"queue did not acknowledge: {err.str()}")
    if appended_late(deadline, msg.timestamp()) is not None:
        return Unavailable("queue acknowledged after the deadline")
    return None


def headers_of(message: TradeMessage, deadline: int | None) -> list[tuple[str, str | bytes | None]]:
    """The queued record's headers, with the trace context it carries; ``deadline`` None
    for a record no API is waiting on (a bulk load), which the dataflow then never refuses
    as late."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("request_id", message.request_id.encode()),
        ("correlation_id", message.correlation_id.encode()),
    ]
    if message.trace:
        headers += message.trace
    if deadline is not None:
        headers.append((DEADLINE_HEADER, str(deadline).encode()))
    if message.redriven_from is not None:
        headers.append((REDRIVEN_FROM_HEADER, message.redriven_from.encode()))
    return headers


class KafkaTradeQueue:
    """Publishes trades keyed by trade_id, so one trade's messages share a partition.

    Delivery reports are served by one poll thread and handed to each event loop once per
    ``poll()`` (one wake-up for however many reports it served), not once per message.
    No timer per message either: librdkafka reports every message, delivered or failed,
    within ``delivery.timeout.ms``.
    """

    def __init__(self, bootstrap: str, topic: str, timeout_ms: int, linger_ms: int) -> None:
        self._topic = topic
        self._bootstrap = bootstrap
        self._timeout_ms = timeout_ms
        self._timeout_s = timeout_ms / 1000
        self._brokers_up: int | None = None  # None until the first statistics
        self._stats_at = 0.0
        self._producer = Producer(
            producer_config(bootstrap, timeout_ms, linger_ms)
            | {"statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": self._stats}
        )
        self._reports: list[Report] = []
        self._running = True
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        running = True
        while running:
            running = self._running  # one last round after close() has flushed
            self._producer.poll(0.05)  # runs _delivered for each report it serves
            if self._reports:
                reports, self._reports = self._reports, []
                by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
                for report in reports:
                    by_loop.setdefault(report[0].get_loop(), []).append(report)
                for loop, settled in by_loop.items():
                    with contextlib.suppress(RuntimeError):  # that loop has closed
                        loop.call_soon_threadsafe(_resolve_reports, settled)

    def _delivered(
        self, acked: asyncio.Future[None], deadline: int, err: KafkaError | None, msg: Message
    ) -> None:
        self._reports.append((acked, delivery_error(err, deadline, msg)))

    async def publish(self, message: TradeMessage) -> None:
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = deadline_ms(message.accepted_at, self._timeout_ms)
        try:
            self._producer.produce(
                self._topic,
                key=message.trade.trade_id.encode(),
                value=encode(message),
                headers=headers_of(message, deadline),
                on_delivery=partial(self._delivered, acked, deadline),
            )
        except BufferError as exc:  # librdkafka's own queue is full: overload, not outage
            raise Overloaded(f"queue: producer queue full ({exc})", 1) from exc
        except KafkaException as exc:
            raise Unavailable(f"queue refused the message: {exc}") from exc
        await acked

    def _stats(self, stats: str) -> None:
        """On the poll thread: how many brokers the producer has a connection up to (not
        counting librdkafka's internal broker, which is always "UP")."""
        brokers = orjson.loads(stats).get("brokers", {}).values()
        self._brokers_up = sum(
            1 for b in brokers if b.get("source") in REAL_BROKERS and b.get("state") == "UP"
        )
        self._stats_at = time.monotonic()

    def ping(self) -> None:
        """Raise Unavailable unless the producer holds a connection to a broker, as its
        latest statistics say (no request to the cluster); before the first statistics
        arrive, a metadata request for the topic decides."""
        if self._brokers_up is not None:
            age_s = time.monotonic() - self._stats_at
            if age_s > STATS_STALE_AFTER * STATS_INTERVAL_MS / 1000:
                raise Unavailable(f"kafka producer: no statistics for {age_s:.1f} s")
            if not self._brokers_up:
                raise Unavailable("kafka producer: no broker connection up")
            return
        try:
            meta = self._producer.list_topics(self._topic, timeout=2)
        except KafkaException as exc:
            raise Unavailable(f"kafka unavailable: {exc}") from exc
        topic = meta.topics.get(self._topic)
        if topic is None or topic.error is not None or not meta.brokers:
            raise Unavailable(f"kafka topic {self._topic} unavailable")

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
        self._running = False
        self._poller.join(timeout=1)


def admin_client(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "logger": kafka_logger()})  # type: ignore[dict-item]


HEADER_ROOM = 64 * 1024
"""What a dead letter may add to the largest record of its source: dead-letter headers."""


def ensure_topics(
    bootstrap: str,
    topics: dict[str, int],
    replication_factor: int,
    dead_letters: dict[str, str] | None = None,
    configs: dict[str, dict[str, str]] | None = None,
    timeout_s: float = 30,
) -> list[str]:
    """Create the missing topics (name → partitions, with ``configs[name]``); return the
    names created.

    ``dead_letters`` maps a dead-letter topic to its source topic. Its ``max.message.bytes``
    is made at least the source's plus ``HEADER_ROOM``, so a record as large as the source
    takes can be dead-lettered whole: set when it is created, raised (never lowered) when an
    earlier version created it smaller. The sources are created first, to read their limit.
    """
    admin = admin_client(bootstrap)
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    sized = dead_letters or {}
    sources = {name: parts for name, parts in topics.items() if name not in sized}
    created = _create(admin, sources, replication_factor, existing, configs or {}, timeout_s)
    if sized:
        limits = max_message_bytes(admin, {*sized.values(), *(set(sized) & existing)}, timeout_s)
        wanted = {dlq: limits[source] + HEADER_ROOM for dlq, source in sized.items()}
        _raise_limits(
            admin, {d: n for d, n in wanted.items() if d in existing and limits[d] < n}, timeout_s
        )
        limited = {
            dlq: (configs or {}).get(dlq, {}) | {"max.message.bytes": str(n)}
            for dlq, n in wanted.items()
        }
        dlqs = {name: topics[name] for name in sized}
        created += _create(admin, dlqs, replication_factor, existing, limited, timeout_s)
    return created


def _create(
    admin: AdminClient,
    topics: dict[str, int],
    replication_factor: int,
    existing: set[str],
    configs: dict[str, dict[str, str]],
    timeout_s: float,
) -> list[str]:
    wanted = [
        NewTopic(
            name,
            num_partitions=parts,
            replication_factor=replication_factor,
            config=configs.get(name, {}),
        )
        for name, parts in topics.items()
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created


NEW_TOPIC_POLL_S = 0.2


def max_message_bytes(admin: AdminClient, topics: set[str], timeout_s: float) -> dict[str, int]:
    """Each topic's effective ``max.message.bytes`` (its own or the broker's default)."""
    described = topic_configs(admin, topics, timeout_s)
    return {name: int(config["max.message.bytes"]) for name, config in described.items()}


def topic_configs(
    admin: AdminClient, topics: set[str], timeout_s: float
) -> dict[str, dict[str, str]]:
    """Each topic's effective configuration, name → value.

    A topic created a moment ago may not be known yet to the broker that answers (KRaft
    spreads new topics' metadata asynchronously): that answer is asked again, within
    ``timeout_s``, instead of failing.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in topics]
        described = admin.describe_configs(resources, request_timeout=timeout_s)
        try:
            return {
                resource.name: {key: entry.value for key, entry in future.result().items()}
                for resource, future in described.items()
            }
        except KafkaException as exc:
            unknown = exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not unknown or time.monotonic() >= deadline:
                raise
            time.sleep(NEW_TOPIC_POLL_S)


def _raise_limits(admin: AdminClient, limits: dict[str, int], timeout_s: float) -> None:
    if not limits:
        return
    resources = [
        ConfigResource(
            ResourceType.TOPIC,
            name,
            incremental_configs=[
                ConfigEntry(
                    "max.message.bytes", str(limit), incremental_operation=AlterConfigOpType.SET
                )
            ],
        )
        for name, limit in limits.items()
    ]
    for future in admin.incremental_alter_configs(resources, request_timeout=timeout_s).values():
        future.result()


def dead_letter_producer_config(bootstrap: str, topic: str, timeout_ms: int) -> dict[str, Any]:
    """The durable producer config, its record limit the dead-letter topic's own.

    One record per batch: the broker refuses a whole batch for its size, so with one record
    a size refusal names the record at fault. Dead letters are rare; throughput is no issue.
    """
    admin = admin_client(bootstrap)
    try:
        limit = max_message_bytes(admin, {topic}, timeout_ms / 1000)[topic]
    except KafkaException as exc:
        raise Unavailable(f"cannot read the limit of {topic}: {exc}") from exc
    return producer_config(bootstrap, timeout_ms, linger_ms=5) | {
        "message.max.bytes": limit,
        "batch.num.messages": 1,
    }


READ_POLL_S = 0.5


class KafkaDeadLetters:
    """The dead-letter topic, read back (``trade-store dlq``) by an assigned consumer that
    commits nothing; a letter's id is ``<partition>:<offset>``. A listing ends at the high
    watermarks as they were when it started."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 10) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._timeout_s = timeout_s

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": "trade-store-dlq",  # never joined nor committed: assign() only
                "enable.auto.commit": False,
                "logger": kafka_logger(),
            }
        )

    def _ranges(self, consumer: Consumer, since: datetime | None) -> dict[int, tuple[int, int]]:
        """Per partition, the offsets [start, end) to read."""
        try:
            meta = consumer.list_topics(self._topic, timeout=self._timeout_s).topics[self._topic]
            if meta.error is not None:
                raise Unavailable(f"dead-letter topic {self._topic}: {meta.error}")
            ranges = {}
            for partition in meta.partitions:
                tp = TopicPartition(self._topic, partition)
                low, high = consumer.get_watermark_offsets(tp, timeout=self._timeout_s)
                ranges[partition] = (low, high)
            if since is not None:
                wanted = [
                    TopicPartition(self._topic, p, int(since.timestamp() * 1000)) for p in ranges
                ]
                for tp in consumer.offsets_for_times(wanted, timeout=self._timeout_s):
                    low, high = ranges[tp.partition]
                    ranges[tp.partition] = (high if tp.offset < 0 else max(low, tp.offset), high)
        except KafkaException as exc:
            raise Unavailable(f"dead-letter topic {self._topic}: {exc}") from exc
        return {p: r for p, r in ranges.items() if r[0] < r[1]}

    def letters(self, since: datetime | None = None) -> Iterator[StoredDeadLetter]:
        consumer = self._consumer()
        try:
            ranges = self._ranges(consumer, since)
            consumer.assign([TopicPartition(self._topic, p, r[0]) for p, r in ranges.items()])
            left = {p: end for p, (_, end) in ranges.items()}
            quiet_since = time.monotonic()
            while left:
                got = consumer.consume(100, READ_POLL_S)
                for msg in got:
                    if msg.error() is not None:
                        raise Unavailable(f"dead-letter topic {self._topic}: {msg.error()}")
                    partition, offset = msg.partition() or 0, msg.offset() or 0
                    end = left.get(partition)
                    if end is None or offset >= end:
                        continue
                    yield _stored(msg)
                    if offset + 1 >= end:
                        del left[partition]
                if got:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > self._timeout_s:
                    raise Unavailable(f"dead-letter topic {self._topic}: no records in time")
        finally:
            consumer.close()

    def letter(self, letter_id: str) -> StoredDeadLetter | None:
        partition, _, offset = letter_id.partition(":")
        if not (partition.isdecimal() and offset.isdecimal()):
            raise ValueError(f"{letter_id!r} is not a dead-letter id (<partition>:<offset>)")
        consumer = self._consumer()
        try:
            tp = TopicPartition(self._topic, int(partition))
            try:
                low, high = consumer.get_watermark_offsets(tp, timeout=self._timeout_s)
            except KafkaException as exc:
                raise Unavailable(f"dead-letter topic {self._topic}: {exc}") from exc
            if not low <= int(offset) < high:
                return None
            consumer.assign([TopicPartition(self._topic, int(partition), int(offset))])
            deadline = time.monotonic() + self._timeout_s
            while time.monotonic() < deadline:
                msg = consumer.poll(READ_POLL_S)
                if msg is not None and msg.error() is None:
                    return _stored(msg) if msg.offset() == int(offset) else None
            raise Unavailable(f"dead-letter topic {self._topic}: no record in time")
        finally:
            consumer.close()


def _stored(msg: Message) -> StoredDeadLetter:
    # A consumer's headers are a list of (name, bytes or None) pairs.
    raw = cast(list[tuple[str, bytes | None]], msg.headers() or [])
    headers = [(name, value or b"") for name, value in raw]
    reason = next((v.decode(errors="replace") for k, v in headers if k == "dlq_reason"), "")
    return StoredDeadLetter(
        id=f"{msg.partition()}:{msg.offset()}",
        at=datetime.fromtimestamp(msg.timestamp()[1] / 1000, UTC),
        reason=reason,
        key=msg.key(),
        value=msg.value(),
        headers=headers,
    )


# Where a topic stands (the processor's lag, `status`, `replay`); every call is bounded.
def kafka_watermarks(
    admin: AdminClient, topic: str, timeout_s: float = 2.0
) -> dict[int, tuple[int, int]]:
    """Per partition of ``topic``, its (low, high) watermarks, in two requests."""
    meta = admin.list_topics(topic, timeout=timeout_s).topics[topic]
    parts = [TopicPartition(topic, p) for p in meta.partitions]

    def offsets(spec: OffsetSpec) -> dict[int, int]:
        futures = admin.list_offsets(dict.fromkeys(parts, spec), request_timeout=timeout_s)
        return {tp.partition: f.result().offset for tp, f in futures.items()}

    low, high = offsets(OffsetSpec.earliest()), offsets(OffsetSpec.latest())  # type: ignore[no-untyped-call]
    return {p: (low[p], high[p]) for p in high}


def offsets_since(
    admin: AdminClient, topic: str, partitions: Iterable[int], since_ms: int, timeout_s: float
) -> dict[int, int]:
    """Per partition, the first offset the broker stamped at or after ``since_ms`` (the
    inbound topic is stamped with LogAppendTime), or -1 when none is that recent."""
    spec = OffsetSpec.for_timestamp(since_ms)
    asked = {TopicPartition(topic, p): spec for p in partitions}
    futures = admin.list_offsets(asked, request_timeout=timeout_s)
    return {tp.partition: f.result().offset for tp, f in futures.items()}


def record_timestamps(
    bootstrap: str, topic: str, offsets: Mapping[int, int], timeout_s: float
) -> dict[int, float]:
    """The broker's stamp (unix seconds) of the record at each partition's offset, read
    with a consumer that joins no group and commits nothing; partitions whose record did
    not arrive within ``timeout_s`` are left out."""
    if not offsets:
        return {}
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "trade-store-status",  # required by the client; never joined
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "logger": kafka_logger(),
        }
    )
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in offsets.items()])
        found: dict[int, float] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < len(offsets) and (left := deadline - time.monotonic()) > 0:
            for msg in consumer.consume(len(offsets), timeout=min(left, 0.5)):
                partition = msg.partition()
                if msg.error() is None and partition is not None and partition not in found:
                    found[partition] = msg.timestamp()[1] / 1000
                    consumer.pause([TopicPartition(topic, partition)])
        return found
    finally:
        consumer.close()
