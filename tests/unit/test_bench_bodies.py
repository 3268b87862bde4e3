"""The benchmark's load is what it claims to be: valid submissions, whatever its phase tag
(a tag such as "api-500/s" once made every trade id invalid, and the run measured 422s)."""

from __future__ import annotations

import json

import pytest

from bench.load import trade_body
from ingest_api.schemas import TradeIn


@pytest.mark.parametrize("tag", ["run1-api-cpu", "run1-api-500/s", "run1-e2e-1000/s"])
def test_every_phase_sends_valid_trades(tag: str) -> None:
    body = json.loads(trade_body(tag, 42, "2099-01-01"))
    assert TradeIn.model_validate(body).trade_id == body["trade_id"]
