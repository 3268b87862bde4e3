"""Synthesise the stack once per variant; every test reads the same templates."""

from __future__ import annotations

import pytest
from synth import CERTIFICATE_ARN, Synthesised, synthesise


@pytest.fixture(scope="session")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Synthesised:
    """Defaults, environment-agnostic: what `cdk synth` gives without context."""
    return synthesise(tmp_path_factory.mktemp("dev"))


@pytest.fixture(scope="session")
def prod(tmp_path_factory: pytest.TempPathFactory) -> Synthesised:
    return synthesise(
        tmp_path_factory.mktemp("prod"),
        env_name="prod",
        processor_count=0,
        api_min_tasks=3,
        api_max_tasks=12,
        db_instance_type="r6g.large",
        internet_facing=True,
        certificate_arn=CERTIFICATE_ARN,
        run_migrations=False,
        account="123456789012",
        region="eu-west-1",
    )
