"""Targets of issues #4 and #12 and the markdown summary printed at the end of a run."""

from __future__ import annotations

from typing import Any

from bench.sink import SCALE_SHAPES, shape_label

Target = tuple[str, str, float | str, float, str]
# (key in the result, comparison, target value or a key of the result to scale, factor, text)
FEEDS: list[Target] = [  # issue 12, both profiles
    ("batch100_api_cpu_us_per_trade", "<=", "api_cpu_us_per_req", 0.1, "≤ 10 % of a POST's"),
    ("ndjson_peak_rss_mb", "<=", 300, 1, "≤ 300 MB"),
    ("overload_timeouts", "<=", 0, 1, "0"),
    ("overload_other_statuses", "<=", 0, 1, "0 (only 202 and 429)"),
    ("overload_accepted_p99_ms", "<=", 200, 1, "≤ 200 ms"),
]
TARGETS: dict[str, list[Target]] = {
    "services": [
        ("api_max_rps", ">=", 3000, 1, "≥ 3,000/s"),
        ("ack_p99_ms", "<=", 20, 1, "≤ 20 ms at 1,000/s"),
        ("ack_p99_ms", "<=", 100, 1, "≤ 100 ms at 1,000/s (issue 12)"),
        ("batch100_trades_per_s", ">=", 5000, 1, "≥ 5,000/s"),
        ("batch_e2e_p99_ms", "<=", 2000, 1, "≤ 2 s"),
        *FEEDS,
        ("e2e_p99_ms", "<=", 500, 1, "≤ 500 ms at 1,000/s"),
        ("api_cpu_us_per_req", "<=", "bare_cpu_us_per_req", 2, "≤ 2 × bare"),
        ("sink_rate", ">=", 10000, 1, "≥ 10,000/s"),
        ("sink_rate", ">=", "storage_ceiling_rate", 0.5, "≥ 0.5 × ceiling"),
        ("replay_vs_sink", ">=", 0.8, 1, "≥ 0.8 (issue 13)"),
    ],
    "embedded": [
        ("api_max_rps", ">=", 2000, 1, "≥ 2,000/s (p99 ≤ 50 ms)"),
        ("sink_rate", ">=", 10000, 1, "≥ 10,000/s"),
        ("batch100_trades_per_s", ">=", 25000, 1, "≥ 25,000/s"),
        ("batch_e2e_p99_ms", "<=", 1000, 1, "≤ 1 s"),
        *FEEDS,
        ("replay_vs_sink", ">=", 0.8, 1, "≥ 0.8 (issue 13)"),
    ],
}


def targets_for(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, op, target, factor, text in TARGETS.get(doc["profile"], []):
        value = doc.get(key)
        bound = doc.get(target) if isinstance(target, str) else target
        met = None
        if value is not None and bound is not None:
            limit = bound * factor
            met = value >= limit if op == ">=" else value <= limit
        out.append({"metric": key, "target": text, "value": value, "met": met})
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float) and value >= 100:
        return f"{value:,.0f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _scale_rows(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The scale phase's sink_rate per shape, with its ratio to one process of one worker and
    the processor CPU it spent per trade."""
    scale = doc.get("phases", {}).get("scale", {})
    rows = []
    for processes, workers in SCALE_SHAPES:
        label = shape_label(processes, workers)
        speedup = scale.get("speedup", {}).get(label)
        cpu = scale.get("cpu_us_per_trade", {}).get(label)
        rows.append(
            (
                f"sink_rate, {processes} process(es) × {workers} worker(s) (÷ 1 × 1; CPU/trade)",
                f"{_fmt(doc.get(f'scale_{label}_sink_rate'), '/s')} ({_fmt(speedup, '×')};"
                f" {_fmt(cpu, ' µs')})",
                "",
            )
        )
    rows.append(("scale stores verified", _fmt(doc.get("scale_verified")), ""))
    return rows


def markdown(doc: dict[str, Any]) -> str:
    met = {(t["metric"], t["target"]): t for t in doc.get("targets", [])}

    def target(metric: str) -> tuple[str, str]:
        hits = [t for (m, _), t in met.items() if m == metric]
        if not hits:
            return "", ""
        text = "; ".join(t["target"] for t in hits)
        flags = {t["met"] for t in hits}
        mark = "–" if None in flags else ("yes" if flags == {True} else "**no**")
        return text, mark

    e2e = doc.get("phases", {}).get("e2e", {})
    rate = _fmt(doc.get("ack_rate_rps"), "/s")
    rows = [
        (
            "api_max_rps (p99 ack ≤ 50 ms, 0 errors)",
            _fmt(doc.get("api_max_rps"), "/s"),
            "api_max_rps",
        ),
        (
            f"ack p50 / p95 / p99 / max at {rate}",
            " / ".join(
                _fmt(doc.get(k)) for k in ("ack_p50_ms", "ack_p95_ms", "ack_p99_ms", "ack_max_ms")
            )
            + " ms",
            "ack_p99_ms",
        ),
        (
            f"achieved rate / non-202 at {rate}",
            f"{_fmt(e2e.get('achieved_rps'), '/s')} / {_fmt(e2e.get('non_202'))}",
            "",
        ),
        (
            f"e2e p50 / p99 at {rate} (POST → terminal GET)",
            f"{_fmt(doc.get('e2e_p50_ms'))} / {_fmt(doc.get('e2e_p99_ms'))} ms"
            f" (n={_fmt(e2e.get('e2e_samples'))})",
            "e2e_p99_ms",
        ),
        (
            "API CPU per accepted request",
            _fmt(doc.get("api_cpu_us_per_req"), " µs"),
            "api_cpu_us_per_req",
        ),
        ("bare FastAPI+pydantic CPU per request", _fmt(doc.get("bare_cpu_us_per_req"), " µs"), ""),
        ("efficiency (API ÷ bare CPU)", _fmt(doc.get("cpu_ratio"), "×"), ""),
        ("bare max rate (context)", _fmt(doc.get("bare_max_rps"), "/s"), ""),
        (
            "sink_rate (processor, incl. status writes)",
            _fmt(doc.get("sink_rate"), "/s"),
            "sink_rate",
        ),
        ("storage_ceiling_rate (no framework)", _fmt(doc.get("storage_ceiling_rate"), "/s"), ""),
        ("sink ÷ ceiling", _fmt(doc.get("sink_vs_ceiling")), ""),
        ("sink store verified", _fmt(doc.get("sink_verified")), ""),
        *_scale_rows(doc),
        (
            "replay_rate (÷ sink_rate)",
            f"{_fmt(doc.get('replay_rate'), '/s')} ({_fmt(doc.get('replay_vs_sink'))})",
            "replay_vs_sink",
        ),
        ("replay store verified (rows = live store's)", _fmt(doc.get("replay_verified")), ""),
        (
            "batch100_trades_per_s (p99 ack ≤ 200 ms, processor running)",
            _fmt(doc.get("batch100_trades_per_s"), "/s"),
            "batch100_trades_per_s",
        ),
        (
            "batch100_api_cpu_us_per_trade",
            _fmt(doc.get("batch100_api_cpu_us_per_trade"), " µs"),
            "batch100_api_cpu_us_per_trade",
        ),
        ("batch1000_trades_per_s", _fmt(doc.get("batch1000_trades_per_s"), "/s"), ""),
        ("batch_e2e_p99_ms", _fmt(doc.get("batch_e2e_p99_ms"), " ms"), "batch_e2e_p99_ms"),
        (
            f"ndjson_trades_per_s ({_fmt(doc.get('ndjson_lines'))} lines)",
            _fmt(doc.get("ndjson_trades_per_s"), "/s"),
            "",
        ),
        (
            "ndjson_peak_rss_mb (API)",
            _fmt(doc.get("ndjson_peak_rss_mb"), " MB"),
            "ndjson_peak_rss_mb",
        ),
        ("overload_rate", _fmt(doc.get("overload_rate"), "/s"), ""),
        ("overload_timeouts", _fmt(doc.get("overload_timeouts")), "overload_timeouts"),
        (
            "overload_other_statuses",
            _fmt(doc.get("overload_other_statuses")),
            "overload_other_statuses",
        ),
        (
            "overload_accepted_p99_ms",
            _fmt(doc.get("overload_accepted_p99_ms"), " ms"),
            "overload_accepted_p99_ms",
        ),
    ]
    lines = [
        f"### trade-store benchmark — profile `{doc['profile']}`, {doc['mode']} run,"
        f" {doc.get('cpu_count')} CPUs, commit `{doc.get('git_commit')}`",
        "",
        "| metric | value | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, value, key in rows:
        text, mark = target(key) if key else ("", "")
        lines.append(f"| {name} | {value} | {text} | {mark} |")
    lines.append("")
    skipped = [f"{k}: {v['skipped']}" for k, v in doc.get("phases", {}).items() if "skipped" in v]
    lines.append(f"elapsed {doc.get('elapsed_s')} s; load: {doc['generator']['name']}")
    lines.extend(f"skipped {s}" for s in skipped)
    return "\n".join(lines)
