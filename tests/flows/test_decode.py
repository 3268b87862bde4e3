"""The decode step: one parse per record, split into typed messages and dead letters."""

from __future__ import annotations

import threading

import pytest
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

import dataflows.trades
from dataflows.trades import Decoded, build_flow, decode_record, decode_records
from domain.dead_letter import DeadLetter
from domain.message import TradeMessage, decode
from domain.ports import DecisionStore
from tests.flows.conftest import Pipeline, Record, record


def test_the_decode_operator_yields_messages_and_dead_letters_apart() -> None:
    """Like Bytewax's ``KafkaOpOut(oks, errs)``: each stream holds one type only."""
    items = [
        record("r1", "T1", 1),
        Record(b"k", b"not json", [("request_id", b"bad-1")]),
        record("r2", "T2", 1),
        Record(None, None, []),
    ]
    messages: list[TradeMessage] = []
    dead: list[DeadLetter] = []
    flow = Dataflow("decode-only")
    decoded = decode_records("decode", op.input("inp", flow, TestingSource(items)))
    assert isinstance(decoded, Decoded)
    op.output("messages", decoded.messages, TestingSink(messages))
    op.output("dead", decoded.dead_letters, TestingSink(dead))
    run_main(flow)
    assert all(type(m) is TradeMessage for m in messages)
    assert [m.request_id for m in messages] == ["r1", "r2"]
    assert all(type(d) is DeadLetter for d in dead)
    assert [(d.reason, d.request_id) for d in dead] == [
        ("value is not JSON", "bad-1"),
        ("value is not a JSON object", None),
    ]


@pytest.mark.parametrize(
    ("value", "header", "request_id"),
    [
        (b"not json", b"from-header", "from-header"),  # the body names no request
        (b'{"schema_version": 1, "request_id": "r-9"}', b"other", "r-9"),  # the body wins
        (b"{", b"x" * 100, None),  # a header that is no id names nothing
    ],
)
def test_a_bad_record_is_parsed_once(
    monkeypatch: pytest.MonkeyPatch, value: bytes, header: bytes, request_id: str | None
) -> None:
    """The header is read only after the one parse, when the body did not name a request."""
    parsed: list[bytes | None] = []

    def counted(raw: bytes | None) -> TradeMessage:
        parsed.append(raw)
        return decode(raw)

    monkeypatch.setattr(dataflows.trades, "decode", counted)
    letter = decode_record(Record(b"k", value, [("request_id", header)]))
    assert isinstance(letter, DeadLetter)
    assert letter.request_id == request_id
    assert parsed == [value]


def test_a_good_record_is_named_by_its_body_not_its_header() -> None:
    good = record("r-1", "T1", 1)
    message = decode_record(Record(good.key, good.value, [("request_id", b"other")]))
    assert isinstance(message, TradeMessage)
    assert message.request_id == "r-1"


def test_sinks_build_stores_per_worker_the_head_lookup_once_per_process() -> None:
    """What ``build_flow``'s docstring says of its factories, under two workers."""
    pipeline = Pipeline()
    built: list[int] = []

    def trades() -> DecisionStore:
        built.append(threading.get_ident())
        return pipeline.trades

    items = [record(f"r{n}", f"T{n}", 1) for n in range(20)]
    flow = build_flow(
        inbound=lambda f: op.input("inp", f, TestingSource(items, batch_size=5)),
        trades=trades,
        statuses=lambda: pipeline.statuses,
        dead_letters=TestingSink(pipeline.dead),
    )
    cluster_main(flow, [], 0, worker_count_per_proc=2)
    assert len(pipeline.statuses.items) == 20
    # The trade sink and the dead letters' status sink, on each worker; one head lookup.
    assert len(built) == 2 * 2 + 1
