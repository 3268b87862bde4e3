"""Run the trade dataflow on in-memory sources and fake stores, under 1 and 2 workers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from dataflows.trades import build_flow
from domain.dead_letter import DeadLetter
from domain.message import TradeMessage, encode
from domain.trade import Trade
from tests.fakes import FakeStatusStore, FakeTradeStore

TODAY = date(2026, 11, 28)


@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    topic: str | None = "inbound"
    partition: int | None = 0
    offset: int | None = None


def record(
    request_id: str,
    trade_id: str,
    version: int,
    maturity: date = TODAY + timedelta(days=10),
    accepted_on: date = TODAY,
    counterparty: str = "CP-1",
) -> Record:
    message = TradeMessage(
        request_id=request_id,
        correlation_id=f"corr-{request_id}",
        accepted_on=accepted_on,
        accepted_at=datetime(2026, 11, 28, tzinfo=UTC),
        trade=Trade(trade_id, version, counterparty, "B1", maturity, accepted_on),
    )
    return Record(trade_id.encode(), encode(message), [("request_id", request_id.encode())])


@dataclass
class Pipeline:
    trades: FakeTradeStore = field(default_factory=FakeTradeStore)
    statuses: FakeStatusStore = field(default_factory=FakeStatusStore)
    dead: list[DeadLetter] = field(default_factory=list)

    def flow(self, items: Iterable[Any], batch_size: int = 10) -> Dataflow:
        return self.flow_of(TestingSource(list(items), batch_size=batch_size))

    def flow_of(self, source: FixedPartitionedSource[Any, Any]) -> Dataflow:
        return build_flow(
            inbound=lambda f: op.input("inp", f, source),
            trades=lambda: self.trades,
            statuses=lambda: self.statuses,
            dead_letters=TestingSink(self.dead),
        )


Runner = Callable[[Dataflow], None]


def run_one(flow: Dataflow) -> None:
    run_main(flow)


def run_two_workers(flow: Dataflow) -> None:
    cluster_main(flow, [], 0, worker_count_per_proc=2)


@pytest.fixture(params=[run_one, run_two_workers], ids=["run_main", "cluster_main-2"])
def runner(request: pytest.FixtureRequest) -> Runner:
    runner: Runner = request.param
    return runner


@pytest.fixture
def pipeline() -> Pipeline:
    return Pipeline()
