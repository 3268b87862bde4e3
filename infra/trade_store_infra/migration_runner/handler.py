"""Custom resource that runs ``trade-store migrate`` as a Fargate task and waits for it.

Used by the CDK provider framework: ``on_event`` starts the task, ``is_complete`` is polled
until the task stops and fails the deployment unless the migrate container exited 0. The
API and processor services depend on this resource, so on every deployment that changes
the image the schema is migrated before any new task starts (expand, then deploy).

A CloudFormation rollback re-applies the previous task definition revision; its image does
not know the newer schema (Alembic would fail on the unknown revision, leaving the stack
in UPDATE_ROLLBACK_FAILED), so an update to a lower revision is recognised and skipped.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger()
log.setLevel(logging.INFO)

SKIPPED = "skipped"


def _ecs() -> Any:
    import boto3  # in the Lambda runtime; imported lazily so tests can pass a stub

    return boto3.client("ecs")


def revision(task_definition_arn: str) -> int:
    """``arn:aws:ecs:...:task-definition/family:12`` → 12."""
    return int(task_definition_arn.rsplit(":", 1)[1])


def is_rollback(event: dict[str, Any]) -> bool:
    """An update back to an older task definition revision: CloudFormation rolling back."""
    if event["RequestType"] != "Update":
        return False
    new = event["ResourceProperties"]["TaskDefinition"]
    old = event.get("OldResourceProperties", {}).get("TaskDefinition")
    return old is not None and revision(new) < revision(old)


def on_event(event: dict[str, Any], _context: Any = None, ecs: Any = None) -> dict[str, Any]:
    request = event["RequestType"]
    if request == "Delete":
        return {"PhysicalResourceId": event["PhysicalResourceId"]}
    props = event["ResourceProperties"]
    if is_rollback(event):
        log.info("rollback to %s: migration skipped", props["TaskDefinition"])
        return {"PhysicalResourceId": SKIPPED, "Data": {"TaskArn": SKIPPED}}
    ecs = ecs or _ecs()
    reply = ecs.run_task(
        cluster=props["Cluster"],
        taskDefinition=props["TaskDefinition"],
        launchType="FARGATE",
        count=1,
        startedBy="cfn-migrate",
        networkConfiguration={
            "awsvpcConfiguration": {
                "subnets": props["Subnets"],
                "securityGroups": props["SecurityGroups"],
                "assignPublicIp": "DISABLED",
            }
        },
    )
    if reply.get("failures") or not reply.get("tasks"):
        raise RuntimeError(f"migration task did not start: {reply.get('failures')}")
    task_arn: str = reply["tasks"][0]["taskArn"]
    log.info("migration task started: %s", task_arn)
    return {"PhysicalResourceId": task_arn, "Data": {"TaskArn": task_arn}}


def is_complete(event: dict[str, Any], _context: Any = None, ecs: Any = None) -> dict[str, Any]:
    task_arn = event["PhysicalResourceId"]
    if event["RequestType"] == "Delete" or task_arn == SKIPPED:
        return {"IsComplete": True}
    props = event["ResourceProperties"]
    ecs = ecs or _ecs()
    tasks = ecs.describe_tasks(cluster=props["Cluster"], tasks=[task_arn]).get("tasks", [])
    if not tasks:
        raise RuntimeError(f"migration task {task_arn} not found")
    task = tasks[0]
    if task.get("lastStatus") != "STOPPED":
        return {"IsComplete": False}
    container = next(
        (c for c in task.get("containers", []) if c.get("name") == props["ContainerName"]), {}
    )
    exit_code = container.get("exitCode")
    if exit_code != 0:
        reason = container.get("reason") or task.get("stoppedReason", "unknown")
        raise RuntimeError(
            f"migration task {task_arn} failed: exit code {exit_code}, {reason}"
            " (see the migrate log group)"
        )
    log.info("migration task %s succeeded", task_arn)
    return {"IsComplete": True}
