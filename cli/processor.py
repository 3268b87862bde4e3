"""The processing service: the trade dataflow for the configured profile, beside its
sweeps (``cli/sweeps.py``).

``python -m bytewax.run "cli.processor:flow()"`` runs the same dataflow under Bytewax's own
runner (pass -r/-s/-b for recovery yourself); ``trade-store process`` does it for you.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from bytewax import operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.errors import BytewaxRuntimeError
from bytewax.outputs import Sink
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from prometheus_client import REGISTRY, start_http_server

from adapters import wiring
from adapters.kafka import admin_client, kafka_watermarks
from cli.sweeps import ExpirySweeper, Periodic, RetentionSweeper
from config import tracing
from config.runtime import tune_gc
from config.settings import Settings, get_settings
from dataflows.trades import build_flow
from domain.dead_letter import DeadLetter
from sinks.dead_letter import KafkaDeadLetterSink, SqliteDeadLetterSink
from sinks.metrics import QueueLag, SnapshotReader, kafka_lag, log_backlog
from sources.kafka import KAFKA_STEP, kafka_inbound
from sources.sqlite_log import SqliteLogSource
from sources.stoppable import Stoppable

log = structlog.get_logger("processor")

INBOUND_STEP = "inbound-log"


def flow(settings: Settings | None = None, stop: threading.Event | None = None) -> Dataflow:
    """The trade dataflow wired for the configured profile; its input ends once ``stop``
    is set (never, without one: under Bytewax's own runner)."""
    cfg = settings or get_settings()
    log_path = wiring.inbound_log_path(cfg)
    until = stop or threading.Event()

    def inbound(f: Dataflow) -> Stream[Any]:
        if cfg.embedded:
            source = SqliteLogSource(log_path, cfg.inbound_partitions, cfg.source_batch_size)
            return op.input(INBOUND_STEP, f, Stoppable(source, until))
        return kafka_inbound(
            f, cfg.kafka_bootstrap_servers, cfg.inbound_topic, until, cfg.source_batch_size
        )

    dead_letters: Sink[DeadLetter] = (
        SqliteDeadLetterSink(log_path)
        if cfg.embedded
        else KafkaDeadLetterSink(cfg.kafka_bootstrap_servers, cfg.dlq_topic)
    )
    return build_flow(
        inbound=inbound,
        trades=lambda: wiring.trade_store(cfg),
        statuses=lambda: wiring.status_store(cfg),
        dead_letters=dead_letters,
    )


def position_step(settings: Settings, flow_id: str) -> tuple[str, Callable[[str], int]]:
    """The recovery step whose snapshots hold the queue positions, and the partition each
    of its state keys names (Kafka: Bytewax's "<partition>-<topic>")."""
    if settings.embedded:
        return f"{flow_id}.{INBOUND_STEP}", int
    return f"{flow_id}.{KAFKA_STEP}.kafka_input", lambda key: int(key.split("-", 1)[0])


def serve_metrics(settings: Settings, flow_id: str, process_id: int) -> Callable[[], None]:
    """Serve the process's Prometheus registry, with the queue's lag, on the metrics port
    (+ ``process_id``, so a cluster's processes on one host do not collide); returns what
    stops it."""
    step_id, partition_of = position_step(settings, flow_id)
    snapshots = SnapshotReader(settings.recovery_path, step_id)
    if settings.embedded:
        path, partitions = wiring.inbound_log_path(settings), settings.inbound_partitions
        lag = QueueLag(
            snapshots, lambda positions: log_backlog(path, partitions, positions), partition_of
        )
    else:
        admin = admin_client(settings.kafka_bootstrap_servers)
        topic = settings.inbound_topic
        lag = QueueLag(
            snapshots,
            lambda positions: kafka_lag(kafka_watermarks(admin, topic), positions),
            partition_of,
        )
    REGISTRY.register(lag)
    port = settings.metrics_port + process_id  # type: ignore[operator]
    server, thread = start_http_server(port, settings.metrics_host)
    log.info("metrics served", host=settings.metrics_host, port=port)

    def stop() -> None:
        server.shutdown()
        thread.join()
        REGISTRY.unregister(lag)
        snapshots.close()

    return stop


def ensure_recovery_dir(path: Path, partitions: int) -> None:
    """Create Bytewax's recovery partitions on first start; reuse them afterwards."""
    if path.exists() and any(path.iterdir()):
        return
    path.mkdir(parents=True, exist_ok=True)
    init_db_dir(path, partitions)
    log.info("recovery partitions created", path=str(path), partitions=partitions)


def run(
    settings: Settings,
    workers: int,
    process_id: int | None = None,
    addresses: list[str] | None = None,
) -> None:
    """Run until SIGINT/SIGTERM: create topics if missing, sweep expiry, process the queue.

    The first signal ends the input, so the dataflow finishes what it has read, snapshots
    and returns; a second one interrupts it at once (a restart redoes the rest).
    """
    stop = threading.Event()
    # SIGINT too: a process started in the background inherits it as ignored.
    on_signal = stop_then_interrupt(stop)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sweepers: list[Periodic] = []
    stop_metrics: Callable[[], None] | None = None
    try:
        created = wiring.create_topics(settings)
        if created:
            log.info("topics created", topics=created)
        ensure_recovery_dir(settings.recovery_path, settings.recovery_partitions)
        tracing.configure(settings.tracing, "trade-store-processor")
        dataflow = flow(settings, stop)
        trades = wiring.trade_store(settings)  # one engine for both sweeps
        sweepers = [
            ExpirySweeper(trades, settings.business_timezone, settings.expiry_check_seconds),
            RetentionSweeper(settings, f"{dataflow.flow_id}.{INBOUND_STEP}", trades),
        ]
        for sweeper in sweepers:
            sweeper.start()
        if settings.metrics_port is not None:
            stop_metrics = serve_metrics(settings, dataflow.flow_id, process_id or 0)
        log.info("processor started", profile=settings.profile, workers=workers)
        tune_gc()
        cli_main(
            dataflow,
            workers_per_process=workers,
            process_id=process_id,
            addresses=addresses,
            epoch_interval=timedelta(seconds=settings.snapshot_interval_seconds),
            recovery_config=RecoveryConfig(settings.recovery_path),
        )
    except (BytewaxRuntimeError, KeyboardInterrupt) as exc:
        # Bytewax reports a second signal as an error; for us it is a way to stop.
        if not interrupted(exc):
            raise
    finally:
        for sweeper in sweepers:
            sweeper.stop()
        if stop_metrics is not None:
            stop_metrics()
        log.info("processor stopped")


def interrupted(exc: BaseException | None) -> bool:
    """Whether Bytewax stopped because of a signal (SIGINT, or SIGTERM as one)."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt) or "signal received" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def stop_then_interrupt(stop: threading.Event) -> Callable[[int, FrameType | None], None]:
    """A signal handler: the first signal sets ``stop``, any later one interrupts."""

    def handle(_signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.info("processor stopping")

    return handle
