"""app.py turns CDK context (as the CLI passes it) into stack parameters."""

from __future__ import annotations

from pathlib import Path

import app
import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Template
from synth import CONTEXT


def test_context_reaches_the_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    context = {
        **CONTEXT,
        "envName": "stage",
        "processorCount": "0",
        "processorWorkers": "4",
        "apiMinTasks": "3",
        "apiMaxTasks": "9",
        "dbInstanceType": "m7g.large",
        "internetFacing": "true",
        "runMigrations": "false",
    }
    monkeypatch.delenv("CDK_DEFAULT_ACCOUNT", raising=False)
    monkeypatch.delenv("CDK_DEFAULT_REGION", raising=False)
    stack = app.build(cdk.App(outdir=str(tmp_path), context=context))
    assert stack.stack_name == "TradeStore-stage"

    template = Template.from_stack(stack).to_json()
    kinds = {r["Type"]: r for r in template["Resources"].values()}
    assert kinds["AWS::RDS::DBInstance"]["Properties"]["DBInstanceClass"] == "db.m7g.large"
    assert kinds["AWS::MSK::Cluster"]["Properties"]["ClusterName"] == "trade-store-stage"
    assert kinds["AWS::ElasticLoadBalancingV2::LoadBalancer"]["Properties"]["Scheme"] == (
        "internet-facing"
    )
    assert "Custom::TradeStoreMigration" not in kinds
    scaling = kinds["AWS::ApplicationAutoScaling::ScalableTarget"]["Properties"]
    assert (scaling["MinCapacity"], scaling["MaxCapacity"]) == (3, 9)
    processor = next(
        r["Properties"]["ContainerDefinitions"][0]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::ECS::TaskDefinition"
        and r["Properties"]["Family"] == "trade-store-stage-processor"
    )
    env = {e["Name"]: e["Value"] for e in processor["Environment"]}
    assert env["TRADE_STORE_PROCESSOR_WORKERS"] == "4"
    services = [r for r in template["Resources"].values() if r["Type"] == "AWS::ECS::Service"]
    assert [s["Properties"].get("DesiredCount") for s in services] == [None, 0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("true", True), ("False", False), ("1", True), ("no", False)],
)
def test_flags_from_the_command_line(value: object, expected: bool) -> None:
    assert app._flag(value) is expected
