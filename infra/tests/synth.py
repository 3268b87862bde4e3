"""Synthesis of the stack for the tests, into a given cloud assembly folder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# jsii (the Node.js bridge under aws-cdk-lib) prints a banner on every start under an
# end-of-life Node; the tests do not depend on the Node version. Set before jsii loads.
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "18,20")

import aws_cdk as cdk
from aws_cdk.assertions import Template
from trade_store_infra.stack import TradeStoreStack

CERTIFICATE_ARN = (
    "arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
)


# The feature flags of cdk.json, so the tests see what `cdk synth` produces.
CONTEXT = json.loads((Path(__file__).resolve().parents[1] / "cdk.json").read_text())["context"]


@dataclass
class Synthesised:
    stack: TradeStoreStack
    template: Template
    assembly_dir: Path


def synthesise(
    outdir: Path, account: str | None = None, region: str | None = None, **params: Any
) -> Synthesised:
    """Environment-agnostic unless account and region are given."""
    app = cdk.App(outdir=str(outdir), context=CONTEXT)
    env = cdk.Environment(account=account, region=region) if account and region else None
    stack = TradeStoreStack(app, "TradeStore-test", env=env, **params)
    template = Template.from_stack(stack)
    return Synthesised(stack, template, Path(app.synth().directory))
