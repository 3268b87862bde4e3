"""librdkafka's lines go through structlog, at most one per distinct message per 10 s."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from structlog.testing import capture_logs

from config.logs import KAFKA_LOG_EVERY_S, ThrottledKafkaLog
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


def record(facility: str, message: str, client: str = "rdkafka#producer-1") -> logging.LogRecord:
    """What confluent-kafka hands its ``logger``: ``log(level, "%s [%s] %s", fac, name, msg)``."""
    return logging.LogRecord(
        "librdkafka", logging.ERROR, "", 0, "%s [%s] %s", (facility, client, message), None
    )


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_message_is_logged_once_per_10_s_with_the_count_suppressed() -> None:
    clock = Clock()
    handler = ThrottledKafkaLog(clock=clock)
    with capture_logs() as logs:
        for tick in range(100):  # 4 a second for 25 s, from 12 clients, "after N ms" varying
            clock.now = tick / 4
            handler.handle(
                record(
                    "FAIL",
                    f"Connect to ipv4#127.0.0.1:1 failed (after {tick}ms in state CONNECT)",
                    client=f"rdkafka#consumer-{tick % 12}",
                )
            )
    assert [(e["event"], e["log_level"], e["facility"], e["suppressed"]) for e in logs] == [
        ("librdkafka", "error", "FAIL", 0),
        ("librdkafka", "error", "FAIL", 39),
        ("librdkafka", "error", "FAIL", 39),
    ]
    assert logs[1]["message"] == "Connect to ipv4#127.0.0.1:1 failed (after 40ms in state CONNECT)"
    assert logs[1]["client"] == "rdkafka#consumer-4"
    assert KAFKA_LOG_EVERY_S == 10


def test_distinct_messages_are_limited_separately() -> None:
    clock = Clock()
    handler = ThrottledKafkaLog(clock=clock)
    with capture_logs() as logs:
        for _ in range(3):
            handler.handle(record("FAIL", "Connect failed: Connection refused"))
            handler.handle(record("FAIL", "Connect failed: Name resolution failure"))
            handler.handle(record("ERROR", "Connect failed: Connection refused"))
    assert [(e["facility"], e["message"]) for e in logs] == [
        ("FAIL", "Connect failed: Connection refused"),
        ("FAIL", "Connect failed: Name resolution failure"),
        ("ERROR", "Connect failed: Connection refused"),
    ]


CLIENTS_WITH_KAFKA_DOWN = textwrap.dedent(
    """
    import sys, threading, time
    from bytewax.dataflow import Dataflow
    from confluent_kafka import Producer
    from adapters.kafka import ensure_topics, producer_config
    from config.logs import configure_logging
    from sources.kafka import kafka_inbound

    configure_logging("INFO", "json")
    brokers = sys.argv[1]
    # The processor's clients: Bytewax's consumer per partition, built by its own KafkaSource
    # from our add_config, and the dead-letter producer (the API's is the same config).
    flow = Dataflow("logs")
    kafka_inbound(flow, brokers, "inbound", threading.Event())
    source = flow.substeps[0].substeps[0].source
    parts = [source.build_part("inbound", f"{i}-inbound", None) for i in range(12)]
    producer = Producer(producer_config(brokers, 5000, 5))
    try:
        ensure_topics(brokers, {"inbound": 12}, 1, timeout_s=0.5)
    except Exception:
        pass
    end = time.monotonic() + 4
    while time.monotonic() < end:
        producer.poll(0.05)
        for part in parts:
            part.next_batch()
    """
)


def test_kafka_clients_with_kafka_down_log_only_through_structlog_rate_limited() -> None:
    """Without the logger the same clients write ~235 raw lines a second to stderr."""
    done = subprocess.run(
        [sys.executable, "-c", CLIENTS_WITH_KAFKA_DOWN, f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = done.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # nothing raw: every line is structlog's
    assert {e["event"] for e in events} == {"librdkafka"}
    assert any(e["facility"] == "FAIL" and "Connection refused" in e["message"] for e in events)
    # 13 clients failing to connect for 4 s: one line per distinct message.
    assert len(events) == len({(e["facility"], e["message"]) for e in events}) <= 5
