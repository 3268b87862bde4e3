"""vegeta, the constant-rate load tool of the benchmark: targets files, one attack, its results.

vegeta (installed by ``scripts/bench`` into ``.tools/bin``) is an open-model generator: it
paces arrivals at the given rate and starts another worker whenever all are busy (up to
``max_workers``), so a slow server does not slow the offered load down. Its results are
decoded with ``vegeta encode -to json`` and summarised here with the same percentile as
the rest of the harness; its CPU is the kernel's account of the vegeta process (``wait4``).
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from bench.load import percentile
from bench.stack import ROOT, reap

BINARY = ROOT / ".tools" / "bin" / "vegeta"
VERSION = "v12.13.0"
NAME = f"vegeta {VERSION}"


@dataclass
class Attack:
    """One constant-rate attack: ``rate`` × ``duration`` POSTs, one body each."""

    url: str
    rate: float
    duration: float
    label: str
    content_type: str = "application/json"
    timeout: float = 5.0
    trades_per_request: int = 1  # a batch's size: 207 bodies say how many were accepted
    max_workers: int = 0  # 0: two seconds of arrivals in flight, at least 200, at most 4,000

    @property
    def count(self) -> int:
        return int(self.rate * self.duration)

    def workers(self) -> tuple[int, int]:
        cap = self.max_workers or min(4000, max(200, int(self.rate * 2)))
        return min(cap, max(10, int(self.rate * 0.02))), cap


def write_targets(path: Path, url: str, bodies: Iterable[bytes], content_type: str) -> int:
    """vegeta's JSON targets format: one POST per line, its body base64-encoded."""
    header = {"Content-Type": [content_type]}
    n = 0
    with path.open("wb") as out:
        for body in bodies:
            target = {"method": "POST", "url": url, "header": header, "body": body}
            out.write(orjson.dumps(target, default=_b64) + b"\n")
            n += 1
    return n


def _b64(value: Any) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(type(value))


def rate_arg(rate: float) -> str:
    """vegeta's -rate takes an integer per a duration: 12.5/s is 125/10s."""
    return f"{int(rate)}/1s" if rate == int(rate) else f"{round(rate * 1000)}/1000s"


def run(attack: Attack, bodies: Iterable[bytes], workdir: Path) -> dict[str, Any]:
    """Write the targets, run the attack, decode and summarise its results."""
    if not BINARY.exists():
        raise RuntimeError(f"{BINARY} is missing: run the bench through scripts/bench")
    workdir.mkdir(parents=True, exist_ok=True)
    stem = workdir / attack.label.replace("/", "-per-")
    targets, results = stem.with_suffix(".targets"), stem.with_suffix(".bin")
    write_targets(targets, attack.url, bodies, attack.content_type)
    workers, cap = attack.workers()
    args = [
        str(BINARY),
        "attack",
        f"-targets={targets}",
        "-format=json",
        f"-rate={rate_arg(attack.rate)}",
        f"-duration={attack.duration}s",
        f"-timeout={attack.timeout}s",
        f"-workers={workers}",
        f"-max-workers={cap}",
        "-http2=false",
        "-keepalive=true",
        f"-max-body={-1 if attack.trades_per_request > 1 else 0}",
        f"-output={results}",
    ]
    with stem.with_suffix(".log").open("wb") as err:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=err)  # noqa: S603
    cpu = reap(proc, attack.duration + attack.timeout + 60)
    if proc.returncode != 0:
        tail = stem.with_suffix(".log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"vegeta attack exited {proc.returncode}: {tail}")
    summary = summarize(attack, decode(results))
    sent = summary["requests_sent"]
    summary["gen_cpu_s"] = round(cpu, 3)
    summary["gen_cpu_us_per_req"] = round(cpu * 1e6 / sent, 1) if sent else None
    summary["workers"] = {"initial": workers, "max": cap}
    targets.unlink(missing_ok=True)
    results.unlink(missing_ok=True)
    return summary


def decode(results: Path) -> Iterator[dict[str, Any]]:
    """The attack's results, one dict per request (``vegeta encode -to json``)."""
    proc = subprocess.Popen(  # noqa: S603
        [str(BINARY), "encode", "-to", "json", str(results)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        yield orjson.loads(line)
    if proc.wait() != 0:
        raise RuntimeError(f"vegeta encode exited {proc.returncode}")


def epoch(timestamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 time with up to nanoseconds (Go's format)."""
    base, dot, rest = timestamp.partition(".")
    if not dot:
        return datetime.fromisoformat(base).timestamp()
    digits = len(rest) - len(rest.lstrip("0123456789"))
    return datetime.fromisoformat(base + rest[digits:]).timestamp() + float("0." + rest[:digits])


def is_timeout(error: str) -> bool:
    return "Timeout" in error or "deadline exceeded" in error or "timeout" in error


def summarize(attack: Attack, results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a phase, in the shape of ``bench.load.summarize`` plus trades, 429s and
    timeouts: latency is vegeta's (request start → response read)."""
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    accepted_latencies: list[float] = []
    first = last = last_done = 0.0
    sent = timeouts = transport_errors = trades = 0
    for r in results:
        sent += 1
        at = epoch(r["timestamp"])
        first = at if not first else min(first, at)
        last = max(last, at)
        ms = r["latency"] / 1e6
        last_done = max(last_done, at + ms / 1000)
        code = r["code"]
        if code == 0:
            if is_timeout(r.get("error") or ""):
                timeouts += 1
            else:
                transport_errors += 1
            continue
        statuses[code] = statuses.get(code, 0) + 1
        latencies.append(ms)
        if code == 202:
            accepted_latencies.append(ms)
            trades += attack.trades_per_request
        elif code == 207 and r.get("body"):
            trades += int(orjson.loads(base64.b64decode(r["body"]))["accepted"])
    span = max(attack.duration, last_done - first if first else 0.0)
    sent_span = last - first if sent > 1 else 0.0

    def r2(x: float | None, nd: int = 2) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "load_tool": NAME,
        "intended_rps": attack.rate,
        "duration_s": attack.duration,
        "timeout_s": attack.timeout,
        "requests_intended": attack.count,
        "requests_sent": sent,
        "requests_completed": sum(statuses.values()),
        # vegeta paces arrival i at i / rate: over n arrivals the span is (n - 1) / rate
        "sent_rps": r2((sent - 1) / sent_span if sent_span else None, 1),
        "achieved_rps": r2(statuses.get(202, 0) / span if span else None, 1),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "non_202": sum(n for k, n in statuses.items() if k != 202),
        "errors": timeouts + transport_errors,
        "timeouts": timeouts,
        "transport_errors": transport_errors,
        "unsent": max(0, attack.count - sent),
        "aborted": None,
        "trades_accepted": trades,
        "trades_per_s": r2(trades / span if span else None, 1),
        "ack_p50_ms": r2(percentile(latencies, 50)),
        "ack_p95_ms": r2(percentile(latencies, 95)),
        "ack_p99_ms": r2(percentile(latencies, 99)),
        "ack_max_ms": r2(max(latencies) if latencies else None),
        "accepted_p99_ms": r2(percentile(accepted_latencies, 99)),
    }
