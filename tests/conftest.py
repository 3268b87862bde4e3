"""Shared fixtures. Tests under integration/ and e2e/ run on real services, which
``service_endpoints`` finds or starts, in this order:

1. environment variables (``TRADE_STORE_TEST_DATABASE_URL``,
   ``TRADE_STORE_KAFKA_BOOTSTRAP_SERVERS``, ``TRADE_STORE_DYNAMODB_ENDPOINT_URL``): any one set
   means "use what is running there"; the ones left unset take scripts/services' conventions;
2. scripts/services' PostgreSQL, Kafka and dynoxide, when all three already answer;
3. testcontainers (postgres:16, apache/kafka in KRaft mode, DynamoDB local) when a Docker
   engine answers;
4. otherwise ``scripts/services up``.

A service that does not answer fails the run; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import pytest
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]
from sqlalchemy import text
from sqlalchemy.engine import make_url

from adapters import wiring
from adapters.dynamodb import DynamoStatusStore, make_client
from adapters.sql import SqlTradeStore, make_engine
from config.settings import Settings
from tests.support import free_port, stop

SERVICES = Path(__file__).resolve().parent.parent / "scripts" / "services"
DATABASE_VAR = "TRADE_STORE_TEST_DATABASE_URL"
KAFKA_VAR = "TRADE_STORE_KAFKA_BOOTSTRAP_SERVERS"
DYNAMODB_VAR = "TRADE_STORE_DYNAMODB_ENDPOINT_URL"
Source = Literal["env", "services", "containers", "start"]


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    kafka_bootstrap_servers: str
    dynamodb_endpoint_url: str

    @classmethod
    def from_vars(cls, values: Mapping[str, str]) -> Endpoints:
        """The endpoints named in KEY=value pairs (as scripts/services prints them)."""
        return cls(values[DATABASE_VAR], values[KAFKA_VAR], values[DYNAMODB_VAR])

    def addresses(self) -> dict[str, tuple[str, int]]:
        """Each service's (host, port), for the reachability check."""
        db = urlsplit(self.database_url)
        kafka = urlsplit(f"//{self.kafka_bootstrap_servers.split(',')[0]}")
        dyn = urlsplit(self.dynamodb_endpoint_url)
        return {
            "PostgreSQL": (db.hostname or "127.0.0.1", db.port or 5432),
            "Kafka": (kafka.hostname or "127.0.0.1", kafka.port or 9092),
            "DynamoDB": (dyn.hostname or "127.0.0.1", dyn.port or 80),
        }


def choose_source(
    env: Mapping[str, str], services_up: Callable[[], bool], docker_answers: Callable[[], bool]
) -> Source:
    """Where this session's services come from; the probes run only when reached."""
    if any(env.get(name) for name in (DATABASE_VAR, KAFKA_VAR, DYNAMODB_VAR)):
        return "env"
    if services_up():
        return "services"
    if docker_answers():
        return "containers"
    return "start"


def parse_vars(output: str) -> dict[str, str]:
    """KEY=value lines (what ``scripts/services env`` and ``up`` print on stdout)."""
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def answers(address: tuple[str, int]) -> bool:
    """Does something accept TCP connections there?"""
    try:
        socket.create_connection(address, timeout=2).close()
    except OSError:
        return False
    return True


def docker_answers() -> bool:
    """Does a Docker engine answer a ping (DOCKER_HOST or the default socket)?"""
    import docker

    try:
        docker.from_env(timeout=3).ping()
    except Exception:  # no engine, no socket, no permission: all mean "no"
        return False
    return True


def services_script(command: str) -> dict[str, str]:
    """Run ``scripts/services env`` (prints only) or ``up`` and read what it prints."""
    done = subprocess.run(
        [str(SERVICES), command], stdout=subprocess.PIPE, text=True, timeout=1800, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/services {command} failed (exit {done.returncode}); see its stderr")
    return parse_vars(done.stdout)


def start_containers(stack: contextlib.ExitStack) -> Endpoints:
    """PostgreSQL, Kafka (KRaft, the broker version scripts/services runs) and DynamoDB local in
    containers on the local Docker engine, stopped with ``stack``."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy
    from testcontainers.postgres import PostgresContainer

    pg = PostgresContainer(
        "postgres:16", username="trade_store", password="trade_store", dbname="trade_store_test"
    )
    kafka_port = free_port()  # the broker advertises the host port, so it is fixed up front
    kafka = (
        DockerContainer("apache/kafka:4.1.1")
        .with_bind_ports(9092, kafka_port)
        .with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS="PLAINTEXT://:9092,CONTROLLER://:9093",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://127.0.0.1:{kafka_port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
        )
        .waiting_for(LogMessageWaitStrategy("Kafka Server started"))
    )
    dyn = (
        DockerContainer("amazon/dynamodb-local:2.5.2")
        .with_command("-jar DynamoDBLocal.jar -inMemory -sharedDb")
        .with_exposed_ports(8000)
        .waiting_for(LogMessageWaitStrategy("Initializing DynamoDB Local"))
    )
    for container in (pg, kafka, dyn):
        stack.enter_context(container)
    return Endpoints(
        pg.get_connection_url(driver="psycopg"),
        f"127.0.0.1:{kafka_port}",
        f"http://{dyn.get_container_host_ip()}:{dyn.get_exposed_port(8000)}",
    )


@pytest.fixture(scope="session")
def service_endpoints() -> Iterator[Endpoints]:
    """The real services of this session (see the module docstring for the order)."""
    with contextlib.ExitStack() as stack:
        conventions = services_script("env")
        default = Endpoints.from_vars(conventions)
        source = choose_source(
            os.environ,
            services_up=lambda: all(map(answers, default.addresses().values())),
            docker_answers=docker_answers,
        )
        if source == "env":  # the variables set win, scripts/services' conventions fill in
            set_vars = {name: value for name, value in os.environ.items() if value}
            endpoints = Endpoints.from_vars({**conventions, **set_vars})
        elif source == "services":
            endpoints = default
        elif source == "containers":
            endpoints = start_containers(stack)
        else:
            endpoints = Endpoints.from_vars(services_script("up"))
        down = [name for name, at in endpoints.addresses().items() if not answers(at)]
        if down:
            pytest.fail(f"{', '.join(down)} not answering ({source}: {endpoints})")
        yield endpoints


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def own_topics(settings: Settings, folder: Path, **update: Any) -> Settings:
    """``settings`` with topics and a recovery folder of the test's own; the topics created."""
    own = settings.model_copy(
        update={
            "inbound_topic": unique("inbound"),
            "dlq_topic": unique("dlq"),
            "recovery_dir": folder / "recovery",
            **update,
        }
    )
    wiring.create_topics(own)
    return own


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each stopped at its end, whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        stop(child)


@pytest.fixture(scope="session")
def service_settings(
    tmp_path_factory: pytest.TempPathFactory, service_endpoints: Endpoints
) -> Settings:
    """Settings for the real services, with topics and a status table of this session's own."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    run = uuid.uuid4().hex[:8]
    return Settings(
        profile="services",
        database_url=service_endpoints.database_url,  # type: ignore[arg-type]
        kafka_bootstrap_servers=service_endpoints.kafka_bootstrap_servers,
        dynamodb_endpoint_url=service_endpoints.dynamodb_endpoint_url,
        inbound_topic=f"trades-inbound-{run}",
        dlq_topic=f"trades-dlq-{run}",
        inbound_partitions=4,
        status_table=f"trade-requests-{run}",
        recovery_dir=Path(tmp_path_factory.mktemp("recovery")),
        snapshot_interval_seconds=0.5,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The TRADE_STORE_* environment that reproduces ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_STORE_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"TRADE_STORE_{name.upper()}"] = str(raw)
    env["TRADE_STORE_LOG_FORMAT"] = "json"
    return env


@pytest.fixture(scope="session")
def migrated(service_settings: Settings) -> Iterator[Settings]:
    """A fresh schema migrated by `trade-store migrate`, plus this session's topics and status
    table, which are deleted again at the end (so the local stores do not grow run after run)."""
    engine = make_engine(service_settings.database_url.get_secret_value())
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"],
        env=settings_env(service_settings),
        check=True,
        timeout=120,
    )
    wiring.create_topics(service_settings)
    yield service_settings
    delete_queues_and_statuses(service_settings)


@pytest.fixture
def own_schema(migrated: Settings) -> Iterator[str]:
    """The URL of an empty PostgreSQL schema of this test's own (dropped afterwards): a
    store no other test of the session writes to, nor sweeps."""
    name = f"own_{uuid.uuid4().hex[:10]}"
    base = migrated.database_url.get_secret_value()
    engine = make_engine(base, 1)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {name}"))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={name}"})
    yield url.render_as_string(hide_password=False)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {name} CASCADE"))
    engine.dispose()


def delete_queues_and_statuses(settings: Settings) -> None:
    """Drop the status table and both topics of ``settings`` (dynalite slows as it grows)."""
    with contextlib.suppress(Exception):
        make_client(settings.dynamodb_endpoint_url, settings.aws_region).delete_table(
            TableName=settings.status_table
        )
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for deleted in admin.delete_topics([settings.inbound_topic, settings.dlq_topic]).values():
        with contextlib.suppress(Exception):
            deleted.result(timeout=15)


@pytest.fixture(scope="session")
def trade_store(migrated: Settings) -> SqlTradeStore:
    return wiring.trade_store(migrated)


@pytest.fixture(scope="session")
def status_store(migrated: Settings) -> DynamoStatusStore:
    return wiring.status_store(migrated)
