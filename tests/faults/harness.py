"""The fault suite's harness: a steady load, fault injectors, a ledger of every request, and
the checks that compare what clients were told with what the pipeline did.

One run = one fault: a fresh API (`trade-store serve`) and processor (`trade-store process`)
on topics and a status table of their own, an open-loop load of POSTs from an async httpx
client, the fault injected mid-load, then a settling phase and the checks.

How the load makes every outcome predictable: each trade_id is a *lane* that has at most one
request in flight, and every new request of a lane gets the next version. So whatever
happened to earlier requests, a new version is the highest → SUCCESS; a "stale" request
re-sends a version the lane already had acknowledged below its highest → FAILED
STALE_VERSION. Each request carries a unique counterparty_id, so stored rows and queued
records lead back to the request that made them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import Engine, create_engine, text

from adapters.dynamodb import make_client
from config.settings import Settings
from domain.dead_letter import OFFSET_HEADER, PARTITION_HEADER
from tests.conftest import settings_env
from tests.support import LOGS, free_port, start, stop

ROOT = Path(__file__).resolve().parents[2]
# Restart the very instance the tests use: when .services is a link to another checkout's
# folder, that checkout's script (its paths are the markers it finds its processes by).
SERVICES_SCRIPT = (ROOT / ".services").resolve().parent / "scripts" / "services"
RESULTS = LOGS / "faults.json"

RATE = 100  # POST/s offered, whatever the answers
# Beyond it a tick is skipped (counted), so the load stays bounded: 100 POST/s held by a 5 s
# produce timeout is 500 waiting, and the rest is room for the client's own stalls. At 1,500
# the API's own slowest answer reached 6.4 s, past the budget, in a landing run.
IN_FLIGHT_CAP = 800
CLIENT_TIMEOUT_S = 30  # an answer later than this counts as no answer
# Idle connections are dropped by the client well before the server's keep-alive timeout
# (fault_settings): at equal timeouts a request sent on a connection the server is closing
# at that instant fails with a ReadError, unsent (httpx's default expiry is 5 s).
CLIENT_KEEPALIVE_S = 2.0
STALE_EVERY = 8  # every 8th request of a lane re-sends an older acknowledged version
SAMPLE_EVERY = 10  # every 10th acknowledged request is polled for its status
ANSWERS = {202, 429, 503}  # what POST may answer under faults; 429/503 with Retry-After


def utc_today() -> Any:
    return datetime.now(UTC).date()


# --- the ledger ------------------------------------------------------------------------------


@dataclass
class Sent:
    """One POST and what the client was told."""

    seq: int
    trade_id: str
    version: int
    counterparty_id: str
    stale: bool
    sent_at: float
    answered_at: float | None = None
    code: int | None = None  # None: no answer within CLIENT_TIMEOUT_S (or connection failed)
    retry_after: str | None = None
    request_id: str | None = None
    error: str | None = None
    app_s: float | None = None  # the API's own time to answer (Server-Timing)

    @property
    def acked(self) -> bool:
        return self.code == 202

    @property
    def latency(self) -> float:
        return (self.answered_at or time.monotonic()) - self.sent_at


@dataclass
class Lane:
    trade_id: str
    next_version: int = 1
    acked: list[int] = field(default_factory=list)
    sent: int = 0


class Ledger:
    """Every request sent, by lane; lanes are reused only when idle (one request in flight)."""

    def __init__(self, prefix: str, maturity_days: int = 30) -> None:
        self.prefix = prefix
        self.maturity = (utc_today() + timedelta(days=maturity_days)).isoformat()
        self.sent: list[Sent] = []
        self.skipped = 0
        self.lag_s = 0.0  # how far the load generator ever fell behind its schedule
        self._idle: deque[Lane] = deque()
        self._lanes = 0

    def next(self) -> tuple[Lane, Sent]:
        lane = self._idle.popleft() if self._idle else self._new_lane()
        lane.sent += 1
        stale = lane.sent % STALE_EVERY == 0 and len(lane.acked) >= 2
        version = lane.acked[-2] if stale else lane.next_version
        if not stale:
            lane.next_version += 1
        seq = len(self.sent)
        entry = Sent(seq, lane.trade_id, version, f"C{seq}", stale, time.monotonic())
        self.sent.append(entry)
        return lane, entry

    def _new_lane(self) -> Lane:
        self._lanes += 1
        return Lane(f"{self.prefix}-{self._lanes}")

    def release(self, lane: Lane, entry: Sent) -> None:
        if entry.acked and not entry.stale:
            lane.acked.append(entry.version)
        self._idle.append(lane)

    def body(self, entry: Sent) -> dict[str, Any]:
        return {
            "trade_id": entry.trade_id,
            "version": entry.version,
            "counterparty_id": entry.counterparty_id,
            "book_id": "FAULTS",
            "maturity_date": self.maturity,
        }

    def acked(self) -> list[Sent]:
        return [s for s in self.sent if s.acked]


def app_seconds(reply: httpx.Response) -> float | None:
    """How long the API took to start answering, by its ``Server-Timing: app;dur=<ms>``."""
    timing = reply.headers.get("server-timing", "")
    return float(timing.removeprefix("app;dur=")) / 1000 if timing.startswith("app;dur=") else None


async def post(client: httpx.AsyncClient, ledger: Ledger, lane: Lane, entry: Sent) -> None:
    try:
        reply = await client.post("/api/v1/trades", json=ledger.body(entry))
        entry.code = reply.status_code
        entry.retry_after = reply.headers.get("retry-after")
        entry.app_s = app_seconds(reply)
        if reply.status_code == 202:
            entry.request_id = reply.json()["request_id"]
        else:
            entry.error = reply.text[:300]
    except httpx.HTTPError as exc:
        entry.error = repr(exc)[:300]
    entry.answered_at = time.monotonic()
    ledger.release(lane, entry)


async def steady_load(
    clients: list[httpx.AsyncClient],
    ledger: Ledger,
    stop: asyncio.Event,
    on_ack: Callable[[Sent], None],
) -> None:
    """Offer RATE POST/s until ``stop`` (open loop: slow answers do not slow the offer), then
    wait for the answers still due. Requests are spread over several clients: one httpx
    pool with a thousand waiting requests would itself become the bottleneck."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    in_flight: set[asyncio.Task[None]] = set()
    tick = 0
    while not stop.is_set():
        due = begin + tick / RATE
        tick += 1
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        ledger.lag_s = max(ledger.lag_s, loop.time() - due)
        if len(in_flight) >= IN_FLIGHT_CAP:
            ledger.skipped += 1
            continue
        lane, entry = ledger.next()
        client = clients[entry.seq % len(clients)]
        task = asyncio.create_task(post(client, ledger, lane, entry))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        task.add_done_callback(lambda _t, e=entry: on_ack(e) if e.acked else None)
    if in_flight:
        await asyncio.gather(*in_flight)


# --- terminal statuses, watched while the faults happen ---------------------------------------


@dataclass
class Seen:
    """A GET answer from the sampler (for the latency and 5xx checks)."""

    code: int | None
    latency: float
    retry_after: str | None
    app_s: float | None = None


class Sampler:
    """Polls a sample of acknowledged requests through the API, remembering each one's first
    terminal answer and the first later answer that differs from it (terminal is final)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self.watched: list[str] = []
        self.first: dict[str, dict[str, Any]] = {}
        self.changed: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}
        self.not_found: set[str] = set()
        self.answers: list[Seen] = []

    def watch(self, request_id: str) -> None:
        self.watched.append(request_id)

    def success(self) -> str | None:
        """A watched request already seen SUCCESS (a victim for forged records)."""
        return next((r for r, b in self.first.items() if b["status"] == "SUCCESS"), None)

    async def poll(self, request_id: str) -> None:
        begin = time.monotonic()
        try:
            reply = await self._client.get(f"/api/v1/requests/{request_id}")
        except httpx.HTTPError:
            self.answers.append(Seen(None, time.monotonic() - begin, None))
            return
        self.answers.append(
            Seen(
                reply.status_code,
                time.monotonic() - begin,
                reply.headers.get("retry-after"),
                app_seconds(reply),
            )
        )
        if reply.status_code == 404:
            self.not_found.add(request_id)
        elif reply.status_code == 200:
            self.compare(request_id, normal(reply.json()))

    def compare(self, request_id: str, body: dict[str, Any] | None) -> None:
        """Note ``body`` as the request's first terminal status, or as a change of it."""
        first = self.first.get(request_id)
        if first is None:
            if body is not None and body["status"] != "PENDING":
                self.first[request_id] = body
        elif body != first:
            self.changed.setdefault(request_id, (first, body))

    async def run(self, stop: asyncio.Event, concurrency: int = 4) -> None:
        while not stop.is_set():
            ids = list(self.watched)
            for i in range(0, len(ids), concurrency):
                await asyncio.gather(*(self.poll(r) for r in ids[i : i + concurrency]))
                if stop.is_set():
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


# --- processes ---------------------------------------------------------------------------------


class Processor:
    """`trade-store process`, restarted when it exits, as an orchestrator would: every exit
    the suite did not cause is counted."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self._name = name
        self._env = env
        self._lock = threading.Lock()  # the watcher and the kill -9 fault never race
        self.exits: list[int] = []
        self.proc = start(name, ["process"], env)

    def watch(self) -> None:
        with self._lock:
            code = self.proc.poll()
            if code is not None:
                self.exits.append(code)
                self.proc = start(self._name, ["process"], self._env)

    def kill9_and_restart(self) -> Window:
        with self._lock:
            started = time.monotonic()
            if self.proc.poll() is not None:
                self.exits.append(self.proc.returncode)
            self.proc.kill()
            self.proc.wait(10)
            self.proc = start(self._name, ["process"], self._env)
            return Window(started, time.monotonic())

    def stop(self) -> None:
        with self._lock:
            stop(self.proc, signal.SIGINT)


@dataclass
class Stack:
    """The API and processor of one fault run, on their own topics and status table."""

    name: str
    settings: Settings
    api: subprocess.Popen[bytes]
    processor: Processor

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def answer_budget_s(self) -> float:
        """The bound on every API answer: the produce timeout plus one second."""
        return self.settings.produce_timeout_ms / 1000 + 1


@contextlib.contextmanager
def stack(name: str, settings: Settings) -> Iterator[Stack]:
    env = settings_env(settings)
    api = start(f"faults-{name}-api", ["serve"], env)
    processor = Processor(f"faults-{name}-processor", env)
    try:
        yield Stack(name, settings, api, processor)
    finally:
        processor.stop()
        stop(api, signal.SIGINT)


def fault_settings(base: Settings, name: str, tmp: Path) -> Settings:
    run = f"{name}-{os.urandom(3).hex()}"
    return base.model_copy(
        update={
            "inbound_topic": f"faults-inbound-{run}",
            "dlq_topic": f"faults-dlq-{run}",
            "status_table": f"faults-status-{run}",
            "recovery_dir": tmp / "recovery",
            "port": free_port(),
            "source_batch_size": 200,
            # The load and the sampler share one address: the suite measures faults, not quotas.
            "quota_writes_per_second": 0,
            "quota_reads_per_second": 0,
            # The load generator runs on the same two cores as the stack it faults: starved, it
            # opened connections and sent their headers late, past the 10 s header timeout
            # (408, closed; its late write then a ReadError, counted unanswered), and raced
            # the 5 s keep-alive. The suite measures the stack's answers, not that client.
            "header_timeout_s": 60.0,
            "keep_alive_timeout_s": 60.0,
            # Room for every connection the load's clients may hold (in flight and idle): the
            # suite measures faults, not the connection cap (tests/integration's hostile
            # clients do). Over it, a landing run logged 86 refusals and its client saw 84
            # answers of 429 and 2 ReadErrors.
            "max_connections": 4 * IN_FLIGHT_CAP,
        }
    )


# --- the shared services -----------------------------------------------------------------------


def _listener(port: int) -> int:
    """The pid listening on 127.0.0.1:port (from /proc), whatever started it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{cols[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return int(pid)
    raise AssertionError(f"nothing listens on port {port}: is the service up?")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(pid))
    return tree


@dataclass(frozen=True)
class Service:
    """One of scripts/services' services, found by its port (pid files differ per service)."""

    name: str
    port: int

    def pids(self) -> list[int]:
        """The listening process and all its descendants (PostgreSQL's backends too)."""
        tree, found = _children(), [_listener(self.port)]
        for pid in found:
            found.extend(tree.get(pid, []))
        return found

    def up(self) -> None:
        subprocess.run(
            [str(SERVICES_SCRIPT), "up", self.name],
            check=True,
            timeout=240,
            stdout=subprocess.DEVNULL,
            stderr=(LOGS / "faults-services.log").open("ab"),
        )

    def is_up(self) -> bool:
        return (
            subprocess.run(
                [str(SERVICES_SCRIPT), "status", self.name],
                capture_output=True,
                timeout=60,
                check=False,
            ).returncode
            == 0
        )


def services(settings: Settings) -> dict[str, Service]:
    """PostgreSQL, Kafka and the status store (dynalite or whatever scripts/services runs)."""
    script = SERVICES_SCRIPT.read_text()
    listed = script.split("ALL_SERVICES=(", 1)[1].split(")", 1)[0].split()
    status_store = next(n for n in listed if n not in {"postgres", "kafka"})
    endpoint = settings.dynamodb_endpoint_url or ""
    return {
        "postgres": Service("postgres", 55432),
        "kafka": Service("kafka", int(settings.kafka_bootstrap_servers.rsplit(":", 1)[1])),
        "status_store": Service(status_store, int(endpoint.rsplit(":", 1)[1])),
    }


@dataclass
class Window:
    """When a fault was injected and when it was lifted (monotonic seconds)."""

    started: float
    lifted: float


def kill(service: Service, down_s: float = 2.0) -> Window:
    """SIGKILL the service (every process of it), then restart it with scripts/services up."""
    started = time.monotonic()
    for pid in service.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(down_s)
    service.up()
    return Window(started, time.monotonic())


def freeze(service: Service, seconds: float) -> Window:
    """SIGSTOP every process of the service for ``seconds``, then SIGCONT."""
    pids = service.pids()
    started = time.monotonic()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    return Window(started, time.monotonic())


# --- what the pipeline did ---------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    appended_ms: int = 0  # the broker's LogAppendTime stamp


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30) -> list[Record]:
    """Every record of ``topic``, from the beginning to the end it had when called."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"faults-reader-{os.urandom(4).hex()}",
            "enable.auto.commit": False,
            "fetch.message.max.bytes": 2_100_000,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in todo])
        records: list[Record] = []
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is not None or m.partition() not in todo:
                    continue
                headers = {k: v or b"" for k, v in (m.headers() or [])}
                stamp = m.timestamp()[1]
                records.append(
                    Record(m.partition(), m.offset(), m.key(), m.value(), headers, stamp)
                )
                if m.offset() + 1 >= ends[m.partition()]:
                    todo.discard(m.partition())
        assert not todo, f"could not read {topic} to its end (partitions {sorted(todo)})"
        return records
    finally:
        consumer.close()


def scan_statuses(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every item of the run's own status table (so orphans are visible too)."""
    client = make_client(settings.dynamodb_endpoint_url, settings.aws_region)
    items: dict[str, dict[str, Any]] = {}
    kwargs: dict[str, Any] = {"TableName": settings.status_table, "ConsistentRead": True}
    while True:
        page = client.scan(**kwargs)
        for item in page["Items"]:
            items[item["request_id"]["S"]] = {k: next(iter(v.values())) for k, v in item.items()}
        if "LastEvaluatedKey" not in page:
            return items
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def sql_engine(settings: Settings) -> Engine:
    """A small engine of the harness's own that never hangs on a frozen PostgreSQL."""
    return create_engine(
        settings.database_url.get_secret_value(),
        pool_size=2,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 3, "options": "-c statement_timeout=5000"},
    )


def decided(engine: Engine, request_ids: list[str]) -> int:
    """How many of ``request_ids`` the decision log holds."""
    with engine.connect() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM request_outcomes WHERE request_id = ANY(:ids)"),
            {"ids": request_ids},
        ).scalar_one()
    return int(count)


@dataclass
class Stored:
    """The trade store and decision log rows of one run's trades."""

    rows: dict[tuple[str, int], dict[str, Any]]
    log_counts: Counter[str]


def stored(engine: Engine, prefix: str) -> Stored:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT trade_id, version, counterparty_id, book_id, maturity_date"
                " FROM trades WHERE trade_id LIKE :p"
            ),
            {"p": f"{prefix}-%"},
        ).mappings()
        by_key = {(r["trade_id"], r["version"]): dict(r) for r in rows}
        log = conn.execute(
            text("SELECT request_id FROM request_outcomes WHERE trade_id LIKE :p"),
            {"p": f"{prefix}-%"},
        ).scalars()
        return Stored(by_key, Counter(log))


# --- the verdict -------------------------------------------------------------------------------


@dataclass
class Figures:
    """One fault's line: what the clients were told and what the pipeline made of it."""

    fault: str
    sent: int = 0
    accepted: int = 0
    unavailable: int = 0  # 503
    overloaded: int = 0  # 429
    other: int = 0  # any other answer
    unanswered: int = 0  # no answer within CLIENT_TIMEOUT_S
    skipped: int = 0  # ticks not sent: IN_FLIGHT_CAP requests already waiting
    client_lag_s: float = 0.0  # the load generator's worst delay behind its schedule
    lost: int = 0
    wrong: int = 0
    duplicated: int = 0
    orphans: int = 0
    pending: int = 0
    stored_after_503: int = 0  # answered 503, yet stored
    late_after_503: int = 0  # answered 503, written later by the broker, refused as late
    ack_lost_after_503: int = 0  # answered 503, appended in time, its ack lost: processed
    queued_twice: int = 0  # records the producer wrote twice (decided once: the log)
    status_changes: int = 0
    processor_exits: int = 0
    dead_letters_expected: int = 0
    dead_letters_found: int = 0
    post_p99_s: float = 0.0
    max_answer_s: float = 0.0  # as the client saw it
    max_app_s: float = 0.0  # as the API timed it
    recovery_s: float | None = None
    fault_s: float = 0.0
    wall_s: float = 0.0

    def line(self) -> str:
        recovery = "never" if self.recovery_s is None else f"{self.recovery_s:.1f}s"
        return (
            f"{self.fault}: sent={self.sent} 202={self.accepted} 503={self.unavailable}"
            f" 429={self.overloaded} other={self.other} unanswered={self.unanswered}"
            f" lost={self.lost} wrong={self.wrong} duplicated={self.duplicated}"
            f" orphans={self.orphans} pending={self.pending}"
            f" stored_after_503={self.stored_after_503} late_after_503={self.late_after_503}"
            f" ack_lost_after_503={self.ack_lost_after_503} queued_twice={self.queued_twice}"
            f" status_changes={self.status_changes}"
            f" processor_exits={self.processor_exits}"
            f" dlq={self.dead_letters_found}/{self.dead_letters_expected}"
            f" post_p99={self.post_p99_s:.2f}s max_answer={self.max_answer_s:.2f}s"
            f" max_app={self.max_app_s:.2f}s"
            f" recovery={recovery} fault={self.fault_s:.1f}s wall={self.wall_s:.0f}s"
            f" skipped={self.skipped} client_lag={self.client_lag_s:.2f}s"
        )


def dump(fault: str, ledger: Ledger, window: Window) -> None:
    """Every request of the run, one JSON line each, times relative to the fault's start."""
    with (LOGS / f"faults-{fault}-ledger.jsonl").open("w") as f:
        for s in ledger.sent:
            row = asdict(s) | {"sent_at": round(s.sent_at - window.started, 3)}
            row["answered_at"] = round((s.answered_at or 0) - window.started, 3)
            f.write(json.dumps(row) + "\n")


def save(figures: Figures) -> None:
    """Merge this fault's figures into .services/test-logs/faults.json."""
    LOGS.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[figures.fault] = asdict(figures)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


@dataclass
class Outcome:
    """Everything a run leaves behind, collected once the load has settled."""

    ledger: Ledger
    sampler: Sampler
    statuses: dict[str, dict[str, Any]]
    store: Stored
    inbound: list[Record]
    dead_letters: list[Record]
    poison: dict[bytes, str]  # the key of each poison record → what it is
    never_issued: set[str]  # request ids put on poison records that the API never returned


def _p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)] if values else 0.0


def _sample(items: list[Any], n: int = 5) -> str:
    return ", ".join(str(i) for i in items[:n]) + (" …" if len(items) > n else "")


def _status(out: Outcome, entry: Sent) -> str | None:
    return out.statuses.get(entry.request_id or "", {}).get("status")


def count_answers(out: Outcome, f: Figures) -> list[str]:
    codes = Counter(s.code for s in out.ledger.sent)
    f.sent, f.accepted, f.unavailable = len(out.ledger.sent), codes[202], codes[503]
    f.overloaded, f.unanswered, f.skipped = codes[429], codes[None], out.ledger.skipped
    f.client_lag_s = round(out.ledger.lag_s, 3)
    f.other = f.sent - f.accepted - f.unavailable - f.overloaded - f.unanswered
    return []


def check_nothing_lost(out: Outcome, f: Figures) -> list[str]:
    """Every 202 is queued and resolves to a terminal status; a new version has its row."""
    acked, broken = out.ledger.acked(), []
    unresolved = {s.seq for s in acked if _status(out, s) in (None, "PENDING")}
    rowless = {
        s.seq
        for s in acked
        if not s.stale and _row_differs(out.store.rows.get((s.trade_id, s.version)), s, out.ledger)
    }
    queued = {r.headers.get("request_id") for r in out.inbound if r.key not in out.poison}
    unqueued = {s.seq for s in acked if (s.request_id or "").encode() not in queued}
    lost = unresolved | rowless | unqueued
    f.lost = len(lost)
    f.pending = sum(1 for s in acked if _status(out, s) == "PENDING")
    if lost:
        examples = [(s.request_id, s.trade_id, s.version) for s in acked if s.seq in lost]
        broken.append(
            f"ACK MEANS DURABLE: {len(lost)} acknowledged requests lost ({len(unresolved)} never"
            f" terminal, {len(rowless)} without their row as sent, {len(unqueued)} not in the"
            f" topic); e.g. {_sample(examples)}"
        )
    if f.pending:
        broken.append(f"NO PENDING AFTER SETTLING: {f.pending} acknowledged requests PENDING")
    if out.sampler.not_found:
        broken.append(
            f"ACK MEANS DURABLE: {len(out.sampler.not_found)} acknowledged requests answered 404"
        )
    return broken


def check_decisions(out: Outcome, f: Figures) -> list[str]:
    """A new version ends SUCCESS, a re-sent lower one FAILED STALE_VERSION."""
    wrong = []
    for s in out.ledger.acked():
        status = out.statuses.get(s.request_id or "")
        if status is None or status["status"] == "PENDING":
            continue  # counted as lost
        want = (
            ("FAILED", "STALE_VERSION", str(s.version))
            if s.stale
            else ("SUCCESS", None, str(s.version))
        )
        got = (status["status"], status.get("reason_code"), status["version"])
        if got != want:
            wrong.append((s.request_id, want, got))
    f.wrong = len(wrong)
    return (
        [f"DECISIONS: {len(wrong)} requests ended other than decided: {_sample(wrong)}"]
        if wrong
        else []
    )


def check_no_duplicates(out: Outcome, f: Figures) -> list[str]:
    """One decision per request, however many copies of it the producer wrote.

    Kafka's idempotent producer cannot dedupe across a broker killed with requests in
    flight (librdkafka bumps the producer epoch and sends them again), so copies in the
    topic are counted, not refused: the decision log decides each request once, and
    ``check_decisions`` sees that its one status is the right one.
    """
    queued = Counter(
        r.headers.get("request_id", b"").decode() for r in out.inbound if r.key not in out.poison
    )
    f.queued_twice = sum(1 for n in queued.values() if n > 1)
    twice_logged = [rid for rid, n in out.store.log_counts.items() if n > 1]
    f.duplicated = len(twice_logged)
    if not f.duplicated:
        return []
    return [f"NO DUPLICATES: {len(twice_logged)} requests decided more than once"]


def check_no_orphans(out: Outcome, f: Figures) -> list[str]:
    """No status record for an id no client was ever given with a 202 (but a request whose
    ack was lost after an in-time append: it is decided, see ``check_exact_503``)."""
    given = {s.request_id for s in out.ledger.acked()}
    given |= {r.headers.get("request_id", b"").decode() for r in _acks_lost(out)}
    orphans = sorted(set(out.statuses) - given)
    f.orphans = len(orphans)
    if not orphans:
        return []
    states = Counter(out.statuses[r]["status"] for r in orphans)
    named = len(set(orphans) & out.never_issued)
    return [
        f"NO ORPHANS: {len(orphans)} status records for ids never returned with a 202"
        f" ({dict(states)}; {named} of them named by poison records)"
    ]


LATE = b"queued after the API answered 503"  # the start of a late record's dlq_reason


def _late(out: Outcome) -> set[tuple[int, int]]:
    """Where the records the dataflow refused as appended after their deadline were read
    (the dead letters' ``__connect.errors.partition`` / ``offset``): one request may have
    two copies in the topic, an in-time append whose ack was lost and a late retry of it."""
    return {
        (int(r.headers[PARTITION_HEADER]), int(r.headers[OFFSET_HEADER]))
        for r in out.dead_letters
        if r.headers.get("dlq_reason", b"").startswith(LATE)
    }


def _refused_records(out: Outcome) -> list[Record]:
    """The topic's records (every copy) of requests answered 503."""
    refused = {s.counterparty_id for s in out.ledger.sent if s.code == 503}
    return [r for r in out.inbound if _counterparty(r.value) in refused]


def _acks_lost(out: Outcome) -> list[Record]:
    """Records of requests answered 503 that the broker appended by their deadline: their
    acknowledgement was lost (the broker died before it reached the API), so the dataflow
    takes them, as it must take any record appended in time (a late copy of the same
    request, a producer retry, is refused all the same)."""
    return [r for r in _refused_records(out) if r.appended_ms <= _deadline(r)]


def check_exact_503(out: Outcome, f: Figures) -> list[str]:
    """A 503 means the trade was not and will not be processed: when it reached the topic
    all the same (a stalled broker wrote it after its deadline), the dataflow refused it
    as late. The one exception the design admits: an ack lost after an in-time append."""
    refused_late = _late(out)
    late = [r for r in _refused_records(out) if r.appended_ms > _deadline(r)]
    taken_late = {
        _counterparty(r.value) for r in late if (r.partition, r.offset) not in refused_late
    }
    lost_acks = {_counterparty(r.value) for r in _acks_lost(out)}
    in_store = {
        s.counterparty_id
        for s in out.ledger.sent
        if s.code == 503
        and (row := out.store.rows.get((s.trade_id, s.version)))
        and row["counterparty_id"] == s.counterparty_id
    }
    f.late_after_503 = len(late) - len(taken_late)
    f.ack_lost_after_503 = len(lost_acks)
    f.stored_after_503 = len(in_store)
    broken = taken_late | (in_store - lost_acks)
    if not broken:
        return []
    return [
        f"EXACT 503: {len(broken)} requests answered 503 were processed though appended after"
        f" their deadline, or stored without being queued ({_sample(sorted(map(str, broken)))})"
    ]


def _deadline(record: Record) -> int:
    return int(record.headers.get("queue_deadline_ms", b"0") or 0)


def check_terminal_is_final(out: Outcome, f: Figures) -> list[str]:
    """The sampled terminal statuses never changed while polled, and equal them at the end."""
    sampler = out.sampler
    for rid in list(sampler.first):
        sampler.compare(rid, normal(out.statuses.get(rid)))
    f.status_changes = len(sampler.changed)
    if not sampler.changed:
        return []
    rid, (before, after) = next(iter(sampler.changed.items()))
    diff = {k: (v, (after or {}).get(k)) for k, v in before.items() if v != (after or {}).get(k)}
    return [
        f"TERMINAL IS FINAL: {f.status_changes} of {len(sampler.first)} sampled terminal"
        f" statuses changed; e.g. {rid}: {diff}"
    ]


def check_processor_ran(out: Outcome, f: Figures) -> list[str]:
    """The processor never exited by itself (the kill -9 fault's own kill does not count)."""
    if not f.processor_exits:
        return []
    return [f"FLOW NEVER STOPS: the processor exited {f.processor_exits} times by itself"]


def check_dead_letters(out: Outcome, f: Figures) -> list[str]:
    """Every poison record is in the dead letters exactly once, and nothing else is but
    records refused as late (answered 503, written by a stalled broker afterwards)."""
    by_key = Counter(r.key for r in out.dead_letters)
    f.dead_letters_expected = len(out.poison)
    f.dead_letters_found = sum(1 for k in out.poison if by_key[k])
    broken = []
    copies = {what: by_key[k] for k, what in out.poison.items() if by_key[k] != 1}
    if copies:
        broken.append(f"DEAD LETTERS EXACTLY ONCE: copies per poison record {copies}")
    late = sum(1 for r in out.dead_letters if r.headers.get("dlq_reason", b"").startswith(LATE))
    strays = sum(n for k, n in by_key.items() if k not in out.poison) - late
    if strays:
        broken.append(f"DEAD LETTERS: {strays} records dead-lettered that were no poison")
    return broken


def check_outage_answers(out: Outcome, f: Figures) -> list[str]:
    """5xx only as 503, and 503 (or 429) always with Retry-After; POST answers nothing else."""
    answers = [(s.code, s.retry_after) for s in out.ledger.sent]
    answers += [(a.code, a.retry_after) for a in out.sampler.answers]
    other_5xx = Counter(c for c, _ in answers if c is not None and c >= 500 and c != 503)
    no_retry = sum(1 for c, ra in answers if c in (429, 503) and not ra)
    odd = [s for s in out.ledger.sent if s.code is not None and s.code not in ANSWERS]
    if not (other_5xx or no_retry or odd):
        return []
    return [
        f"OUTAGES ARE 503 + RETRY-AFTER: other 5xx {dict(other_5xx)}, {no_retry} 429/503"
        f" without Retry-After, {len(odd)} other POST answers"
        f" (e.g. {_sample([(s.code, s.error) for s in odd], 2)})"
    ]


def check_fast_answers(out: Outcome, f: Figures, budget_s: float) -> list[str]:
    """Every answer, POST or the sampler's GET, within the produce timeout plus 1 s, as the
    API timed it (``Server-Timing``); every request answered at all. What the client saw,
    its own scheduling included (it runs beside every service on two cores), is reported."""
    answers = [(s.code, s.app_s, s.latency) for s in out.ledger.sent]
    answers += [(a.code, a.app_s, a.latency) for a in out.sampler.answers]
    posts = [s.latency for s in out.ledger.sent]
    f.post_p99_s = round(_p99(posts), 3)
    f.max_answer_s = round(max((seen for *_, seen in answers), default=0.0), 3)
    f.max_app_s = round(max((app or 0.0 for _, app, _ in answers), default=0.0), 3)
    unanswered = sum(1 for code, _, _ in answers if code is None)
    slow = sum(1 for code, app, _ in answers if code is not None and (app or 0.0) > budget_s)
    untimed = sum(1 for code, app, _ in answers if code is not None and app is None)
    if not (unanswered or slow or untimed):
        return []
    return [
        f"FAST ANSWERS: {slow} answers took the API longer than {budget_s:.1f}s (slowest"
        f" {f.max_app_s:.1f}s), {unanswered} unanswered, {untimed} without Server-Timing"
    ]


def verify(out: Outcome, figures: Figures, budget_s: float) -> list[str]:
    """Fill in ``figures``; return one message per broken guarantee."""
    checks: list[Callable[[Outcome, Figures], list[str]]] = [
        count_answers,
        check_nothing_lost,
        check_decisions,
        check_no_duplicates,
        check_no_orphans,
        check_exact_503,
        check_terminal_is_final,
        check_processor_ran,
        check_dead_letters,
        check_outage_answers,
        lambda o, f: check_fast_answers(o, f, budget_s),
    ]
    return [message for check in checks for message in check(out, figures)]


def _row_differs(row: dict[str, Any] | None, s: Sent, ledger: Ledger) -> bool:
    if row is None:
        return True
    return (row["counterparty_id"], row["book_id"], row["maturity_date"].isoformat()) != (
        s.counterparty_id,
        "FAULTS",
        ledger.maturity,
    )


def _counterparty(value: bytes | None) -> str | None:
    try:
        body = json.loads(value or b"")
        return str(body["trade"]["counterparty_id"])
    except (ValueError, KeyError, TypeError):
        return None


def normal(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """A status as GET /api/v1/requests/{id} shows it, from its JSON or a scanned item, with
    timestamps parsed (so equal instants compare equal whatever their spelling)."""
    if body is None:
        return None
    return {
        "request_id": body["request_id"],
        "status": body["status"],
        "trade_id": body["trade_id"],
        "version": int(body["version"]),
        "reason_code": body.get("reason_code"),
        "failure_reason": body.get("failure_reason"),
        "created_at": datetime.fromisoformat(body["created_at"]),
        "updated_at": datetime.fromisoformat(body["updated_at"]),
    }


# --- poison ------------------------------------------------------------------------------------


def poison_records(victim: str) -> list[tuple[str, bytes, list[tuple[str, bytes]]]]:
    """(what, value, headers) of each poison record. All but the forged one name a request id
    the API never issued, so a status record for it would be an orphan."""

    def fresh() -> str:
        return f"never-issued-{os.urandom(6).hex()}"

    good = {
        "schema_version": 1,
        "request_id": "",
        "correlation_id": "poison",
        "accepted_on": utc_today().isoformat(),
        "accepted_at": datetime.now(UTC).isoformat(),
        "trade": {"trade_id": "P", "version": 1},
    }

    def body(**fields: Any) -> bytes:
        return json.dumps({**good, **fields}).encode()

    ids = {what: fresh() for what in ("huge-reason", "truncated", "schema", "shape")}
    return [
        ("oversized", b"x" * 1_030_000, [("request_id", fresh().encode())]),
        (
            "huge-reason",
            body(request_id=ids["huge-reason"], schema_version="v" * 500_000),
            [("request_id", ids["huge-reason"].encode())],
        ),
        (
            "forged-success",
            body(request_id=victim, trade="forged"),
            [("request_id", victim.encode())],
        ),
        (
            "truncated-json",
            body(request_id=ids["truncated"])[:60],
            [("request_id", ids["truncated"].encode())],
        ),
        (
            "wrong-schema-version",
            body(request_id=ids["schema"], schema_version=2),
            [("request_id", ids["schema"].encode())],
        ),
        ("wrong-shape", body(request_id=ids["shape"]), [("request_id", ids["shape"].encode())]),
    ]


# --- one run -----------------------------------------------------------------------------------

PRE_S = 3.0  # load before the fault
POST_S = 5.0  # load after it is lifted
SETTLE_S = 30.0  # after the load, time for every acknowledged request to turn terminal


@dataclass
class Run:
    """What an injector may reach: the stack, the services, and the run's bookkeeping."""

    stack: Stack
    services: dict[str, Service]
    client: httpx.AsyncClient  # the warm-up's and the sampler's
    load_clients: list[httpx.AsyncClient]
    sampler: Sampler
    poison: dict[bytes, str] = field(default_factory=dict)
    never_issued: set[str] = field(default_factory=set)

    def produce_poison(self) -> Window:
        """Produce every poison record straight to the inbound topic, keyed by what it is."""
        started = time.monotonic()
        victim = wait_for_value(self.sampler.success, 20, "a SUCCESS to forge")
        settings = self.stack.settings
        producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "message.max.bytes": 2_000_000,
                "acks": "all",
            }
        )
        failures: list[str] = []
        for what, value, headers in poison_records(victim):
            key = f"poison-{what}".encode()
            self.poison[key] = what
            rid = dict(headers)["request_id"].decode()
            if rid != victim:
                self.never_issued.add(rid)
            producer.produce(
                settings.inbound_topic,
                key=key,
                value=value,
                headers=headers,
                on_delivery=lambda err, _m, w=what: failures.append(w) if err else None,
            )
        assert producer.flush(30) == 0, "poison records still unsent after 30 s"
        assert not failures, f"poison records refused by the broker: {failures}"
        return Window(started, time.monotonic())


def wait_for_value(check: Callable[[], str | None], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while (value := check()) is None:
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)
    return value


async def _until_healthy(client: httpx.AsyncClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/api/v1/health")).status_code == 200:
                return
        assert time.monotonic() < deadline, "the API never became healthy"
        await asyncio.sleep(0.3)


async def _warm_up(run: Run, ledger: Ledger) -> None:
    """One request all the way to SUCCESS: the processor is consuming before the clock starts."""
    sampler = run.sampler
    lane, entry = ledger.next()
    await post(run.client, ledger, lane, entry)
    assert entry.request_id, f"warm-up request refused: {entry.code} {entry.error}"
    sampler.watch(entry.request_id)
    deadline = time.monotonic() + 90
    while entry.request_id not in sampler.first:
        await sampler.poll(entry.request_id)
        assert time.monotonic() < deadline, "the processor never decided the warm-up request"
        await asyncio.sleep(0.3)


async def _recovery(engine: Engine, ledger: Ledger, lifted: float) -> float:
    """Seconds from the fault's end until every request acknowledged before it is decided."""
    ids = [s.request_id for s in ledger.acked() if (s.answered_at or 0) <= lifted]
    while True:
        with contextlib.suppress(Exception):  # the database may still be recovering
            if await asyncio.to_thread(decided, engine, [i for i in ids if i]) == len(ids):
                return time.monotonic() - lifted
        await asyncio.sleep(0.5)


async def _settle(run: Run, ledger: Ledger) -> dict[str, dict[str, Any]]:
    """Statuses once every acknowledged request is terminal and every poison record is
    dead-lettered, or as they are when SETTLE_S runs out."""
    settings = run.stack.settings
    deadline = time.monotonic() + SETTLE_S
    while True:
        run.stack.processor.watch()
        statuses = await asyncio.to_thread(scan_statuses, settings)
        terminal = all(
            statuses.get(s.request_id or "", {}).get("status") not in (None, "PENDING")
            for s in ledger.acked()
        )
        letters = (
            await asyncio.to_thread(
                read_topic, settings.kafka_bootstrap_servers, settings.dlq_topic
            )
            if run.poison
            else []
        )
        if (terminal and len(letters) >= len(run.poison)) or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(1)


@dataclass
class Result:
    outcome: Outcome
    window: Window
    recovery_s: float | None


async def exercise(run: Run, prefix: str, inject: Callable[[Run], Window]) -> Result:
    """Warm up, load, inject the fault mid-load, keep loading, settle, collect."""
    stack, sampler = run.stack, run.sampler
    ledger = Ledger(prefix)
    engine = sql_engine(stack.settings)
    await _until_healthy(run.client)
    await _warm_up(run, ledger)

    def on_ack(entry: Sent) -> None:
        if entry.seq % SAMPLE_EVERY == 0 and entry.request_id:
            sampler.watch(entry.request_id)

    stop_load, stop_watch = asyncio.Event(), asyncio.Event()
    watchers = [
        asyncio.create_task(sampler.run(stop_watch)),
        asyncio.create_task(_watch_processor(stack.processor, stop_watch)),
    ]
    load = asyncio.create_task(steady_load(run.load_clients, ledger, stop_load, on_ack))
    await asyncio.sleep(PRE_S)
    window = await asyncio.to_thread(inject, run)
    recovery = asyncio.create_task(_recovery(engine, ledger, window.lifted))
    await asyncio.sleep(POST_S)
    stop_load.set()
    await load
    statuses = await _settle(run, ledger)
    stop_watch.set()
    await asyncio.gather(*watchers)
    recovery_s = recovery.result() if recovery.done() else None
    recovery.cancel()
    settings = stack.settings
    outcome = Outcome(
        ledger=ledger,
        sampler=sampler,
        statuses=statuses,
        store=await asyncio.to_thread(stored, engine, prefix),
        inbound=await asyncio.to_thread(
            read_topic, settings.kafka_bootstrap_servers, settings.inbound_topic
        ),
        dead_letters=await asyncio.to_thread(
            read_topic, settings.kafka_bootstrap_servers, settings.dlq_topic
        ),
        poison=run.poison,
        never_issued=run.never_issued,
    )
    engine.dispose()
    return Result(outcome, window, recovery_s)


async def _watch_processor(processor: Processor, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(processor.watch)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
