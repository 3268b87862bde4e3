"""The migration custom resource's Lambda handler, against a stub ECS client."""

from __future__ import annotations

from typing import Any

import pytest
from trade_store_infra.migration_runner import handler

TASK_DEF = "arn:aws:ecs:eu-west-1:123456789012:task-definition/trade-store-dev-migrate:{}"
TASK = "arn:aws:ecs:eu-west-1:123456789012:task/cluster/abc"


class StubEcs:
    def __init__(self, run: dict[str, Any] | None = None, tasks: list[Any] | None = None):
        self.run_reply = run if run is not None else {"tasks": [{"taskArn": TASK}], "failures": []}
        self.tasks = tasks or []
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def run_task(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("run_task", kwargs))
        return self.run_reply

    def describe_tasks(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("describe_tasks", kwargs))
        return {"tasks": self.tasks}


def props(revision: int = 3) -> dict[str, Any]:
    return {
        "Cluster": "arn:aws:ecs:eu-west-1:123456789012:cluster/cluster",
        "TaskDefinition": TASK_DEF.format(revision),
        "ContainerName": "migrate",
        "Subnets": ["subnet-1", "subnet-2", "subnet-3"],
        "SecurityGroups": ["sg-1"],
    }


def event(request: str, **extra: Any) -> dict[str, Any]:
    return {"RequestType": request, "ResourceProperties": props(), **extra}


def stopped(exit_code: int | None, reason: str | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "migrate", "exitCode": exit_code}
    if reason:
        container["reason"] = reason
    return {
        "lastStatus": "STOPPED",
        "stoppedReason": "Essential container exited",
        "containers": [container],
    }


def test_create_starts_the_task_in_the_given_network() -> None:
    ecs = StubEcs()
    reply = handler.on_event(event("Create"), None, ecs)
    assert reply == {"PhysicalResourceId": TASK, "Data": {"TaskArn": TASK}}
    [(name, kwargs)] = ecs.calls
    assert name == "run_task"
    assert kwargs["taskDefinition"] == TASK_DEF.format(3)
    assert kwargs["launchType"] == "FARGATE"
    assert kwargs["networkConfiguration"]["awsvpcConfiguration"] == {
        "subnets": ["subnet-1", "subnet-2", "subnet-3"],
        "securityGroups": ["sg-1"],
        "assignPublicIp": "DISABLED",
    }


def test_a_task_that_cannot_start_fails_the_deployment() -> None:
    ecs = StubEcs(run={"tasks": [], "failures": [{"reason": "RESOURCE:ENI"}]})
    with pytest.raises(RuntimeError, match="did not start"):
        handler.on_event(event("Create"), None, ecs)


def test_forward_update_migrates_again() -> None:
    ecs = StubEcs()
    update = event("Update", PhysicalResourceId="old", OldResourceProperties=props(2))
    assert handler.on_event(update, None, ecs)["PhysicalResourceId"] == TASK
    assert [c[0] for c in ecs.calls] == ["run_task"]


def test_rollback_to_an_older_revision_is_skipped() -> None:
    ecs = StubEcs()
    rollback = {
        "RequestType": "Update",
        "PhysicalResourceId": TASK,
        "ResourceProperties": props(2),
        "OldResourceProperties": props(3),
    }
    reply = handler.on_event(rollback, None, ecs)
    assert reply["PhysicalResourceId"] == handler.SKIPPED
    assert ecs.calls == []
    done = {**rollback, "PhysicalResourceId": handler.SKIPPED}
    assert handler.is_complete(done, None, ecs) == {"IsComplete": True}


def test_delete_does_nothing() -> None:
    ecs = StubEcs()
    delete = event("Delete", PhysicalResourceId=TASK)
    assert handler.on_event(delete, None, ecs) == {"PhysicalResourceId": TASK}
    assert handler.is_complete(delete, None, ecs) == {"IsComplete": True}
    assert ecs.calls == []


def test_waits_while_the_task_runs() -> None:
    ecs = StubEcs(tasks=[{"lastStatus": "RUNNING", "containers": [{"name": "migrate"}]}])
    assert handler.is_complete(event("Create", PhysicalResourceId=TASK), None, ecs) == {
        "IsComplete": False
    }


def test_complete_when_migrate_exits_zero() -> None:
    ecs = StubEcs(tasks=[stopped(0)])
    assert handler.is_complete(event("Create", PhysicalResourceId=TASK), None, ecs) == {
        "IsComplete": True
    }


@pytest.mark.parametrize(
    ("task", "detail"),
    [
        (stopped(1), "exit code 1"),
        (stopped(None, "CannotPullContainerError"), "CannotPullContainerError"),
    ],
)
def test_a_failed_migration_fails_the_deployment(task: dict[str, Any], detail: str) -> None:
    ecs = StubEcs(tasks=[task])
    with pytest.raises(RuntimeError, match=detail):
        handler.is_complete(event("Create", PhysicalResourceId=TASK), None, ecs)


def test_a_vanished_task_fails_the_deployment() -> None:
    with pytest.raises(RuntimeError, match="not found"):
        handler.is_complete(event("Create", PhysicalResourceId=TASK), None, StubEcs(tasks=[]))
