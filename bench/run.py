"""The benchmark run: phases, their order, and the result document."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench import replay as replaymod
from bench import sink as sinkmod
from bench import vegeta
from bench.load import LoadSpec, batch_body, kept_rate, run_load, summarize, trade_body
from bench.profiles import Stage, new_stage, services_down, services_up
from bench.report import markdown, targets_for
from bench.stack import (
    APP_ROOT,
    ROOT,
    CpuMeter,
    GroupMeter,
    Proc,
    RssMeter,
    connections_per_process,
    free_port,
    log,
    reap,
    start,
    start_http,
    wait_until,
)
from bench.stream import run_stream

GENERATOR = {
    "name": f"{vegeta.NAME} for every constant-rate phase; bench.load (our own open-model"
    " generator) only as the end-to-end sampler, which follows its acknowledged requests to"
    " their terminal status",
    "why": "an independent, widely used constant-rate tool: at the same commit our own"
    " generator once reported an ack p99 57x vegeta's (issue 12)",
}
MAX_P99_MS = 50.0
BATCH_P99_MS = 200.0
MATURITY = "2099-01-01"  # far ahead: every bench trade is live
SAMPLER_RPS = 20.0  # the e2e sampler's share of the 1,000/s (every one of its POSTs followed)


def nice(rate: float) -> float:
    """Round a probe rate to a readable step (25/s below 500/s, 50/s below 2,000/s, else 100/s)."""
    step = 25 if rate < 500 else 50 if rate < 2000 else 100
    return float(max(step, round(rate / step) * step))


@dataclass
class Mode:
    """Durations and sizes of a quick (CI smoke) or full run."""

    quick: bool
    cpu_rate: float = 1000
    cpu_s: float = 20
    warm_s: float = 3
    search_start: float = 1000
    search_s: float = 10
    search_max: float = 32000
    probe_steps: int = 6
    bisect: int = 3
    bare_search: bool = True
    e2e_rate: float = 1000
    e2e_s: float = 40
    sink_messages: int = 200_000
    drain_timeout: float = 480
    stall_s: float = 60
    batch_start: float = 20  # batches of 100 per second where the batch search begins
    batch_probe_steps: int = 5
    ndjson_lines: int = 1_000_000
    overload_s: float = 15

    @classmethod
    def of(cls, quick: bool) -> Mode:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            cpu_s=5,
            warm_s=1.5,
            search_s=4,
            probe_steps=3,
            bisect=0,
            bare_search=False,
            e2e_s=10,
            sink_messages=20_000,
            drain_timeout=90,
            stall_s=30,
            batch_probe_steps=2,
            ndjson_lines=50_000,
            overload_s=3,
        )


class Run:
    def __init__(self, args: Any) -> None:
        self.args = args
        if getattr(args, "app_root", None):
            APP_ROOT[0] = Path(args.app_root).resolve()
        self.profile: str = args.profile
        self.mode = Mode.of(args.quick)
        if args.sink_messages:
            self.mode.sink_messages = args.sink_messages
        self.run_id = uuid.uuid4().hex[:6]
        self.workdir = Path(tempfile.mkdtemp(prefix=f"trade-store-bench-{self.run_id}-"))
        self.logs = self.workdir / "logs"
        self.stages: list[Stage] = []
        self.procs: list[Proc] = []
        self.started_services: list[str] = []
        self.t0 = time.monotonic()
        self.result: dict[str, Any] = {}
        self.phases: dict[str, Any] = {}
        self.phase_no = 0
        self.errors: list[str] = []
        # the sink phase's stage and plan once its queue is drained: what the replay replays
        self.drained: tuple[Stage, sinkmod.SinkPlan] | None = None

    # -- plumbing -------------------------------------------------------------------------
    def phase(self, title: str) -> None:
        self.phase_no += 1
        log(f"== [{time.monotonic() - self.t0:6.1f}s] {title}")

    def stage(self, label: str) -> Stage:
        stage = new_stage(self.profile, self.run_id, label, self.workdir)
        self.stages.append(stage)
        stage.prepare()
        return stage

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = start(name, args, env, self.logs)
        self.procs.append(proc)
        return proc

    def processor(
        self, name: str, env: dict[str, str], workers: int | None = None, *extra: str
    ) -> Proc:
        count = str(workers or self.args.processor_workers)
        return self.spawn(name, ["-m", "cli.main", "process", "--workers", count, *extra], env)

    def cluster(self, name: str, env: dict[str, str], processes: int, workers: int) -> list[Proc]:
        """One processor, or a Bytewax cluster of ``processes`` on 127.0.0.1 sharing the
        stage's recovery folder (``--process-id``/``--addresses``). Process 0 creates the
        recovery partitions before the others start, so no two create them at once."""
        if processes == 1:
            return [self.processor(name, env, workers)]
        addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(processes))

        def member(index: int) -> Proc:
            args = ("--process-id", str(index), "--addresses", addresses)
            return self.processor(f"{name}-{index}", env, workers, *args)

        first = member(0)
        wait_until(
            lambda: "recovery partitions created" in first.tail(200),
            60,
            "process 0 to create the recovery partitions",
            first,
        )
        return [first, *(member(index) for index in range(1, processes))]

    def serve(self, name: str, stage_env: dict[str, str] | None, port: int) -> Proc:
        workers = self.args.api_workers
        if stage_env is None:  # the bare baseline, on the same interpreter and uvicorn
            env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_STORE_")}
            args = ["-m", "bench.bare_app", "--port", str(port), "--workers", str(workers)]
        else:
            env = stage_env
            args = ["-m", "cli.main", "serve", "--port", str(port), "--workers", str(workers)]
        proc = start_http(name, args, env, self.logs, port, workers)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def load(
        self, port: int, rate: float, duration: float, label: str, **kw: Any
    ) -> dict[str, Any]:
        spec = LoadSpec(
            port=port,
            rate=rate,
            duration=duration,
            connections=kw.pop("connections", max(64, min(512, int(rate * 0.02)))),
            procs=self.args.gen_procs,
            tag=f"{self.run_id}-{label}",
            label=label,
            **kw,
        )
        return summarize(spec, run_load(spec))

    def attack(
        self,
        port: int,
        rate: float,
        duration: float,
        label: str,
        batch: int = 0,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        """A constant-rate run of vegeta: single POSTs, or batches of ``batch`` trades."""
        tag = f"{self.run_id}-{label}"
        maturity = MATURITY
        spec = vegeta.Attack(
            url=f"http://127.0.0.1:{port}/api/v1/trades" + ("/batch" if batch else ""),
            rate=rate,
            duration=duration,
            label=label,
            timeout=timeout,
            trades_per_request=max(1, batch),
        )
        bodies = (
            (batch_body(tag, n, batch, maturity) for n in range(spec.count))
            if batch
            else (trade_body(tag, n, maturity) for n in range(spec.count))
        )
        return vegeta.run(spec, bodies, self.workdir / "vegeta")

    # -- phases ---------------------------------------------------------------------------
    def warmup(self, name: str, port: int, rate: float) -> None:
        self.attack(port, rate, self.mode.warm_s, f"{name}-warmup")
        time.sleep(0.5)

    def cpu_phase(self, name: str, proc: Proc, port: int, rate: float) -> dict[str, Any]:
        """Run at a fixed rate measuring the server's CPU per accepted request."""
        m = self.mode
        meter = CpuMeter(proc.pid)
        groups = GroupMeter({name: proc.pid})
        spread: dict[int, int] = {}

        def sample_spread() -> None:
            spread.update(connections_per_process(meter.pids, port))

        # halfway through the run, count which worker holds which keep-alive connection
        timer = threading.Timer(2.0 + m.cpu_s / 2, sample_spread)
        timer.start()
        summary = self.attack(port, rate, m.cpu_s, f"{name}-cpu")
        timer.cancel()
        total, per_pid = meter.stop()
        summary["machine_cores_busy"] = groups.stop()
        accepted = summary["status_counts"].get("202", 0)
        summary["server_cpu_s"] = round(total, 3)
        summary["cpu_us_per_req"] = round(total * 1e6 / accepted, 1) if accepted else None
        busy = {p: round(v, 3) for p, v in per_pid.items() if v > 0.05}
        summary["cpu_s_per_process"] = {str(p): v for p, v in busy.items()}
        summary["connections_per_process"] = {str(p): n for p, n in spread.items()}
        log(
            f"  {name}: {summary['cpu_us_per_req']} us CPU/request at {rate:.0f}/s"
            f" (CPU s per process {summary['cpu_s_per_process']}, connections per process"
            f" {summary['connections_per_process']}), ack p99 {summary['ack_p99_ms']} ms"
        )
        return summary

    def step_ok(self, s: dict[str, Any], max_p99: float = MAX_P99_MS) -> tuple[bool, str]:
        reasons = []
        # vegeta may end an attack one arrival short (the last tick falls past the duration)
        if s["errors"] or s["non_202"] or s["unsent"] > 1:
            reasons.append(f"errors={s['errors']} non202={s['non_202']} unsent={s['unsent']}")
        if s["aborted"]:
            reasons.append(s["aborted"])
        if s["ack_p99_ms"] is None or s["ack_p99_ms"] > max_p99:
            reasons.append(f"p99 {s['ack_p99_ms']} ms > {max_p99:.0f}")
        if not kept_rate(s):
            reasons.append(f"sent only {s['sent_rps']}/s")
        return not reasons, "; ".join(reasons) or "ok"

    def max_search(
        self,
        name: str,
        port: int,
        batch: int = 0,
        start_rate: float | None = None,
        probe_steps: int | None = None,
    ) -> dict[str, Any]:
        """Highest rate with p99 ack within bound (50 ms; batches 200 ms) and no errors:
        double, then bisect. Rates are requests (batches) per second."""
        m = self.mode
        max_p99 = BATCH_P99_MS if batch else MAX_P99_MS
        steps: list[dict[str, Any]] = []
        best_trades = [0.0]

        def attempt(rate: float) -> bool:
            s = self.attack(port, rate, m.search_s, f"{name}-{rate:g}/s", batch=batch)
            ok, why = self.step_ok(s, max_p99)
            if ok:
                best_trades[0] = max(best_trades[0], s["trades_per_s"] or 0.0)
            steps.append(
                {
                    "rate": rate,
                    "ok": ok,
                    "why": why,
                    **{
                        k: s[k]
                        for k in (
                            "sent_rps",
                            "achieved_rps",
                            "ack_p50_ms",
                            "ack_p99_ms",
                            "ack_max_ms",
                            "non_202",
                            "errors",
                            "trades_per_s",
                            "gen_cpu_us_per_req",
                        )
                    },
                }
            )
            log(
                f"  {name} {rate:,.0f}/s: {'PASS' if ok else 'FAIL'} ({why}); achieved"
                f" {s['achieved_rps']}/s, p50 {s['ack_p50_ms']} p99 {s['ack_p99_ms']} ms"
            )
            time.sleep(2.0)  # let the server drain before the next step
            return ok

        best, worst = 0.0, None
        rate = start_rate or m.search_start
        for _ in range(probe_steps or m.probe_steps):
            if attempt(rate):
                best = rate
                if worst is not None:
                    break
                rate *= 2
            else:
                worst = rate
                if best:
                    break
                rate = nice(rate / 2) if not batch else max(1.0, float(int(rate / 2)))
            if rate > m.search_max or rate < (1 if batch else 25):
                break
        for _ in range(m.bisect):
            if worst is None:
                break
            mid = nice((best + worst) / 2) if not batch else float(int((best + worst) / 2))
            if mid <= best or mid >= worst:
                break
            if attempt(mid):
                best = mid
            else:
                worst = mid
        return {
            "max_rps": best,
            "first_failing_rps": worst,
            "trades_per_s": best_trades[0],
            "max_p99_ms": max_p99,
            "steps": steps,
        }

    def wait_processor_ready(self, port: int, proc: Proc) -> None:
        """Submit one trade and wait until it is decided: the dataflow is consuming."""
        body = json.dumps(
            {
                "trade_id": f"ready-{self.run_id}",
                "version": 1,
                "counterparty_id": "CP",
                "book_id": "B",
                "maturity_date": "2099-01-01",
            }
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/trades",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as reply:  # noqa: S310
            location = reply.headers["Location"]

        def decided() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{location}", timeout=10) as r:
                return json.loads(r.read())["status"] != "PENDING"

        wait_until(decided, 120, "the processor to decide a first trade", proc)

    def api_phases(self) -> None:
        m = self.mode
        self.phase("API: maximum sustainable rate (p99 ack <= 50 ms, no errors)")
        stage = self.stage("api")
        port = free_port()
        api = self.serve("api", stage.env, port)
        self.warmup("api", port, 100)
        self.phases["api_max"] = found = self.max_search("api", port)
        # CPU per request at a rate the API sustains (the same rate for the baseline)
        cpu_rate = self.args.cpu_rate or min(m.cpu_rate, nice(max(50.0, 0.8 * found["max_rps"])))
        self.phase(f"API: CPU per accepted request at {cpu_rate:,.0f}/s")
        self.phases["api_cpu"] = self.cpu_phase("api", api, port, cpu_rate)
        self.stop(api)

        self.phase(f"bare FastAPI + pydantic baseline: same stack, {cpu_rate:,.0f}/s")
        port = free_port()
        bare = self.serve("bare", None, port)
        self.warmup("bare", port, 100)
        self.phases["bare_cpu"] = self.cpu_phase("bare", bare, port, cpu_rate)
        if m.bare_search:
            self.phases["bare_max"] = self.max_search("bare", port)
        self.stop(bare)

    def e2e_phase(self) -> None:
        m = self.mode
        self.phase(f"end to end at {m.e2e_rate:,.0f}/s: ack latency and POST → terminal status")
        stage = self.stage("e2e")
        processor = self.processor("e2e-processor", stage.env)
        port = free_port()
        api = self.serve("e2e-api", stage.env, port)
        self.wait_processor_ready(port, processor)
        groups = GroupMeter({"api": api.pid, "processor": processor.pid})
        summary, sampler = self.with_sampler(port, m.e2e_rate - SAMPLER_RPS, m.e2e_s, "e2e")
        summary["machine_cores_busy"] = groups.stop()
        summary["sampler"] = sampler
        for key in ("e2e_samples", "e2e_timeouts", "e2e_p50_ms", "e2e_p95_ms", "e2e_p99_ms"):
            summary[key] = sampler.get(key)
        self.phases["e2e"] = summary
        log(
            f"  e2e: ack p50 {summary['ack_p50_ms']} p99 {summary['ack_p99_ms']} ms;"
            f" e2e p50 {summary.get('e2e_p50_ms')} p99 {summary.get('e2e_p99_ms')} ms"
            f" over {summary.get('e2e_samples')} samples"
        )
        self.stop(api)
        self.stop(processor)

    def with_sampler(
        self, port: int, rate: float, duration: float, label: str, batch: int = 0
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """vegeta at ``rate`` and, alongside, our sampler at a small rate following every one
        of its acknowledged requests (a batch's last item) to its terminal status."""
        sampler_rate = max(1.0, rate / 10) if batch else SAMPLER_RPS
        out: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: out.update(self.attack(port, rate, duration, label, batch=batch))
        )
        thread.start()
        try:
            sampler = self.load(
                port,
                sampler_rate,
                duration,
                f"{label}-sampler",
                connections=8,
                batch=batch,
                e2e_every=1,
                e2e_timeout=30,
                abort_backlog_s=5.0,
                progress=False,
            )
        finally:
            thread.join()
        if not out:
            raise RuntimeError(f"the vegeta attack of {label} failed (see the log above)")
        sampler["e2e_poll_policy"] = (
            "first GET 5 ms after the 202, then every 10 ms for 0.5 s, 50 ms until 3 s, 250 ms"
        )
        return out, sampler

    def skipped_without_batches(self, name: str, port: int, api: Proc) -> bool:
        """Until the API serves POST /api/v1/trades/batch its phases are skipped, not failed
        (the endpoint of issue 12 is built in parallel with this benchmark)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=10) as r:
            if "/api/v1/trades/batch" in json.loads(r.read()).get("paths", {}):
                return False
        self.phases[name] = {"skipped": "POST /api/v1/trades/batch is not served yet"}
        log(f"  {name}: skipped, the API has no POST /api/v1/trades/batch yet")
        self.stop(api)
        return True

    def batch_phases(self) -> None:
        m = self.mode
        self.phase("batches of 100 and 1,000 trades, processor running (p99 ack <= 200 ms)")
        stage = self.stage("batch")
        port = free_port()
        api = self.serve("batch-api", stage.env, port)
        if self.skipped_without_batches("batch", port, api):
            return
        processor = self.processor("batch-processor", stage.env)
        self.wait_processor_ready(port, processor)
        phase: dict[str, Any] = {}
        self.phases["batch"] = phase
        phase["batch100_max"] = found = self.max_search(
            "batch100", port, batch=100, start_rate=m.batch_start, probe_steps=m.batch_probe_steps
        )
        rate = found["max_rps"] or 1.0
        self.wait_processor_ready(port, processor)  # the search's backlog decided first
        meter = CpuMeter(api.pid)
        groups = GroupMeter({"api": api.pid, "processor": processor.pid})
        run, sampler = self.with_sampler(port, rate, m.cpu_s, "batch100-e2e", batch=100)
        total, _ = meter.stop()
        run["machine_cores_busy"] = groups.stop()
        trades = run["trades_accepted"] + sampler["status_counts"].get("202", 0) * 100
        run["api_cpu_s"] = round(total, 3)
        run["api_cpu_us_per_trade"] = round(total * 1e6 / trades, 1) if trades else None
        run["sampler"] = sampler
        phase["batch100_fixed"] = run
        log(
            f"  batch100: {found['trades_per_s']} trades/s at p99 <= 200 ms;"
            f" {run['api_cpu_us_per_trade']} us API CPU/trade; e2e p99"
            f" {sampler.get('e2e_p99_ms')} ms over {sampler.get('e2e_samples')} batches"
        )
        self.wait_processor_ready(port, processor)
        phase["batch1000_max"] = found = self.max_search(
            "batch1000",
            port,
            batch=1000,
            start_rate=max(1.0, float(int(rate / 10))),
            probe_steps=m.batch_probe_steps,
        )
        log(f"  batch1000: {found['trades_per_s']} trades/s at p99 <= 200 ms")
        self.stop(api)
        self.stop(processor)

    def ndjson_phase(self) -> None:
        m = self.mode
        self.phase(f"one NDJSON stream of {m.ndjson_lines:,} trades: rate and API peak RSS")
        stage = self.stage("ndjson")
        port = free_port()
        api = self.serve("ndjson-api", stage.env, port)
        if self.skipped_without_batches("ndjson", port, api):
            return
        tag = f"{self.run_id}-ndjson"
        maturity = MATURITY
        rss = RssMeter(api.pid)
        cpu = CpuMeter(api.pid)
        result = run_stream(
            "127.0.0.1", port, (trade_body(tag, n, maturity) for n in range(m.ndjson_lines))
        )
        api_cpu, _ = cpu.stop()
        phase = {**result.figures(), **rss.stop(), "api_cpu_s": round(api_cpu, 2)}
        self.phases["ndjson"] = phase
        log(
            f"  ndjson: {phase['trades_per_s']} trades/s, {phase['result_lines']:,} result"
            f" lines, API peak RSS {phase['peak_rss_mb']} MB, error {phase['error']}"
        )
        self.stop(api)

    def overload_phase(self) -> None:
        m = self.mode
        best = self.phases.get("api_max", {}).get("max_rps") or 1000.0
        rate = 3 * best
        self.phase(f"overload: {rate:,.0f}/s (3 x the single-POST maximum) for {m.overload_s} s")
        stage = self.stage("overload")
        port = free_port()
        api = self.serve("overload-api", stage.env, port)
        rss = RssMeter(api.pid)
        run = self.attack(port, rate, m.overload_s, "overload", timeout=5.0)
        run.update(rss.stop())
        counts = run["status_counts"]
        run["other_statuses"] = sum(n for k, n in counts.items() if k not in ("202", "429"))
        self.phases["overload"] = run
        log(
            f"  overload: statuses {counts}, timeouts {run['timeouts']}, transport errors"
            f" {run['transport_errors']}, accepted p99 {run['accepted_p99_ms']} ms, sent"
            f" {run['sent_rps']}/s"
        )
        self.stop(api)

    def timed_drain(
        self, label: str, stage: Stage, plan: sinkmod.SinkPlan, procs: list[Proc], launched: float
    ) -> dict[str, Any]:
        """Time ``procs`` (one processor, or the processes of one cluster) deciding the
        pre-loaded ``plan`` until it is drained, then verify the stores and stop them.
        The clock starts at the last process's "processor started": a cluster decides
        nothing before all its processes are up."""
        m = self.mode
        names = ["processor"] if len(procs) == 1 else [p.name for p in procs]
        metered = time.monotonic()
        groups = GroupMeter({name: p.pid for name, p in zip(names, procs, strict=True)})
        drain = sinkmod.drain_progress(
            stage,
            len(plan.messages),
            m.drain_timeout,
            lambda: all(p.alive() for p in procs),
            m.stall_s,
            label,
        )
        cores = groups.stop()
        cpu_s = sum(cores[name] for name in names) * (time.monotonic() - metered)
        log("  verifying the store (rows, sampled versions, every status)")
        check = sinkmod.verify(stage, plan, wait_s=60 if drain["drained"] else 5)
        # the logs before the stop's own noise
        plogs = [p.log_path.read_text(errors="replace") for p in procs]
        # together: a cluster's process left alone waits for its peers and must be killed
        with ThreadPoolExecutor(len(procs)) as pool:
            list(pool.map(self.stop, procs))
        started = sinkmod.cluster_started_at(plogs)
        end = check["last_status_update"] or time.time()
        begin = started or launched
        n = len(plan.messages) if drain["drained"] else drain["decided"]
        timed = {
            "drained": drain["drained"],
            "stalled": bool(drain.get("stalled")),
            "processor_died": bool(drain.get("died")),
            "processor_problems": [p for text in plogs for p in sinkmod.log_problems(text)],
            "decided": drain["decided"],
            "startup_s": round(begin - launched, 2),
            "drain_s": round(end - begin, 2),
            "sink_rate": sinkmod.rate(n, end - begin),
            "sink_rate_incl_startup": sinkmod.rate(n, end - launched),
            # steadier than the rate on a shared machine: what the processes spent per trade
            "processor_cpu_us_per_trade": sinkmod.per_trade_us(cpu_s, n),
            "machine_cores_busy": cores,
            "verification": {k: v for k, v in check.items() if k != "last_status_update"},
        }
        log(
            f"  {label}: {timed['sink_rate']} trades/s ({n:,} in {timed['drain_s']}s after a"
            f" {timed['startup_s']}s start-up, {timed['processor_cpu_us_per_trade']} µs processor"
            " CPU a trade); verification"
            f" {'OK' if check['ok'] else 'FAILED: ' + '; '.join(check['problems'])}"
        )
        return timed

    def sink_phases(self) -> None:
        m = self.mode
        self.phase(f"sink: pre-load {m.sink_messages:,} trades, then time the processor")
        plan = sinkmod.make_plan(m.sink_messages, self.run_id)
        stage = self.stage("sink")
        load_info = sinkmod.preload(stage, plan)
        launched = time.time()
        processor = self.processor("sink-processor", stage.env)
        timed = self.timed_drain("sink", stage, plan, [processor], launched)
        if timed["drained"]:
            self.drained = (stage, plan)
        self.phases["sink"] = {
            "workload": sinkmod.expected_summary(plan),
            **load_info,
            "processor_workers": self.args.processor_workers,
            **timed,
        }

        self.phase("storage ceiling: the same rows and statuses straight into fresh stores")
        ceil_stage = self.stage("ceiling")
        ceil_stage.seed(plan.seed)
        batches = sinkmod.ceiling_batches(plan)
        groups = GroupMeter({})
        ceiling = ceil_stage.ceiling(batches)
        ceiling["machine_cores_busy"] = groups.stop()
        ceiling["rate"] = sinkmod.rate(len(plan.messages), ceiling["wall_s"])
        # what the trade store alone sustained while the statuses were being written
        ceiling["trade_store_rate_overlapped"] = sinkmod.rate(
            len(plan.messages), ceiling["trade_store_busy_s"]
        )
        ceiling["wall_s"] = round(ceiling["wall_s"], 2)
        ceiling["batch"] = sinkmod.CEILING_BATCH
        ccheck = sinkmod.verify(ceil_stage, plan, full_status=False, wait_s=5)
        ceiling["verification"] = {k: v for k, v in ccheck.items() if k != "last_status_update"}
        self.phases["ceiling"] = ceiling
        log(
            f"  ceiling: {ceiling['rate']} trades/s ({ceiling['method']}); verification"
            f" {'OK' if ccheck['ok'] else 'FAILED: ' + '; '.join(ccheck['problems'])}"
        )

    def scale_phase(self) -> None:
        """The same pre-loaded workload drained by each processor shape of SCALE_SHAPES."""
        m = self.mode
        if self.profile != "services":
            self.phases["scale"] = {
                "skipped": "services profile only (embedded: one host's SQLite files)"
            }
            return
        shapes = ", ".join(sinkmod.shape_label(*s) for s in sinkmod.SCALE_SHAPES)
        self.phase(f"scale: {m.sink_messages:,} pre-loaded trades drained by {shapes}")
        plan = sinkmod.make_plan(m.sink_messages, self.run_id)
        runs: dict[str, Any] = {}
        for processes, workers in sinkmod.SCALE_SHAPES:
            label = sinkmod.shape_label(processes, workers)
            log(f"  scale {label}: {processes} process(es) x {workers} worker(s)")
            stage = self.stage(f"scale-{label}")
            # sized for this cluster, as README "Scaling out" says
            stage.env["TRADE_STORE_RECOVERY_PARTITIONS"] = str(processes * workers)
            load_info = sinkmod.preload(stage, plan)
            launched = time.time()
            procs = self.cluster(f"scale-{label}", stage.env, processes, workers)
            timed = self.timed_drain(f"scale {label}", stage, plan, procs, launched)
            runs[label] = {"processes": processes, "workers": workers, **load_info, **timed}
            stage.cleanup()  # the next shape's topic and table on a lighter Kafka/dynoxide
            self.stages.remove(stage)
        self.phases["scale"] = {
            "workload": sinkmod.expected_summary(plan),
            **sinkmod.scale_summary(runs),
            "runs": runs,
        }

    def replay_phase(self) -> None:
        """``trade-store replay --from beginning`` of the sink phase's drained queue into a
        fresh trade store holding the sink's seed, timed, and checked against the live store
        the sink built (bench/replay.py)."""
        if self.drained is None:
            self.phases["replay"] = {
                "skipped": "needs the sink phase's drained queue (--phases sink,replay)"
            }
            return
        live, plan = self.drained
        n = len(plan.messages)
        self.phase(f"replay: the sink's {n:,} queued trades into a fresh trade store")
        target = self.stage("replay-target")
        target.seed(plan.seed)  # the trades older than the queue, as the live store had them
        workers = str(self.args.processor_workers)
        command = ["replay", "--from", "beginning", "--target-db", target.sql_url()]
        command += ["--workers", workers, "--yes"]
        groups = GroupMeter({})
        launched = time.monotonic()
        proc = self.spawn("replay", ["-m", "cli.main", *command], live.env)
        cpu_s = reap(proc.popen, self.mode.drain_timeout)
        wall = time.monotonic() - launched
        cores = groups.stop()
        # the replay had exited when the meter stopped: its share is wait4's, out of "other"
        cores["replay"] = round(cpu_s / wall, 3)
        cores["other"] = round(max(0.0, cores["other"] - cores["replay"]), 3)
        self.stop(proc)
        text = proc.log_path.read_text(errors="replace")
        report = replaymod.finished(text)
        target_rows = int(target.scalar("SELECT count(*) FROM trades"))
        live_rows = int(live.scalar("SELECT count(*) FROM trades"))
        problems = replaymod.check(
            report,
            proc.popen.returncode,
            n,
            replaymod.expected_decisions(plan),
            target_rows,
            live_rows,
        )
        phase = {
            "command": " ".join(["trade-store", *command]).replace(
                target.sql_url(), make_url(target.sql_url()).render_as_string()
            ),
            "statuses": "skip",
            "exit_code": proc.popen.returncode,
            **replaymod.figures(report, wall, cpu_s),
            "decisions": report.get("decisions") if report else None,
            "target_rows": target_rows,
            "live_rows": live_rows,
            "verified": not problems,
            "problems": problems,
            "replay_log_problems": sinkmod.log_problems(text),
            "machine_cores_busy": cores,
        }
        self.phases["replay"] = phase
        log(
            f"  replay: {phase['replay_rate']} records/s ({phase['records']} in"
            f" {phase['elapsed_s']}s; {phase['replay_rate_incl_startup']}/s launch to exit),"
            f" {phase['replay_cpu_us_per_record']} µs CPU a record; verification"
            f" {'OK' if not problems else 'FAILED: ' + '; '.join(problems)}"
        )

    # -- the whole run --------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        phases = set(self.args.phases.split(","))
        log(
            f"profile={self.profile} mode={'quick' if self.mode.quick else 'full'}"
            f" api_workers={self.args.api_workers} run={self.run_id} workdir={self.workdir}"
        )
        try:
            if self.profile == "services":
                self.phase("services: PostgreSQL, Kafka, dynoxide")
                self.started_services = services_up()
            for name, step in (
                ("api", self.api_phases),
                ("e2e", self.e2e_phase),
                ("batch", self.batch_phases),
                ("ndjson", self.ndjson_phase),
                ("overload", self.overload_phase),
                ("sink", self.sink_phases),
                ("scale", self.scale_phase),
                ("replay", self.replay_phase),
            ):
                if name in phases:
                    self.guarded(name, step)
            self.result = self.document()
        finally:
            self.cleanup()
        return self.result

    def guarded(self, name: str, step: Any) -> None:
        """Run one group of phases; a failure is recorded and the run goes on to the next."""
        try:
            step()
        except Exception as exc:
            log(f"!! {name} failed: {type(exc).__name__}: {exc}")
            log(traceback.format_exc())
            self.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:500]}")
            for proc in list(self.procs):
                self.stop(proc)

    def cleanup(self) -> None:
        for proc in list(self.procs):
            proc.stop()
        for stage in self.stages:
            stage.cleanup()
        if not self.args.keep_services:
            services_down(self.started_services)
        if self.args.keep:
            log(f"kept logs and data in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def document(self) -> dict[str, Any]:
        p = self.phases
        api_cpu = p.get("api_cpu", {}).get("cpu_us_per_req")
        bare_cpu = p.get("bare_cpu", {}).get("cpu_us_per_req")
        sink = p.get("sink", {})
        ceiling = p.get("ceiling", {})
        e2e = p.get("e2e", {})
        batch = p.get("batch", {})
        b100 = batch.get("batch100_fixed", {})
        ndjson = p.get("ndjson", {})
        over = p.get("overload", {})
        scale = p.get("scale", {})
        replay_rate = p.get("replay", {}).get("replay_rate")
        doc: dict[str, Any] = {
            "profile": self.profile,
            "mode": "quick" if self.mode.quick else "full",
            "git_commit": git_commit(APP_ROOT[0]),
            "app_root": str(APP_ROOT[0]) if APP_ROOT[0] != ROOT else None,
            "cpu_count": os.cpu_count(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "python": platform.python_version(),
            "api_workers": self.args.api_workers,
            "processor_workers": self.args.processor_workers,
            "load_tool": vegeta.NAME,
            "generator": {**GENERATOR, "processes": self.args.gen_procs},
            "api_max_rps": p.get("api_max", {}).get("max_rps"),
            "ack_rate_rps": self.mode.e2e_rate,
            "ack_p50_ms": e2e.get("ack_p50_ms"),
            "ack_p95_ms": e2e.get("ack_p95_ms"),
            "ack_p99_ms": e2e.get("ack_p99_ms"),
            "ack_max_ms": e2e.get("ack_max_ms"),
            "ack_non_202": e2e.get("non_202"),
            "e2e_p50_ms": e2e.get("e2e_p50_ms"),
            "e2e_p99_ms": e2e.get("e2e_p99_ms"),
            "cpu_rate_rps": p.get("api_cpu", {}).get("intended_rps"),
            "api_cpu_us_per_req": api_cpu,
            "bare_cpu_us_per_req": bare_cpu,
            "cpu_ratio": round(api_cpu / bare_cpu, 2) if api_cpu and bare_cpu else None,
            "bare_max_rps": p.get("bare_max", {}).get("max_rps"),
            "batch100_trades_per_s": batch.get("batch100_max", {}).get("trades_per_s"),
            "batch100_api_cpu_us_per_trade": b100.get("api_cpu_us_per_trade"),
            "batch1000_trades_per_s": batch.get("batch1000_max", {}).get("trades_per_s"),
            "batch_e2e_p99_ms": b100.get("sampler", {}).get("e2e_p99_ms"),
            "ndjson_lines": ndjson.get("lines_sent"),
            "ndjson_trades_per_s": ndjson.get("trades_per_s"),
            "ndjson_peak_rss_mb": ndjson.get("peak_rss_mb"),
            "overload_rate": over.get("intended_rps"),
            "overload_timeouts": over.get("timeouts"),
            "overload_other_statuses": over.get("other_statuses"),
            "overload_accepted_p99_ms": over.get("accepted_p99_ms"),
            "sink_rate": sink.get("sink_rate"),
            "sink_rate_incl_startup": sink.get("sink_rate_incl_startup"),
            "storage_ceiling_rate": ceiling.get("rate"),
            "sink_vs_ceiling": (
                round(sink["sink_rate"] / ceiling["rate"], 3)
                if sink.get("sink_rate") and ceiling.get("rate")
                else None
            ),
            "sink_verified": sink.get("verification", {}).get("ok"),
            **{
                f"scale_{sinkmod.shape_label(*shape)}_sink_rate": scale.get("sink_rates", {}).get(
                    sinkmod.shape_label(*shape)
                )
                for shape in sinkmod.SCALE_SHAPES
            },
            "scale_verified": scale.get("verified"),
            "replay_rate": replay_rate,
            "replay_verified": p.get("replay", {}).get("verified"),
            "replay_vs_sink": (
                round(replay_rate / sink["sink_rate"], 3)
                if replay_rate and sink.get("sink_rate")
                else None
            ),
            "errors": self.errors,
            "phases": p,
        }
        doc["targets"] = targets_for(doc)
        return doc


def git_commit(where: Path = ROOT) -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],  # noqa: S607
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def write(doc: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(out)
    print(markdown(doc), flush=True)
    log(f"result written to {out}")


def main(args: Any) -> int:
    run = Run(args)
    try:
        doc = run.execute()
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    write(doc, Path(args.out))
    return 1 if failed(doc) else 0


def failed(doc: dict[str, Any]) -> bool:
    """A phase failed, or a store it built did not verify (a phase not run verifies nothing)."""
    verdicts = (doc.get("sink_verified"), doc.get("scale_verified"), doc.get("replay_verified"))
    return bool(doc.get("errors")) or False in verdicts


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m bench")
