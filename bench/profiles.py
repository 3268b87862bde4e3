"""The two deployment profiles as the harness sees them.

A *stage* is one isolated set of the three stores (queue, trade store, status store) that a
phase of the run owns, created the way a user would (``trade-store migrate``) and dropped at
the end:

* services: its own Kafka topics, its own DynamoDB table, and its own PostgreSQL *schema* in
  the ``trade_store`` database (selected with ``search_path`` in the database URL, so the
  migration, its version-guard trigger and the app all land there);
* embedded: its own data directory (trades.db; inbound.db, which holds the log and the
  request statuses).

Besides the environment for the app's processes, a stage knows how to preload its queue,
seed and read its trade store, read statuses in bulk, and write the *storage ceiling*: the
same rows and statuses straight into the same kind of store, no framework.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.stack import APP_ROOT, ROOT, log

PG_URL = "postgresql+psycopg://trade_store:trade_store@127.0.0.1:55432/trade_store"
KAFKA = "127.0.0.1:9092"
DYNAMO = "http://127.0.0.1:4567"
SERVICES = ["postgres", "kafka", "dynoxide"]
SERVICE_PORTS = {"postgres": 55432, "kafka": 9092, "dynoxide": 4567}
TTL_DAYS = 7


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class TerminalRow:
    """One request's final state, as the ceiling writes it and the check expects it."""

    request_id: str
    trade_id: str
    version: int
    state: str
    reason_code: str | None
    failure_reason: str | None
    created_at: datetime

    def outcome(self, decided_at: datetime) -> Any:
        """The row as the decision log hands an outcome to the status store."""
        from domain.status import Outcome, ReasonCode, RequestState

        return Outcome(
            self.request_id,
            self.trade_id,
            self.version,
            RequestState(self.state),
            ReasonCode(self.reason_code) if self.reason_code else None,
            self.failure_reason,
            self.created_at,
            decided_at=decided_at,
        )


@dataclass
class TradeRow:
    trade_id: str
    version: int
    counterparty_id: str
    book_id: str
    maturity_date: Any
    created_date: Any

    def trade(self) -> Any:
        from domain.trade import Trade

        return Trade(
            self.trade_id,
            self.version,
            self.counterparty_id,
            self.book_id,
            self.maturity_date,
            self.created_date,
        )


class Stage:
    """Common part: environment, migration, SQL access to the trade store."""

    profile = ""

    def __init__(self, run_id: str, label: str, workdir: Path) -> None:
        self.run_id = run_id
        self.label = label
        self.dir = workdir / label
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env: dict[str, str] = {}
        self._engine: Any = None

    # -- environment and settings ------------------------------------------------------
    def base_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_STORE_")}
        env.setdefault("AWS_ACCESS_KEY_ID", "local")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        env.update(
            {
                "TRADE_STORE_PROFILE": self.profile,
                "TRADE_STORE_DATA_DIR": str(self.dir / "data"),
                "TRADE_STORE_RECOVERY_DIR": str(self.dir / "recovery"),
                "TRADE_STORE_LOG_FORMAT": "json",
                # The load comes from one address at thousands/s: no per-client quotas.
                "TRADE_STORE_QUOTA_WRITES_PER_SECOND": "0",
                "TRADE_STORE_QUOTA_READS_PER_SECOND": "0",
                "PYTHONUNBUFFERED": "1",
                **extra,
            }
        )
        return env

    def settings(self) -> Any:
        from config.settings import Settings

        fields = {
            k.removeprefix("TRADE_STORE_").lower(): v
            for k, v in self.env.items()
            if k.startswith("TRADE_STORE_")
        }
        known = set(Settings.model_fields)
        return Settings(**{k: v for k, v in fields.items() if k in known})

    def migrate(self) -> None:
        """``trade-store migrate``, the way a user prepares the stores."""
        out = subprocess.run(
            [sys.executable, "-m", "cli.main", "migrate"],
            cwd=APP_ROOT[0],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"trade-store migrate failed:\n{out.stdout}\n{out.stderr}")
        from adapters import wiring

        wiring.create_topics(self.settings())

    def prepare(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    # -- the trade store over SQLAlchemy (both profiles) ---------------------------------
    def sql_url(self) -> str:
        raise NotImplementedError

    def engine(self) -> Any:
        if self._engine is None:
            from sqlalchemy import create_engine

            self._engine = create_engine(self.sql_url(), pool_size=2)
        return self._engine

    def scalar(self, sql: str, **params: Any) -> Any:
        from sqlalchemy import text

        with self.engine().connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        from sqlalchemy import bindparam, text

        stmt = text(sql)
        for name, value in params.items():
            if isinstance(value, list | tuple):
                stmt = stmt.bindparams(bindparam(name, expanding=True))
        with self.engine().connect() as conn:
            return list(conn.execute(stmt, params))

    def seed(self, rows: Sequence[TradeRow]) -> None:
        """Trades that exist before the run (the app's own table definition, plain inserts)."""
        from sqlalchemy import insert

        from adapters.tables import trades

        # One transaction per chunk: the PostgreSQL guard trigger takes an advisory lock per
        # row, held to commit, and the lock table is finite (max_locks_per_transaction).
        for chunk in _chunks(rows, 1000):
            with self.engine().begin() as conn:
                conn.execute(
                    insert(trades),
                    [
                        {
                            "trade_id": r.trade_id,
                            "version": r.version,
                            "counterparty_id": r.counterparty_id,
                            "book_id": r.book_id,
                            "maturity_date": r.maturity_date,
                            "created_date": r.created_date,
                            "expired": False,
                        }
                        for r in chunk
                    ],
                )

    def decided(self) -> int:
        return int(self.scalar("SELECT count(*) FROM request_outcomes"))

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    # -- profile specifics -------------------------------------------------------------
    def preload(self, messages: Sequence[Any], progress: Callable[[int], None]) -> None:
        raise NotImplementedError

    def statuses(self, request_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """request_id → (status, updated_at) for those that exist."""
        raise NotImplementedError

    def ceiling(
        self, batches: Sequence[tuple[Sequence[TradeRow], Sequence[TerminalRow]]]
    ) -> dict[str, Any]:
        raise NotImplementedError


# =====================================================================================
# services: Kafka + PostgreSQL + DynamoDB (dynoxide locally)
# =====================================================================================


def dynamo_client() -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "dynamodb",
        endpoint_url=DYNAMO,
        region_name="us-east-1",
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
        config=Config(max_pool_connections=16, retries={"mode": "standard", "max_attempts": 5}),
    )


class ServicesStage(Stage):
    profile = "services"

    def __init__(self, run_id: str, label: str, workdir: Path) -> None:
        super().__init__(run_id, label, workdir)
        self.schema = f"bench_{run_id}_{label}".replace("-", "_")
        self.topic = f"bench-{run_id}-{label}-inbound"
        self.dlq = f"bench-{run_id}-{label}-dlq"
        self.table = f"bench-{run_id}-{label}-requests"
        self.url = f"{PG_URL}?options=-csearch_path%3D{self.schema}"
        self.env = self.base_env(
            {
                "TRADE_STORE_DATABASE_URL": self.url,
                "TRADE_STORE_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
                "TRADE_STORE_INBOUND_TOPIC": self.topic,
                "TRADE_STORE_DLQ_TOPIC": self.dlq,
                "TRADE_STORE_DYNAMODB_ENDPOINT_URL": DYNAMO,
                "TRADE_STORE_STATUS_TABLE": self.table,
            }
        )
        self._dynamo: Any = None
        self.prepared = False

    def sql_url(self) -> str:
        return self.url

    def pg(self) -> Any:
        import psycopg

        return psycopg.connect(
            "postgresql://trade_store:trade_store@127.0.0.1:55432/trade_store",
            options=f"-csearch_path={self.schema}",
        )

    def dynamo(self) -> Any:
        if self._dynamo is None:
            self._dynamo = dynamo_client()
        return self._dynamo

    def prepare(self) -> None:
        with self.pg() as conn:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        self.prepared = True
        self.migrate()

    def cleanup(self) -> None:
        self.dispose()
        if not self.prepared:
            return
        try:
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": KAFKA})
            for fut in admin.delete_topics([self.topic, self.dlq], request_timeout=15).values():
                with contextlib.suppress(Exception):  # a topic that was never created
                    fut.result(timeout=20)
        except Exception as exc:
            log(f"cleanup: topics of {self.label}: {exc}")
        try:
            self.dynamo().delete_table(TableName=self.table)
        except Exception as exc:
            if "ResourceNotFound" not in str(exc):
                log(f"cleanup: table {self.table}: {exc}")
        try:
            with self.pg() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        except Exception as exc:
            log(f"cleanup: schema {self.schema}: {exc}")
        shutil.rmtree(self.dir, ignore_errors=True)

    def preload(self, messages: Sequence[Any], progress: Callable[[int], None]) -> None:
        """A raw acks=all idempotent producer, keyed and headed like the API's, but with no
        queue deadline: nobody waits on a preloaded record (like a backfill), so the
        dataflow never refuses one as late however long the preload takes."""
        from confluent_kafka import Producer

        from adapters.kafka import headers_of
        from domain.message import encode

        producer = Producer(
            {
                "bootstrap.servers": KAFKA,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 20,
                "batch.num.messages": 10000,
                "queue.buffering.max.messages": 500000,
                "compression.type": "lz4",
            }
        )
        failed: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failed.append(str(err))

        for i, message in enumerate(messages, 1):
            while True:
                try:
                    producer.produce(
                        self.topic,
                        key=message.trade.trade_id.encode(),
                        value=encode(message),
                        headers=headers_of(message, None),
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 20000 == 0:
                producer.poll(0)
                progress(i)
        if producer.flush(60) != 0 or failed:
            raise RuntimeError(f"preload: {len(failed)} messages not acknowledged {failed[:3]}")
        if len(messages) % 20000:
            progress(len(messages))

    def statuses(self, request_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        client = self.dynamo()

        def get(chunk: Sequence[str]) -> dict[str, tuple[str, str]]:
            found: dict[str, tuple[str, str]] = {}
            keys: list[dict[str, Any]] = [{"request_id": {"S": rid}} for rid in chunk]
            while keys:
                reply = client.batch_get_item(
                    RequestItems={
                        self.table: {
                            "Keys": keys,
                            "ConsistentRead": True,
                            "ProjectionExpression": "request_id, #s, updated_at",
                            "ExpressionAttributeNames": {"#s": "status"},
                        }
                    }
                )
                for item in reply["Responses"].get(self.table, []):
                    found[item["request_id"]["S"]] = (
                        item["status"]["S"],
                        item["updated_at"]["S"],
                    )
                keys = reply.get("UnprocessedKeys", {}).get(self.table, {}).get("Keys", [])
            return found

        out: dict[str, tuple[str, str]] = {}
        with ThreadPoolExecutor(4) as pool:
            for part in pool.map(get, list(_chunks(request_ids, 100))):
                out.update(part)
        return out

    def ceiling(
        self, batches: Sequence[tuple[Sequence[TradeRow], Sequence[TerminalRow]]]
    ) -> dict[str, Any]:
        """Per batch, the app's own statements without the framework: the trades' upsert
        (the guard trigger fires) and the decision log's insert, one commit; then the
        batch's statuses in one call of the app's status store (``write_outcomes``: the
        consistent reads of which are terminal, BatchGetItem of 100, then BatchWriteItem of
        25, on its own 8 threads), overlapping the next batch's commit as the sink does."""
        from adapters.dynamodb import DynamoStatusStore
        from adapters.sql import POSTGRES
        from config.clock import utc_now

        store = DynamoStatusStore(self.dynamo(), self.table, TTL_DAYS)
        pg_time = 0.0
        status_time: list[float] = []

        def write_statuses(outcomes: Sequence[Any]) -> None:
            t0 = time.perf_counter()
            store.write_outcomes(outcomes)
            status_time.append(time.perf_counter() - t0)

        pending: list[Future[None]] = []
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            for trade_rows, terminal in batches:
                t0 = time.perf_counter()
                now = utc_now()
                trades = [r.trade() for r in trade_rows]
                logged = [t.outcome(now) for t in terminal]  # stamped by the decision log
                with self.engine().begin() as conn:
                    POSTGRES.upsert(conn, trades, now)
                    POSTGRES.log(conn, logged)
                pg_time += time.perf_counter() - t0
                # Statuses only after the rows are committed, as the app must.
                pending.append(pool.submit(write_statuses, logged))
            for fut in pending:
                fut.result()
        wall = time.perf_counter() - started
        store.close()
        return {
            "method": "PostgreSQL: the app's upsert and decision-log insert per batch (unnest"
            " arrays, guard trigger on); DynamoDB: the app's DynamoStatusStore.write_outcomes"
            " per batch (BatchGetItem of 100, BatchWriteItem of 25, 8 threads), overlapped",
            "wall_s": wall,
            "trade_store_busy_s": round(pg_time, 3),
            "status_store_busy_s": round(sum(status_time), 3),
        }


# =====================================================================================
# embedded: SQLite files under a data directory
# =====================================================================================


class EmbeddedStage(Stage):
    profile = "embedded"

    def __init__(self, run_id: str, label: str, workdir: Path) -> None:
        super().__init__(run_id, label, workdir)
        self.data = self.dir / "data"
        self.env = self.base_env({})

    def sql_url(self) -> str:
        return f"sqlite:///{self.data / 'trades.db'}"

    def prepare(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        self.migrate()

    def cleanup(self) -> None:
        self.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)

    def preload(self, messages: Sequence[Any], progress: Callable[[int], None]) -> None:
        """The inbound log's own bulk append (adapters.inbound_log.SqliteInboundLog.append_many)."""
        from adapters import wiring

        inbound = wiring.inbound_log(self.settings())
        done = 0
        for chunk in _chunks(messages, 20000):
            done += inbound.append_many(chunk)
            progress(done)

    def statuses(self, request_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        from adapters.sqlite_file import connect

        conn = connect(self.data / "inbound.db")
        out: dict[str, tuple[str, str]] = {}
        try:
            for chunk in _chunks(request_ids, 500):
                marks = ",".join("?" * len(chunk))
                for rid, status, updated in conn.execute(
                    "SELECT request_id, status, updated_at FROM request_status"  # noqa: S608
                    f" WHERE request_id IN ({marks})",
                    list(chunk),
                ):
                    out[rid] = (status, updated)
        finally:
            conn.close()
        return out

    def ceiling(
        self, batches: Sequence[tuple[Sequence[TradeRow], Sequence[TerminalRow]]]
    ) -> dict[str, Any]:
        """The sink's own writes, without its reads and decisions: per batch, one
        transaction of the app's SQLite trade upsert and decision-log insert
        (``adapters.sql.SQLITE``; guard trigger on) on the app's engine; then the batch's
        outcomes through the status store's own ``complete`` into inbound.db, on a second
        thread (another file, so it overlaps). The rows become domain values before the
        clock starts, stamped as logged then."""
        from adapters.sql import SQLITE, make_engine
        from adapters.sqlite_status import SqliteStatusStore
        from config.clock import utc_now

        logged_at = utc_now()
        work = [
            ([r.trade() for r in trade_rows], [t.outcome(logged_at) for t in terminal])
            for trade_rows, terminal in batches
        ]
        engine = make_engine(self.sql_url(), pool_size=1)
        statuses = SqliteStatusStore(self.data / "inbound.db", TTL_DAYS)
        trade_time = 0.0
        status_time: list[float] = []

        def write_statuses(outcomes: Sequence[Any]) -> None:
            t0 = time.perf_counter()
            statuses.write_outcomes(outcomes)
            status_time.append(time.perf_counter() - t0)

        started = time.perf_counter()
        pending: list[Future[None]] = []
        with ThreadPoolExecutor(1) as pool:
            for trades, outcomes in work:
                t0 = time.perf_counter()
                with engine.begin() as conn:
                    SQLITE.upsert(conn, trades, utc_now())
                    SQLITE.log(conn, outcomes)
                trade_time += time.perf_counter() - t0
                pending.append(pool.submit(write_statuses, outcomes))
            for fut in pending:
                fut.result()
        wall = time.perf_counter() - started
        engine.dispose()
        return {
            "method": "SQLite: the app's trade upsert and decision-log insert"
            " (adapters.sql.SQLITE; guard trigger on, WAL, synchronous=FULL) per batch in one"
            " transaction; statuses through SqliteStatusStore.write_outcomes on a 2nd thread",
            "wall_s": wall,
            "trade_store_busy_s": round(trade_time, 3),
            "status_store_busy_s": round(sum(status_time), 3),
        }


def new_stage(profile: str, run_id: str, label: str, workdir: Path) -> Stage:
    cls = ServicesStage if profile == "services" else EmbeddedStage
    return cls(run_id, label, workdir)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def services_up() -> list[str]:
    """Start the services the services profile needs; return those that were down."""
    script = ROOT / "scripts" / "services"

    def is_down(name: str) -> bool:
        # A service that answers on its port is up, even when another checkout started it
        # (the status script only knows the pid files of its own checkout).
        if _listening(SERVICE_PORTS[name]):
            return False
        return (
            subprocess.run(  # noqa: S603
                [str(script), "status", name], capture_output=True, check=False
            ).returncode
            != 0
        )

    # Only what is down twice, a second apart, counts as ours to start (and to stop at the
    # end): a busy service that misses one status probe must not be stopped by this run.
    down = [name for name in SERVICES if is_down(name)]
    if down:
        time.sleep(1.0)
        down = [name for name in down if is_down(name)]
    if down:
        log(f"starting services: {' '.join(down)} (scripts/services up)")
        subprocess.run(  # noqa: S603
            [str(script), "up", *down], check=True, stdout=subprocess.DEVNULL
        )
    return down


def services_down(names: list[str]) -> None:
    if names:
        log(f"stopping the services this run started: {' '.join(names)}")
        subprocess.run(  # noqa: S603
            [str(ROOT / "scripts" / "services"), "down", *names],
            check=False,
            stdout=subprocess.DEVNULL,
        )
