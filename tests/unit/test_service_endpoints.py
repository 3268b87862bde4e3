"""Where the test services come from: the order of conftest's fixture layer, the endpoints it
reads, and its probes (on real sockets; the Docker path itself needs an engine)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.conftest import (
    DATABASE_VAR,
    DYNAMODB_VAR,
    KAFKA_VAR,
    SERVICES,
    Endpoints,
    answers,
    choose_source,
    docker_answers,
    parse_vars,
)


def never() -> bool:
    raise AssertionError("probed although an earlier source was chosen")


@pytest.mark.parametrize("name", [DATABASE_VAR, KAFKA_VAR, DYNAMODB_VAR])
def test_any_endpoint_variable_wins_without_probing(name: str) -> None:
    assert choose_source({name: "x"}, services_up=never, docker_answers=never) == "env"


def test_empty_variables_count_as_unset() -> None:
    env = {DATABASE_VAR: "", KAFKA_VAR: "", DYNAMODB_VAR: ""}
    assert choose_source(env, services_up=lambda: True, docker_answers=never) == "services"


def test_services_already_up_come_before_docker() -> None:
    assert choose_source({}, services_up=lambda: True, docker_answers=never) == "services"


def test_docker_when_services_are_not_up() -> None:
    assert choose_source({}, services_up=lambda: False, docker_answers=lambda: True) == "containers"


def test_start_scripts_services_when_nothing_else() -> None:
    assert choose_source({}, services_up=lambda: False, docker_answers=lambda: False) == "start"


def printed_endpoints(**ports: str) -> Endpoints:
    """The endpoints ``scripts/services env`` prints (it only prints: no lock, nothing starts)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICES_")} | ports
    printed = subprocess.run(
        [str(SERVICES), "env"], capture_output=True, text=True, check=True, timeout=30, env=env
    ).stdout
    return Endpoints.from_vars(parse_vars(printed))


def test_endpoints_from_what_scripts_services_prints() -> None:
    endpoints = printed_endpoints()
    assert endpoints.database_url.endswith("@127.0.0.1:55432/trade_store_test")
    assert endpoints.addresses() == {
        "PostgreSQL": ("127.0.0.1", 55432),
        "Kafka": ("127.0.0.1", 9092),
        "DynamoDB": ("127.0.0.1", 4567),
    }


def test_endpoints_follow_scripts_services_port_overrides() -> None:
    endpoints = printed_endpoints(SERVICES_PG_PORT="55433", SERVICES_DYNAMODB_PORT="4569")
    assert endpoints.addresses()["PostgreSQL"] == ("127.0.0.1", 55433)
    assert endpoints.addresses()["DynamoDB"] == ("127.0.0.1", 4569)


def test_a_missing_endpoint_is_an_error_not_a_default() -> None:
    with pytest.raises(KeyError):
        Endpoints.from_vars({DATABASE_VAR: "postgresql://h/db", KAFKA_VAR: "h:1"})


def test_answers_tells_a_listening_port_from_a_closed_one() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = server.getsockname()
        assert answers(address)
    assert not answers(address)


def test_no_docker_engine_is_a_no(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{port}")
    assert docker_answers() is False
