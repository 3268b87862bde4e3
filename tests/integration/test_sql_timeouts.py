"""Every PostgreSQL call is bounded: a slow statement, a transaction left idle and a frozen
server all end as Unavailable (which the sinks retry) within their timeout.

The shared PostgreSQL is never frozen: the engine talks to it through a local proxy that can
stop forwarding, which is what a SIGSTOP'd server looks like from the client (the sockets
stay open, the kernel acknowledges, nothing answers).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Connection, text

from adapters.sql import REPLY_GRACE_S, SqlTradeStore, make_engine
from config.settings import Settings
from domain.ports import Unavailable

TIMEOUT_MS = 1000
CONNECT_TIMEOUT_S = 5


class FreezableProxy:
    """Forwards TCP connections to ``target`` until frozen; frozen, it reads and accepts
    nothing, so bytes sit in kernel buffers, acknowledged and unanswered."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        for sock in self._sockets:
            sock.close()

    def _ready(self, sock: socket.socket) -> bool:
        self._flowing.wait()
        ready = bool(select.select([sock], [], [], 0.05)[0])
        return ready and self._flowing.is_set() and not self._closed

    def _accept(self) -> None:
        while not self._closed:
            try:
                if not self._ready(self._listener):
                    continue
                client, _ = self._listener.accept()
            except (OSError, ValueError):  # closed
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed:
                if not self._ready(src):
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # closed under us
            pass
        finally:
            src.close()
            dst.close()


@pytest.fixture
def proxy(service_settings: Settings) -> Iterator[FreezableProxy]:
    url = urlsplit(service_settings.database_url.get_secret_value())
    proxy = FreezableProxy((url.hostname or "127.0.0.1", url.port or 5432))
    yield proxy
    proxy.close()


@pytest.fixture
def store(proxy: FreezableProxy, service_settings: Settings) -> SqlTradeStore:
    url = urlsplit(service_settings.database_url.get_secret_value())
    through = url._replace(netloc=f"{url.netloc.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}")
    store = SqlTradeStore(make_engine(through.geturl(), statement_timeout_ms=TIMEOUT_MS))
    store.ping()
    return store


def unavailable_after(call: Callable[[], object]) -> float:
    """Seconds until ``call`` raised Unavailable."""
    started = time.monotonic()
    with pytest.raises(Unavailable):
        call()
    return time.monotonic() - started


def run(store: SqlTradeStore, sql: str, pause_s: float = 0) -> Callable[[], object]:
    def in_one_transaction(conn: Connection) -> None:
        conn.execute(text("SELECT 1"))
        time.sleep(pause_s)
        conn.execute(text(sql))

    return lambda: store._run(in_one_transaction)


def test_a_statement_beyond_statement_timeout_is_unavailable(store: SqlTradeStore) -> None:
    waited = unavailable_after(run(store, "SELECT pg_sleep(5)"))
    assert TIMEOUT_MS / 1000 <= waited < TIMEOUT_MS / 1000 + 1
    store.ping()  # the connection survives a cancelled statement


def test_a_transaction_left_idle_is_ended_by_the_server(store: SqlTradeStore) -> None:
    """Its row locks are released, and the client sees an outage, not a bug."""
    waited = unavailable_after(run(store, "SELECT 1", pause_s=TIMEOUT_MS / 1000 + 0.5))
    assert waited < TIMEOUT_MS / 1000 + 1.5
    store.ping()


def test_a_frozen_server_is_unavailable_within_the_reply_bound(
    store: SqlTradeStore, proxy: FreezableProxy
) -> None:
    proxy.freeze()
    # The pooled connection's pre-ping gives up after the reply bound; the pool's one
    # reconnect after the connect timeout.
    bound = TIMEOUT_MS / 1000 + REPLY_GRACE_S
    waited = unavailable_after(store.ping)
    assert bound <= waited < bound + CONNECT_TIMEOUT_S + 1.5
    # A new connection to the frozen server: the connect timeout.
    waited = unavailable_after(store.ping)
    assert waited < CONNECT_TIMEOUT_S + 1.5
    proxy.thaw()
    store.ping()


def test_a_server_frozen_mid_statement_is_unavailable_within_the_reply_bound(
    store: SqlTradeStore, proxy: FreezableProxy
) -> None:
    bound = TIMEOUT_MS / 1000 + REPLY_GRACE_S
    threading.Timer(0.3, proxy.freeze).start()
    waited = unavailable_after(run(store, "SELECT pg_sleep(0.5)"))
    assert bound <= waited < bound + 1.5
    proxy.thaw()
    store.ping()


def test_the_urls_own_options_are_kept_beside_the_timeouts(service_settings: Settings) -> None:
    """A search_path (or any option) given in the database URL still applies: the bench
    and any deployment with a schema of its own rely on it."""
    url = service_settings.database_url.get_secret_value() + "?options=-csearch_path%3Dkept"
    engine = make_engine(url, statement_timeout_ms=4321)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW search_path")).scalar() == "kept"
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "4321ms"
    engine.dispose()
