"""Authentication end to end on the embedded profile: keys made by `trade-store keys add`,
`trade-store dev` serving with them, a request followed to SUCCESS by the client that
submitted it and by no other."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from config.clock import business_today
from config.settings import Settings
from tests.conftest import settings_env
from tests.support import free_port, start, stop, wait_for


def add_key(env: dict[str, str], client_id: str, *scopes: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "keys", "add", client_id, "--scopes", *scopes],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip()


def up(client: httpx.Client) -> bool:
    try:
        return client.get("/api/v1/health").status_code == 200
    except httpx.TransportError:
        return False


def decided(client: httpx.Client, location: str, headers: dict[str, str]) -> Any:
    status = client.get(location, headers=headers).json()
    return status if status["status"] != "PENDING" else None


def test_only_the_submitting_client_follows_its_request(tmp_path: Path) -> None:
    settings = Settings(
        profile="embedded",
        data_dir=tmp_path / "data",
        port=free_port(),
        auth="api-key",
        api_keys_file=tmp_path / "api-keys",
    )
    env = settings_env(settings)
    writer = add_key(env, "feed-1", "trades:write,requests:read")
    other = add_key(env, "feed-2", "trades:write", "requests:read")
    auditor = add_key(env, "auditor", "trades:read,requests:read:any")
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    proc = start("dev-auth", ["dev"], env)
    try:
        wait_for(lambda: up(client), 60, "API up")
        assert client.get("/api/v1/health").json() == {"status": "ok"}
        trade = {
            "trade_id": "A1",
            "version": 1,
            "counterparty_id": "CP-1",
            "book_id": "B1",
            "maturity_date": (business_today("UTC") + timedelta(days=30)).isoformat(),
        }
        refused = client.post("/api/v1/trades", json=trade)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="trade-store"'
        accepted = client.post("/api/v1/trades", json=trade, headers={"X-API-Key": writer})
        assert accepted.status_code == 202
        location = accepted.headers["location"]
        as_writer = {"Authorization": f"Bearer {writer}"}
        done = wait_for(lambda: decided(client, location, as_writer), 60, "the request decided")
        assert done["status"] == "SUCCESS"  # the processor's outcome kept who submitted it
        assert client.get(location, headers={"X-API-Key": other}).status_code == 404
        seen = client.get(location, headers={"X-API-Key": auditor})
        assert seen.json()["status"] == "SUCCESS"
        assert client.get("/api/v1/trades/A1", headers=as_writer).status_code == 403
        rows = client.get("/api/v1/trades/A1", headers={"X-API-Key": auditor}).json()
        assert [r["version"] for r in rows] == [1]
        assert client.get("/api/v1/health", headers=as_writer).json()["db"] == "ok"
    finally:
        assert stop(proc, signal.SIGINT) == 0
        client.close()
