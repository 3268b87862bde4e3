"""vegeta's targets and results as the benchmark writes and reads them: what vegeta is given
is what the phase means to send, and its results are counted right (timeouts apart from
answers, 207 batches by their accepted items, latencies from nanoseconds)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from bench.vegeta import Attack, epoch, rate_arg, summarize, write_targets


def test_targets_are_json_lines_with_each_body_base64(tmp_path: Path) -> None:
    path = tmp_path / "t.targets"
    n = write_targets(
        path, "http://127.0.0.1:1/api/v1/trades", [b'{"a":1}', b'{"a":2}'], "application/json"
    )
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == 2
    assert len(lines) == 2
    assert lines[0]["method"] == "POST"
    assert lines[0]["header"] == {"Content-Type": ["application/json"]}
    assert [base64.b64decode(t["body"]) for t in lines] == [b'{"a":1}', b'{"a":2}']


def test_go_timestamps_with_nanoseconds() -> None:
    assert epoch("2026-12-01T21:45:35.137734665Z") - epoch("2026-12-01T21:45:35Z") == __import__(
        "pytest"
    ).approx(0.137734665, abs=1e-6)
    assert epoch("2026-12-01T21:45:35.5+01:00") == epoch("2026-12-01T20:45:35.5Z")


def test_fractional_rates_become_integer_counts() -> None:
    assert rate_arg(1000) == "1000/1s"
    assert rate_arg(12.5) == "12500/1000s"


def result(
    seq: int, code: int, latency_ms: float, error: str = "", body: bytes | None = None
) -> dict:
    return {
        "seq": seq,
        "code": code,
        "timestamp": f"2026-12-01T21:00:00.{seq * 100_000_000:09d}Z",
        "latency": int(latency_ms * 1e6),
        "error": error,
        "body": base64.b64encode(body).decode() if body else None,
    }


def test_summary_counts_answers_timeouts_and_accepted_trades() -> None:
    attack = Attack(url="u", rate=10, duration=1, label="x", trades_per_request=100)
    partial = json.dumps({"batch_id": "b", "accepted": 60, "rejected": 40, "results": []}).encode()
    results = [
        result(0, 202, 10),
        result(1, 202, 20),
        result(2, 207, 30, body=partial),
        result(3, 429, 1),
        result(4, 0, 5000, error="Post ...: context deadline exceeded (Client.Timeout exceeded)"),
        result(5, 0, 1, error="connect: connection refused"),
    ]
    s = summarize(attack, results)
    assert s["requests_sent"] == 6
    assert s["unsent"] == 4
    assert s["status_counts"] == {"202": 2, "207": 1, "429": 1}
    assert s["timeouts"] == 1
    assert s["transport_errors"] == 1
    assert s["errors"] == 2
    assert s["non_202"] == 2
    assert s["trades_accepted"] == 260
    assert s["ack_max_ms"] == 30.0
    assert s["accepted_p99_ms"] == 20.0
    assert s["sent_rps"] == 10.0  # 6 arrivals 0.1 s apart
