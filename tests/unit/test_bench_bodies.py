"""The benchmark's load is what it claims to be: valid submissions, whatever its phase tag
(a tag such as "api-500/s" once made every trade id invalid, and the run measured 422s),
unique trade ids across a batch and across batches."""

from __future__ import annotations

import json

import pytest

from bench.load import batch_body, last_request_id, trade_body
from ingest_api.schemas import TradeIn


@pytest.mark.parametrize("tag", ["run1-api-cpu", "run1-api-500/s", "run1-e2e-1000/s"])
def test_every_phase_sends_valid_trades(tag: str) -> None:
    body = json.loads(trade_body(tag, 42, "2099-01-01"))
    assert TradeIn.model_validate(body).trade_id == body["trade_id"]


def test_batch_bodies_hold_valid_trades_with_unique_ids() -> None:
    bodies = [json.loads(batch_body("run1-batch100-20/s", n, 100, "2099-01-01")) for n in (0, 1)]
    ids = []
    for body in bodies:
        assert list(body) == ["trades"]
        assert len(body["trades"]) == 100
        ids += [TradeIn.model_validate(item).trade_id for item in body["trades"]]
    assert len(set(ids)) == 200


def test_the_sampler_follows_a_batch_by_its_last_item() -> None:
    batch = {
        "batch_id": "b",
        "accepted": 2,
        "rejected": 0,
        "results": [
            {"index": 0, "status": 202, "request_id": "r0"},
            {"index": 1, "status": 202, "request_id": "r1"},
        ],
    }
    assert last_request_id(json.dumps(batch).encode()) == "r1"
    assert last_request_id(b'{"request_id": "r9", "status": "PENDING"}') == "r9"
