"""The services profile's lag, scraped from a real processor on real Kafka: records queued
before it starts are its lag, per partition, until a recovery snapshot covers them."""

from __future__ import annotations

import httpx
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from adapters import wiring
from config.settings import Settings
from tests.conftest import settings_env, unique
from tests.support import free_port, start, stop, wait_for


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return {}
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def test_lag_per_partition_rises_with_the_queue_and_falls_to_zero(
    migrated: Settings,
) -> None:
    port = free_port()
    settings = migrated.model_copy(
        update={
            "inbound_topic": unique("trades-inbound-lag"),
            "dlq_topic": unique("trades-dlq-lag"),
            "recovery_dir": migrated.recovery_path.parent / unique("recovery-lag"),
            "snapshot_interval_seconds": 3.0,
            "metrics_port": port,
        }
    )
    wiring.create_topics(settings)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for i in range(6):  # undecodable: dead letters, so no status store is involved
        producer.produce(settings.inbound_topic, key=f"L{i}".encode(), value=b"{not json")
    assert producer.flush(10) == 0

    def lag() -> dict[str, float] | None:
        samples = scrape(port).get("trade_store_processor_lag_records")
        return {dict(k)["partition"]: v for k, v in samples.items()} if samples else None

    processor = start(
        f"processor-lag-{settings.inbound_topic}", ["process"], settings_env(settings)
    )
    try:
        queued = wait_for(
            lambda: (found := lag()) and sum(found.values()) == 6 and found, 60, "lag 6"
        )
        assert sorted(queued) == ["0", "1", "2", "3"]
        wait_for(lambda: (found := lag()) is not None and sum(found.values()) == 0, 30, "lag 0")
        dead = scrape(port)["trade_store_processor_dead_letters"]
        assert sum(dead.values()) == 6
    finally:
        assert stop(processor) == 0
