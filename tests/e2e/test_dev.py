"""`trade-store dev` (what scripts/run calls): one command, clean stop, data kept across runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx

from config.clock import business_today
from config.settings import Settings
from tests.conftest import settings_env
from tests.support import LOGS, free_port, start, stop, wait_for


def healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/api/v1/health").status_code == 200
    except httpx.TransportError:
        return False


def test_restart_keeps_trades_and_statuses(tmp_path: Path) -> None:
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", port=free_port())
    env = settings_env(settings)
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    maturity = (business_today("UTC") + timedelta(days=30)).isoformat()

    first = start("dev-first", ["dev"], env)
    wait_for(lambda: healthy(client), 60, "first start healthy")
    locations = []
    for version in (1, 2, 1):
        reply = client.post(
            "/api/v1/trades",
            json={
                "trade_id": "R1",
                "version": version,
                "counterparty_id": "C",
                "book_id": "B",
                "maturity_date": maturity,
            },
        )
        assert reply.status_code == 202
        locations.append(reply.headers["location"])
    before = wait_for(
        lambda: (
            [client.get(loc).json() for loc in locations]
            if all(client.get(loc).json()["status"] != "PENDING" for loc in locations)
            else None
        ),
        60,
        "all terminal",
    )
    assert [s["status"] for s in before] == ["SUCCESS", "SUCCESS", "FAILED"]
    assert stop(first, signal.SIGINT) == 0  # Ctrl-C

    second = start("dev-second", ["dev"], env)
    try:
        wait_for(lambda: healthy(client), 60, "second start healthy")
        assert [client.get(loc).json() for loc in locations] == before
        assert [r["version"] for r in client.get("/api/v1/trades/R1").json()] == [1, 2]
    finally:
        assert stop(second, signal.SIGTERM) == 0
        client.close()


MIGRATED = "trade store (embedded): migrated to head"


def migrations_until_ready(name: str, command: str, tmp_path: Path, ready: str) -> int:
    """Start embedded ``command`` until the API answers and ``ready`` is logged, then stop
    it; how many times it (and its children, whose output is its own) migrated."""
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", port=free_port())
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    log = LOGS / f"{name}.log"
    log.unlink(missing_ok=True)
    proc = start(name, [command], settings_env(settings))
    try:
        wait_for(lambda: healthy(client), 60, "API healthy")
        wait_for(lambda: ready in log.read_text(), 60, ready)
    finally:
        stop(proc)
        client.close()
    return log.read_text().count(MIGRATED)


def test_dev_migrates_once_for_both_children(tmp_path: Path) -> None:
    """dev migrates, then starts the API and the processor on it: they do not migrate again."""
    assert migrations_until_ready("dev-migrates-once", "dev", tmp_path, "processor started") == 1


def test_a_child_started_alone_still_migrates(tmp_path: Path) -> None:
    """Without dev, embedded serve migrates its files itself (process runs the same code)."""
    assert migrations_until_ready("serve-alone", "serve", tmp_path, MIGRATED) == 1


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = Settings(profile="embedded", data_dir=tmp_path / "data", port=port)
        result = subprocess.run(
            [sys.executable, "-m", "cli.main", "dev"],
            check=False,
            env=settings_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in result.stderr


def test_ctrl_c_stops_both_children_without_a_traceback(tmp_path: Path) -> None:
    """A terminal's Ctrl-C signals its whole foreground process group: dev alone gets it
    and stops each child with one SIGTERM (the processor takes a second as an interrupt,
    uvicorn's workers a SIGINT of their own as a KeyboardInterrupt)."""
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", port=free_port())
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    log = LOGS / "dev-ctrl-c.log"
    log.unlink(missing_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "dev"],
            env=settings_env(settings),
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own group, as a shell's foreground job
        )
    try:
        wait_for(lambda: healthy(client), 60, "API healthy")
        wait_for(lambda: "processor started" in log.read_text(), 60, "processor started")
        os.killpg(dev.pid, signal.SIGINT)
        assert dev.wait(30) == 0
    finally:
        stop(dev, signal.SIGKILL)
        client.close()
    text = log.read_text().lower()
    assert "processor stopped" in text
    assert "panic" not in text
    assert "traceback" not in text
