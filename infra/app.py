#!/usr/bin/env python3
"""CDK entry point: ``npx aws-cdk@2 synth -c envName=prod -c processorCount=1 ...``.

Context keys (all optional): envName, processorCount, processorWorkers, apiMinTasks,
apiMaxTasks, dbInstanceType, kafkaInstanceType, kafkaVersion, internetFacing,
certificateArn, runMigrations, auth (api-key | jwt), apiKeysSecretArn, jwtIssuer,
jwtAudience, jwtJwksUrl. See README.md.
"""

from __future__ import annotations

import os
from typing import Any

import aws_cdk as cdk
from trade_store_infra.stack import TradeStoreStack


def _context(app: cdk.App, key: str, default: Any) -> Any:
    value = app.node.try_get_context(key)
    return default if value is None else value


def _flag(value: Any) -> bool:
    """Context from `-c key=value` arrives as a string; from cdk.json it may be a bool."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def build(app: cdk.App) -> TradeStoreStack:
    """The stack, with its parameters from the app's context."""
    env_name = str(_context(app, "envName", "dev"))
    account = os.environ.get("CDK_DEFAULT_ACCOUNT")
    region = os.environ.get("CDK_DEFAULT_REGION")
    return TradeStoreStack(
        app,
        f"TradeStore-{env_name}",
        env_name=env_name,
        processor_count=int(_context(app, "processorCount", 1)),
        processor_workers=int(_context(app, "processorWorkers", 2)),
        api_min_tasks=int(_context(app, "apiMinTasks", 2)),
        api_max_tasks=int(_context(app, "apiMaxTasks", 6)),
        db_instance_type=str(_context(app, "dbInstanceType", "t4g.medium")),
        kafka_instance_type=str(_context(app, "kafkaInstanceType", "kafka.m7g.large")),
        kafka_version=str(_context(app, "kafkaVersion", "3.9.x.kraft")),
        internet_facing=_flag(_context(app, "internetFacing", False)),
        certificate_arn=_context(app, "certificateArn", None),
        run_migrations=_flag(_context(app, "runMigrations", True)),
        auth=str(_context(app, "auth", "api-key")),
        api_keys_secret_arn=_context(app, "apiKeysSecretArn", None),
        jwt_issuer=_context(app, "jwtIssuer", None),
        jwt_audience=_context(app, "jwtAudience", None),
        jwt_jwks_url=_context(app, "jwtJwksUrl", None),
        env=cdk.Environment(account=account, region=region) if account and region else None,
        description=f"trade-store services profile ({env_name}): MSK, RDS, DynamoDB, ECS",
    )


def main() -> None:
    app = cdk.App()
    build(app)
    app.synth()


if __name__ == "__main__":
    main()
