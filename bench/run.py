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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import sink as sinkmod
from bench.load import LoadSpec, kept_rate, run_load, summarize
from bench.profiles import Stage, new_stage, services_down, services_up
from bench.report import markdown, targets_for
from bench.stack import (
    APP_ROOT,
    ROOT,
    CpuMeter,
    GroupMeter,
    Proc,
    connections_per_process,
    free_port,
    log,
    start,
    start_http,
    wait_until,
)

GENERATOR = {
    "name": "bench.load (our own open-model generator: asyncio + uvloop, raw HTTP/1.1"
    " keep-alive, run in its own process(es))",
    "why": "no constant-throughput load tool installs from a Python wheel (wrk2 is not"
    " packaged; oha/rewrk are multi-minute cargo builds on 2 cores, over the --quick"
    " budget), and none follows acknowledged requests to their terminal status; ours costs"
    " ~30-70 us CPU per request and proves its rate: intended vs sent rate and its own send"
    " lag are reported for every phase, and latency is measured from each request's"
    " intended send time (wrk2's correction for coordinated omission).",
}
MAX_P99_MS = 50.0


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
    e2e_every: int = 100
    sink_messages: int = 200_000
    drain_timeout: float = 480
    stall_s: float = 60

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
            e2e_every=50,
            sink_messages=20_000,
            drain_timeout=90,
            stall_s=30,
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

    def processor(self, name: str, env: dict[str, str]) -> Proc:
        workers = str(self.args.processor_workers)
        return self.spawn(name, ["-m", "cli.main", "process", "--workers", workers], env)

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

    # -- phases ---------------------------------------------------------------------------
    def warmup(self, name: str, port: int, rate: float) -> None:
        self.load(port, rate, self.mode.warm_s, f"{name}-warmup", progress=False)
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
        summary = self.load(port, rate, m.cpu_s, f"{name}-cpu")
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

    def step_ok(self, s: dict[str, Any]) -> tuple[bool, str]:
        reasons = []
        if s["errors"] or s["non_202"] or s["unsent"]:
            reasons.append(f"errors={s['errors']} non202={s['non_202']} unsent={s['unsent']}")
        if s["aborted"]:
            reasons.append(s["aborted"])
        if s["ack_p99_ms"] is None or s["ack_p99_ms"] > MAX_P99_MS:
            reasons.append(f"p99 {s['ack_p99_ms']} ms > {MAX_P99_MS:.0f}")
        if not kept_rate(s):
            reasons.append(f"sent only {s['sent_rps']}/s")
        return not reasons, "; ".join(reasons) or "ok"

    def max_search(self, name: str, port: int) -> dict[str, Any]:
        """Highest rate with p99 ack <= 50 ms and no errors: double, then bisect."""
        m = self.mode
        steps: list[dict[str, Any]] = []

        def attempt(rate: float) -> bool:
            s = self.load(port, rate, m.search_s, f"{name}-{rate:.0f}/s", drain_timeout=3)
            ok, why = self.step_ok(s)
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
                            "gen_send_lag_p99_ms",
                            "connections",
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
        rate = m.search_start
        for _ in range(m.probe_steps):
            if attempt(rate):
                best = rate
                if worst is not None:
                    break
                rate *= 2
            else:
                worst = rate
                if best:
                    break
                rate = nice(rate / 2)
            if rate > m.search_max or rate < 25:
                break
        for _ in range(m.bisect):
            if worst is None:
                break
            mid = nice((best + worst) / 2)
            if mid <= best or mid >= worst:
                break
            if attempt(mid):
                best = mid
            else:
                worst = mid
        return {"max_rps": best, "first_failing_rps": worst, "steps": steps}

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
        summary = self.load(
            port,
            m.e2e_rate,
            m.e2e_s,
            "e2e",
            e2e_every=m.e2e_every,
            e2e_timeout=30,
            abort_backlog_s=5.0,
        )
        summary["machine_cores_busy"] = groups.stop()
        summary["e2e_poll_policy"] = (
            "first GET 5 ms after the 202, then every 10 ms for 0.5 s, 50 ms until 3 s, 250 ms"
        )
        self.phases["e2e"] = summary
        log(
            f"  e2e: ack p50 {summary['ack_p50_ms']} p99 {summary['ack_p99_ms']} ms;"
            f" e2e p50 {summary.get('e2e_p50_ms')} p99 {summary.get('e2e_p99_ms')} ms"
            f" over {summary.get('e2e_samples')} samples"
        )
        self.stop(api)
        self.stop(processor)

    def sink_phases(self) -> None:
        m = self.mode
        self.phase(f"sink: pre-load {m.sink_messages:,} trades, then time the processor")
        plan = sinkmod.make_plan(m.sink_messages, self.run_id)
        stage = self.stage("sink")
        load_info = sinkmod.preload(stage, plan)
        groups: GroupMeter | None = None
        launched = time.time()
        processor = self.processor("sink-processor", stage.env)
        groups = GroupMeter({"processor": processor.pid})
        drain = sinkmod.drain_progress(
            stage, len(plan.messages), m.drain_timeout, processor.alive, m.stall_s
        )
        cores = groups.stop()
        log("  verifying the store (rows, sampled versions, every status)")
        check = sinkmod.verify(stage, plan, wait_s=60 if drain["drained"] else 5)
        plog = processor.log_path.read_text(errors="replace")  # before the stop's own noise
        self.stop(processor)
        started = sinkmod.processor_started_at(plog)
        end = check["last_status_update"] or time.time()
        begin = started or launched
        n = len(plan.messages) if drain["drained"] else drain["decided"]
        sink = {
            "workload": sinkmod.expected_summary(plan),
            **load_info,
            "processor_workers": self.args.processor_workers,
            "drained": drain["drained"],
            "stalled": bool(drain.get("stalled")),
            "processor_died": bool(drain.get("died")),
            "processor_problems": sinkmod.log_problems(plog),
            "decided": drain["decided"],
            "startup_s": round(begin - launched, 2),
            "drain_s": round(end - begin, 2),
            "sink_rate": sinkmod.rate(n, end - begin),
            "sink_rate_incl_startup": sinkmod.rate(n, end - launched),
            "machine_cores_busy": cores,
            "verification": {k: v for k, v in check.items() if k != "last_status_update"},
        }
        self.phases["sink"] = sink
        log(
            f"  sink: {sink['sink_rate']} trades/s ({n:,} in {sink['drain_s']}s after a"
            f" {sink['startup_s']}s start-up); verification"
            f" {'OK' if check['ok'] else 'FAILED: ' + '; '.join(check['problems'])}"
        )

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
                ("sink", self.sink_phases),
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
            "sink_rate": sink.get("sink_rate"),
            "sink_rate_incl_startup": sink.get("sink_rate_incl_startup"),
            "storage_ceiling_rate": ceiling.get("rate"),
            "sink_vs_ceiling": (
                round(sink["sink_rate"] / ceiling["rate"], 3)
                if sink.get("sink_rate") and ceiling.get("rate")
                else None
            ),
            "sink_verified": sink.get("verification", {}).get("ok"),
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
    failed = doc.get("errors") or doc.get("sink_verified") is False
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m bench")
