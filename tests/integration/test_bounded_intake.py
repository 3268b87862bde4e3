"""The API's intake with its status store frozen: answered in time, no PENDING left behind.

The status store is the real status store (dynoxide) behind a TCP relay of the test's own that can hold
everything the client sends, as a frozen (SIGSTOP) store would, and then let it through.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlsplit

from adapters import wiring
from adapters.dynamodb import DynamoStatusStore, make_client
from adapters.intake import BoundedIntake, PendingThenQueue
from adapters.kafka import KafkaTradeQueue
from config.settings import Settings
from domain.message import TradeMessage
from domain.ports import Submission, Unavailable
from domain.status import RequestState, RequestStatus
from domain.trade import Trade


class Relay:
    """Forwards TCP to ``target``; while frozen, what clients send waits in the relay."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(self._host, self._port)
        await asyncio.gather(
            self._pump(client_r, server_w, hold=True),
            self._pump(server_r, client_w, hold=False),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: bool
    ) -> None:
        with contextlib.closing(writer):
            while data := await reader.read(65536):
                if hold:
                    await self.thawed.wait()
                writer.write(data)
                await writer.drain()

    def close(self) -> None:
        self._server.close()


def pending_and_message(trade_id: str) -> tuple[RequestStatus, TradeMessage]:
    now = datetime.now(UTC)
    today = date.today()
    rid = str(uuid.uuid4())
    trade = Trade(trade_id, 1, "CP", "B", today + timedelta(days=30), today)
    pending = RequestStatus(rid, RequestState.PENDING, trade_id, 1, now, now)
    return pending, TradeMessage(rid, "corr", today, now, trade)


async def test_a_frozen_status_store_costs_a_bounded_wait_and_leaves_no_pending(
    migrated: Settings,
) -> None:
    requests = 35
    relay = Relay(migrated.dynamodb_endpoint_url or "")
    await relay.start()
    store = DynamoStatusStore(
        make_client(relay.url, migrated.aws_region), migrated.status_table, ttl_days=7
    )
    queue = KafkaTradeQueue(migrated.kafka_bootstrap_servers, migrated.inbound_topic, 5000, 1)
    claims = wiring.key_claims(migrated)
    intake = BoundedIntake(PendingThenQueue(store, queue, claims), "status store", 30, 0.5, 30)
    accepted = [pending_and_message(f"T-frozen-{i}") for i in range(requests)]

    relay.thawed.clear()
    started = time.monotonic()
    results = await asyncio.gather(
        *(intake.accept(Submission([(p, m)])) for p, m in accepted), return_exceptions=True
    )
    took = time.monotonic() - started
    relay.thawed.set()  # the store resumes: the batch it was sent is written now

    overloaded = [r for r in results if type(r).__name__ == "Overloaded"]
    unavailable = [r for r in results if isinstance(r, Unavailable)]
    assert (len(unavailable), len(overloaded)) == (
        30,
        requests - 30,
    )  # 25 sent, 5 queued; 5 over the cap
    assert took < 0.5 + 0.2
    print(f"\n{requests} requests, store frozen: 503 or 429 for all within {took:.3f} s")

    async def left() -> list[str]:  # read off the loop: the relay runs on it
        ids = [p.request_id for p, _ in accepted]
        return await asyncio.to_thread(lambda: [rid for rid in ids if store.get(rid)])

    deadline = time.monotonic() + 10
    while await left() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await left() == []  # neither written later nor left behind
    queue.close()
    store.close()
    relay.close()
