"""Open-model HTTP/1.1 load generator (our own, stdlib + uvloop + orjson).

Why our own: the harness must install everything it uses on a fresh machine within the
``--quick`` budget (3 minutes), and no constant-throughput tool ships as a Python wheel
(wrk2 is not packaged; ``oha`` is a multi-minute cargo build on 2 cores). It must also do
what those tools do not: follow a sample of acknowledged requests to their terminal status.

How it keeps its rate (the wrk2 model, no coordinated omission):

* request ``i`` has a fixed intended send time ``t0 + i / rate``, decided before the run;
* a scheduler dispatches every due request onto an idle keep-alive connection, or queues it
  when all connections are busy (it is sent the moment one frees up);
* latency is ``response received - intended send time``, so time spent queued behind a slow
  server counts against the server, as it would for a real client at that arrival rate;
* the generator measures its own lateness (``send_lag``: intended → written while a
  connection was free) and the achieved send rate, and reports both next to the intended
  rate, so a generator that cannot keep up is visible in the result instead of hiding as
  a good latency.

The rate may be split across several processes (``procs``); each takes every ``procs``-th
slot of the same global schedule from a shared monotonic start time.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import orjson

TERMINAL = (b'"status":"SUCCESS"', b'"status":"FAILED"')


@dataclass
class LoadSpec:
    """One constant-rate run against one endpoint."""

    port: int
    rate: float
    duration: float
    connections: int = 64
    host: str = "127.0.0.1"
    tag: str = "bench"
    e2e_every: int = 0  # follow every n-th acknowledged request to its terminal status
    e2e_timeout: float = 30.0
    drain_timeout: float = 5.0
    abort_backlog_s: float = 1.0  # give up once this many seconds of arrivals are queued
    procs: int = 1
    progress: bool = True
    label: str = ""
    batch: int = 0  # POST batches of this many trades to /api/v1/trades/batch instead


@dataclass
class LoadResult:
    """Everything measured by one run (merged across generator processes)."""

    intended: int = 0
    sent: int = 0
    completed: int = 0
    errors: int = 0  # transport errors and requests still unanswered at the end
    unsent: int = 0  # arrivals never sent (the run was aborted as overloaded)
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    send_lag_ms: array[float] = field(default_factory=lambda: array("d"))
    first_send: float = 0.0
    last_send: float = 0.0
    last_done: float = 0.0
    start: float = 0.0
    e2e_ms: array[float] = field(default_factory=lambda: array("d"))
    e2e_states: dict[str, int] = field(default_factory=dict)
    e2e_timeouts: int = 0
    e2e_polls: int = 0
    gen_cpu_s: float = 0.0
    aborted: str | None = None

    @property
    def non_202(self) -> int:
        return sum(n for code, n in self.statuses.items() if code != 202)

    def merge(self, other: LoadResult) -> None:
        self.intended += other.intended
        self.sent += other.sent
        self.completed += other.completed
        self.errors += other.errors
        self.unsent += other.unsent
        for code, n in other.statuses.items():
            self.statuses[code] = self.statuses.get(code, 0) + n
        self.latencies_ms.extend(other.latencies_ms)
        self.send_lag_ms.extend(other.send_lag_ms)
        self.first_send = (
            min(x for x in (self.first_send, other.first_send) if x)
            if (self.first_send or other.first_send)
            else 0.0
        )
        self.last_send = max(self.last_send, other.last_send)
        self.last_done = max(self.last_done, other.last_done)
        self.start = self.start or other.start
        self.e2e_ms.extend(other.e2e_ms)
        for state, n in other.e2e_states.items():
            self.e2e_states[state] = self.e2e_states.get(state, 0) + n
        self.e2e_timeouts += other.e2e_timeouts
        self.e2e_polls += other.e2e_polls
        self.gen_cpu_s += other.gen_cpu_s
        self.aborted = self.aborted or other.aborted


def percentile(values: array[float] | list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None when there are no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n*q/100), at least 1
    return ordered[int(min(rank, len(ordered))) - 1]


def trade_body(tag: str, n: int, maturity: str) -> bytes:
    """A valid POST body; the phase's tag (e.g. "api-500/s") made fit for an id, which may
    not hold "/"."""
    tag = tag.replace("/", "-per-")
    return (
        b'{"trade_id":"%s-%d","version":1,"counterparty_id":"CP-%d","book_id":"B-%d",'
        b'"maturity_date":"%s"}' % (tag.encode(), n, n % 97, n % 13, maturity.encode())
    )


def batch_body(tag: str, n: int, size: int, maturity: str) -> bytes:
    """A valid batch body: ``size`` trades numbered from ``n * size`` (unique ids)."""
    first = n * size
    items = b",".join(trade_body(tag, first + i, maturity) for i in range(size))
    return b'{"trades":[' + items + b"]}"


def last_request_id(body: bytes) -> str:
    """The request id to follow of a single POST's or a batch's 202: a batch's last item."""
    reply = orjson.loads(body)
    return str(reply["results"][-1]["request_id"] if "results" in reply else reply["request_id"])


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, owner: _Generator | _Poller) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.current: Any = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else None].strip())
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(head[9:12])
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            self.owner.on_response(self, status, body, b"\r\nconnection: close" in head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.owner.on_lost(self)

    def send(self, payload: bytes, current: Any) -> None:
        self.current = current
        assert self.transport is not None
        self.transport.write(payload)


class _Poller:
    """Follows sampled requests to their terminal status over a few keep-alive connections."""

    def __init__(self, gen: _Generator, connections: int = 8) -> None:
        self.gen = gen
        self.size = connections
        self.idle: deque[_Conn] = deque()
        self.waiting: deque[asyncio.Future[_Conn]] = deque()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for _ in range(self.size):
            await self._open()

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Conn(self), self.gen.spec.host, self.gen.spec.port
        )
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.idle.append(conn)

    async def _acquire(self) -> _Conn:
        if self.idle:
            return self.idle.popleft()
        fut: asyncio.Future[_Conn] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return await fut

    def on_response(self, conn: _Conn, status: int, body: bytes, close: bool) -> None:
        fut = conn.current
        conn.current = None
        if not fut.done():
            fut.set_result((status, body))
        if close:
            assert conn.transport is not None
            conn.transport.close()
        else:
            self._release(conn)

    def on_lost(self, conn: _Conn) -> None:
        fut = conn.current
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("poll connection lost"))
        if conn in self.idle:
            self.idle.remove(conn)
        if not self.gen.stopping:
            task = asyncio.get_running_loop().create_task(self._open())
            self.tasks.add(task)  # type: ignore[arg-type]
            task.add_done_callback(self.tasks.discard)  # type: ignore[arg-type]

    async def _get(self, path: bytes) -> tuple[int, bytes]:
        conn = await self._acquire()
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        conn.send(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path, fut)
        return await fut

    def follow(self, request_id: str, intended: float, acked: float) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(request_id, intended, acked))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _follow(self, request_id: str, intended: float, acked: float) -> None:
        res = self.gen.result
        path = b"/api/v1/requests/" + request_id.encode()
        deadline = acked + self.gen.spec.e2e_timeout
        await asyncio.sleep(0.005)
        while True:
            try:
                status, body = await self._get(path)
            except ConnectionError:
                status, body = 0, b""
            res.e2e_polls += 1
            now = time.monotonic()
            if status == 200 and any(t in body for t in TERMINAL):
                res.e2e_ms.append((now - intended) * 1000)
                state = orjson.loads(body).get("status", "?")
                res.e2e_states[state] = res.e2e_states.get(state, 0) + 1
                return
            if now > deadline:
                res.e2e_timeouts += 1
                return
            since = now - acked
            await asyncio.sleep(0.01 if since < 0.5 else 0.05 if since < 3 else 0.25)


class _Generator:
    """The open-model scheduler for one process's share of the arrivals."""

    def __init__(self, spec: LoadSpec, index: int, start_at: float) -> None:
        self.spec = spec
        self.index = index
        self.start_at = start_at
        self.result = LoadResult()
        self.idle: deque[_Conn] = deque()
        self.backlog: deque[tuple[int, float]] = deque()
        self.inflight = 0
        self.stopping = False
        self.poller = _Poller(self) if spec.e2e_every else None
        self.maturity = (date.today() + timedelta(days=365)).isoformat()
        path = b"/api/v1/trades/batch" if spec.batch else b"/api/v1/trades"
        self.head = (
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            % (
                path,
                spec.host.encode(),
                spec.port,
            )
            + b"Content-Length: "
        )
        self.reconnects: set[asyncio.Task[None]] = set()

    # -- connections ---------------------------------------------------------------
    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), self.spec.host, self.spec.port)
        self._ready(conn)

    def _ready(self, conn: _Conn) -> None:
        if self.backlog:
            self._send(conn, *self.backlog.popleft(), queued=True)
        else:
            self.idle.append(conn)

    def on_lost(self, conn: _Conn) -> None:
        if conn.current is not None:
            conn.current = None
            self.inflight -= 1
            self.result.errors += 1
        if conn in self.idle:
            self.idle.remove(conn)
        if not self.stopping:
            task = asyncio.get_running_loop().create_task(self._reopen())
            self.reconnects.add(task)
            task.add_done_callback(self.reconnects.discard)

    async def _reopen(self) -> None:
        for _ in range(50):
            try:
                await self._open()
                return
            except OSError:
                await asyncio.sleep(0.1)

    # -- requests ------------------------------------------------------------------
    def _payload(self, n: int) -> bytes:
        spec = self.spec
        body = (
            batch_body(spec.tag, n, spec.batch, self.maturity)
            if spec.batch
            else trade_body(spec.tag, n, self.maturity)
        )
        return self.head + b"%d\r\n\r\n" % len(body) + body

    def _send(self, conn: _Conn, n: int, intended: float, queued: bool = False) -> None:
        now = time.monotonic()
        if not queued:
            self.result.send_lag_ms.append((now - intended) * 1000)
        if not self.result.first_send:
            self.result.first_send = now
        self.result.last_send = now
        self.result.sent += 1
        self.inflight += 1
        conn.send(self._payload(n), (n, intended))

    def on_response(self, conn: _Conn, status: int, body: bytes, close: bool) -> None:
        now = time.monotonic()
        n, intended = conn.current
        conn.current = None
        self.inflight -= 1
        res = self.result
        res.completed += 1
        res.last_done = now
        res.statuses[status] = res.statuses.get(status, 0) + 1
        res.latencies_ms.append((now - intended) * 1000)
        if self.poller is not None and status == 202 and n % self.spec.e2e_every == 0:
            self.poller.follow(last_request_id(body), intended, now)
        if close:
            assert conn.transport is not None
            conn.transport.close()  # on_lost reopens it
        else:
            self._ready(conn)

    def _dispatch(self, n: int, intended: float) -> None:
        if self.idle:
            # FIFO: every connection takes its turn (round robin, like wrk2), so requests
            # spread over all server workers even at low rates; LIFO would keep reusing the
            # few most recently freed connections, all possibly on one worker.
            self._send(self.idle.popleft(), n, intended)
        else:
            self.backlog.append((n, intended))

    # -- the run -------------------------------------------------------------------
    async def run(self) -> LoadResult:
        spec = self.spec
        per_conn_procs = max(1, spec.connections // spec.procs)
        for _ in range(per_conn_procs):
            await self._open()
            # A pause after each connect: every server worker is idle again and races for
            # the next accept, so keep-alive connections spread over all workers (a burst
            # would mostly land on whichever worker woke first).
            await asyncio.sleep(0.002)
        if self.poller is not None:
            await self.poller.start()
        cpu0 = _cpu()
        total = int(spec.rate * spec.duration)
        mine = range(self.index, total, spec.procs)
        self.result.intended = len(mine)
        self.result.start = self.start_at
        reporter = (
            asyncio.get_running_loop().create_task(self._report())
            if (spec.progress and self.index == 0)
            else None
        )
        await asyncio.sleep(max(0.0, self.start_at - time.monotonic()))
        rate = spec.rate
        t0 = self.start_at
        k = 0  # position in `mine`
        count = len(mine)
        max_backlog = max(50, int(rate * spec.abort_backlog_s / spec.procs))
        while k < count:
            now = time.monotonic()
            due_global = int((now - t0) * rate)  # slots with intended time <= now
            while k < count and mine[k] <= due_global:
                n = mine[k]
                self._dispatch(n, t0 + n / rate)
                k += 1
            if len(self.backlog) > max_backlog:
                self.result.aborted = (
                    f"overloaded: arrivals queued beyond {spec.abort_backlog_s:.1f}s"
                )
                self.result.unsent += count - k + len(self.backlog)
                self.backlog.clear()
                break
            if k < count:
                # Event-loop timers have 1 ms resolution: a shorter sleep would spin. Each
                # wake-up dispatches every arrival that fell due, stamped with its own
                # intended time, so this granularity shows up as send lag, not as a
                # lower rate.
                nxt = t0 + mine[k] / rate
                await asyncio.sleep(max(0.001, nxt - time.monotonic()))
        deadline = time.monotonic() + spec.drain_timeout
        while (self.inflight or self.backlog) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.result.errors += self.inflight
        self.result.unsent += len(self.backlog)
        self.backlog.clear()
        if self.poller is not None:
            end = time.monotonic() + spec.e2e_timeout + 1
            while self.poller.tasks and time.monotonic() < end:
                await asyncio.sleep(0.05)
            for task in list(self.poller.tasks):
                task.cancel()
        self.stopping = True
        if reporter is not None:
            reporter.cancel()
        self.result.gen_cpu_s = _cpu() - cpu0
        return self.result

    async def _report(self) -> None:
        label = self.spec.label or "load"
        while True:
            await asyncio.sleep(1.0)
            res = self.result
            el = time.monotonic() - self.start_at
            if el <= 0:
                continue
            ex = ""
            if self.poller is not None:
                ex = f" e2e={len(res.e2e_ms)} following={len(self.poller.tasks)}"
            print(
                f"    [{label}] t={el:5.1f}s sent={res.sent * self.spec.procs:,}"
                f" done={res.completed * self.spec.procs:,} inflight={self.inflight}"
                f" queued={len(self.backlog)} non202={res.non_202}{ex}",
                file=sys.stderr,
                flush=True,
            )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(spec: LoadSpec, index: int, start_at: float, conn: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        pass
    try:
        result = asyncio.run(_Generator(spec, index, start_at).run())
        payload: dict[str, Any] = {
            k: (v.tobytes() if isinstance(v, array) else v) for k, v in result.__dict__.items()
        }
        conn.send(payload)
    except BaseException as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        conn.close()


def run_load(spec: LoadSpec) -> LoadResult:
    """Run ``spec`` in ``spec.procs`` generator processes and merge their results."""
    ctx = mp.get_context("spawn")
    start_at = time.monotonic() + 1.0 + 0.3 * spec.procs + spec.connections / 400
    procs = []
    for index in range(spec.procs):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(spec, index, start_at, child), daemon=True)
        proc.start()
        child.close()
        procs.append((proc, parent))
    merged = LoadResult()
    errors = []
    hard_deadline = start_at + spec.duration + spec.drain_timeout + spec.e2e_timeout + 60
    for proc, parent in procs:
        try:
            ready = parent.poll(max(1.0, hard_deadline - time.monotonic()))
            payload = parent.recv() if ready else None
        except EOFError:
            payload = {"error": f"generator process exited with code {proc.exitcode}"}
        if payload is None:
            payload = {"error": "generator process did not report in time"}
        proc.join(5)
        if proc.is_alive():
            proc.kill()
        if "error" in payload:
            errors.append(payload["error"])
            continue
        part = LoadResult()
        for key, value in payload.items():
            if isinstance(getattr(part, key), array):
                arr = array("d")
                arr.frombytes(value)
                setattr(part, key, arr)
            else:
                setattr(part, key, value)
        merged.merge(part)
    if errors:
        raise RuntimeError("load generator failed: " + "; ".join(errors))
    return merged


def summarize(spec: LoadSpec, res: LoadResult) -> dict[str, Any]:
    """The numbers a phase reports, in milliseconds and requests per second."""
    # responses that came in after the schedule ended stretch the span they count over
    span = max(spec.duration, (res.last_done - res.start) if res.last_done else 0.0)
    sent_span = (res.last_send - res.first_send) if res.sent > 1 else 0.0

    def r(x: float | None, nd: int = 2) -> float | None:
        return None if x is None else round(x, nd)

    lat = res.latencies_ms
    return {
        "intended_rps": spec.rate,
        "duration_s": spec.duration,
        "connections": spec.connections,
        "generator_procs": spec.procs,
        "requests_intended": res.intended,
        "requests_sent": res.sent,
        "requests_completed": res.completed,
        "sent_rps": r(res.sent / sent_span if sent_span else None, 1),
        "achieved_rps": r(res.statuses.get(202, 0) / span if span else None, 1),
        "status_counts": {str(k): v for k, v in sorted(res.statuses.items())},
        "non_202": res.non_202,
        "errors": res.errors,
        "unsent": res.unsent,
        "aborted": res.aborted,
        "ack_p50_ms": r(percentile(lat, 50)),
        "ack_p95_ms": r(percentile(lat, 95)),
        "ack_p99_ms": r(percentile(lat, 99)),
        "ack_max_ms": r(max(lat) if lat else None),
        "gen_send_lag_p50_ms": r(percentile(res.send_lag_ms, 50), 3),
        "gen_send_lag_p99_ms": r(percentile(res.send_lag_ms, 99), 3),
        "gen_queued_sends": res.sent - len(res.send_lag_ms),
        "gen_cpu_us_per_req": r(res.gen_cpu_s * 1e6 / res.sent if res.sent else None, 1),
        **(
            {
                "e2e_samples": len(res.e2e_ms),
                "e2e_states": res.e2e_states,
                "e2e_timeouts": res.e2e_timeouts,
                "e2e_polls": res.e2e_polls,
                "e2e_p50_ms": r(percentile(res.e2e_ms, 50)),
                "e2e_p95_ms": r(percentile(res.e2e_ms, 95)),
                "e2e_p99_ms": r(percentile(res.e2e_ms, 99)),
                "e2e_max_ms": r(max(res.e2e_ms) if res.e2e_ms else None),
            }
            if spec.e2e_every
            else {}
        ),
    }


def kept_rate(summary: dict[str, Any], tolerance: float = 0.03) -> bool:
    """Did the generator send at the intended rate (within ``tolerance``)?"""
    sent = summary.get("sent_rps") or 0.0
    return bool(sent >= summary["intended_rps"] * (1 - tolerance))
