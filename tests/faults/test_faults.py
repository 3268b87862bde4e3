"""The fault suite: under a steady load on the services profile, each fault in turn, then
the pipeline's guarantees checked against a ledger of every request and its answer.

Each fault runs on an API and a processor of its own (own topics, status table and
recovery folder), so one fault's damage never shows up as another's. Its figures are
printed and merged into .services/test-logs/faults.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from adapters import wiring
from config.settings import Settings
from tests.conftest import delete_queues_and_statuses
from tests.faults import harness
from tests.faults.harness import Run, Sampler, Service, Window, freeze, kill

FREEZE_S = 12.0
LOAD_CLIENTS = 8

FAULTS: dict[str, Callable[[Run], Window]] = {
    "processor-kill9": lambda run: run.stack.processor.kill9_and_restart(),
    "poison": Run.produce_poison,
    "postgres-freeze": lambda run: freeze(run.services["postgres"], FREEZE_S),
    "postgres-kill": lambda run: kill(run.services["postgres"]),
    "status-store-freeze": lambda run: freeze(run.services["status_store"], FREEZE_S),
    "status-store-kill": lambda run: kill(run.services["status_store"]),
    "kafka-freeze": lambda run: freeze(run.services["kafka"], FREEZE_S),
    "kafka-kill": lambda run: kill(run.services["kafka"]),
}


@pytest.fixture(scope="module")
def services(migrated: Settings) -> Iterator[dict[str, Service]]:
    """The three shared services, all up (a missing one fails the suite, never skips it);
    whatever a fault did to them, they are up again after the module."""
    found = harness.services(migrated)
    down = [s.name for s in found.values() if not s.is_up()]
    assert not down, f"services down before the fault suite: {down} (run scripts/services up)"
    harness.RESULTS.unlink(missing_ok=True)
    yield found
    for service in found.values():
        if not service.is_up():
            service.up()


@pytest.fixture
def restored(services: dict[str, Service]) -> Iterator[dict[str, Service]]:
    """After each fault, every service is up again before the next one starts."""
    yield services
    for service in services.values():
        if not service.is_up():
            service.up()


@pytest.fixture
def settings(
    migrated: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Settings]:
    """This fault's own topics and status table, deleted afterwards."""
    own = harness.fault_settings(migrated, request.node.callspec.id, tmp_path)
    wiring.create_topics(own)
    wiring.prepare_status_store(own)
    yield own
    delete_queues_and_statuses(own)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(fault: str, settings: Settings, restored: dict[str, Service]) -> None:
    began = time.monotonic()
    with harness.stack(fault, settings) as stack:

        async def main() -> harness.Result:
            async with contextlib.AsyncExitStack() as clients:
                client, *load = [
                    await clients.enter_async_context(
                        httpx.AsyncClient(
                            base_url=stack.base_url,
                            timeout=harness.CLIENT_TIMEOUT_S,
                            limits=httpx.Limits(
                                max_connections=harness.IN_FLIGHT_CAP,
                                keepalive_expiry=harness.CLIENT_KEEPALIVE_S,
                            ),
                        )
                    )
                    for _ in range(1 + LOAD_CLIENTS)
                ]
                run = Run(stack, restored, client, load, Sampler(client))
                return await harness.exercise(run, f"F{int(began)}-{fault}", FAULTS[fault])

        result = asyncio.run(main())
        figures = harness.Figures(fault=fault, processor_exits=len(stack.processor.exits))
        broken = harness.verify(result.outcome, figures, stack.answer_budget_s)
    figures.recovery_s = None if result.recovery_s is None else round(result.recovery_s, 2)
    figures.fault_s = round(result.window.lifted - result.window.started, 2)
    figures.wall_s = round(time.monotonic() - began, 1)
    print("\n" + figures.line())
    harness.save(figures)
    harness.dump(fault, result.outcome.ledger, result.window)
    assert not broken, f"{fault} broke:\n  " + "\n  ".join(broken)
