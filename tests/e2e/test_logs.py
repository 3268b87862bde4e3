"""The logs of real `serve` and `process` processes: in JSON mode every line either writes
is JSON, uvicorn's own included; the console shows a hostile request path escaped; the
normal stop of either prints no traceback."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters import wiring
from cli.status import queue_of, read_positions
from config.clock import business_today
from config.settings import Settings
from domain.message import TradeMessage
from domain.ports import Submission
from domain.status import RequestState
from domain.trade import Trade
from tests.conftest import own_topics, settings_env, unique
from tests.support import LOGS, free_port, pending_of, start, stop, wait_for

# Percent-encoded, as a client can send it: clear the screen, ring the bell, then a
# right-to-left override; the API logs the decoded path (a 404 is logged at INFO).
HOSTILE = "/%1B%5B2J%07%E2%80%AEtxt.exe"
DECODED = "/\x1b[2J\x07\u202etxt.exe"
ESCAPED = "/\\x1b[2J\\x07\\u202etxt.exe"
# Characters that must never reach a terminal raw (line ends aside).
UNSAFE = re.compile(
    "[\x00-\x09\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069]"
)
SGR = re.compile("\x1b\\[[0-9;]*m")  # the console's own colours
TLS_HELLO = bytes.fromhex("16030100a5010000a103035f")  # what a TLS client sends first


def fresh_log(name: str) -> Path:
    log = LOGS / f"{name}.log"
    log.unlink(missing_ok=True)
    return log


def records(log: Path) -> list[dict[str, Any]]:
    """Every line of ``log`` as JSON: ASCII only, and nothing else on any line."""
    data = log.read_bytes()
    assert data.isascii(), "JSON lines escape every non-ASCII character"
    lines = data.decode().splitlines()
    raw = [line for line in lines if not line.startswith("{")]
    assert not raw, f"raw lines in {log.name}: {raw[:5]}"
    assert not any(UNSAFE.search(line) for line in lines)
    return [json.loads(line) for line in lines]


def live(client: httpx.Client) -> bool:
    try:
        return client.get("/api/v1/health/live").status_code == 200
    except httpx.TransportError:
        return False


def send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        return conn.recv(4096)


def test_json_logs_of_serve_are_json_lines_to_the_last(tmp_path: Path) -> None:
    """``serve`` on ``auto`` (off a TTY: JSON), SIGTERMed."""
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", port=free_port())
    env = settings_env(settings)
    serve_log = fresh_log("logs-serve")
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    serve = start("logs-serve", ["serve"], {**env, "TRADE_STORE_LOG_FORMAT": "auto"})
    try:
        wait_for(lambda: live(client), 60, "API up")
        assert send_raw(settings.port, TLS_HELLO).startswith(b"HTTP/1.1 400")
        assert client.get(HOSTILE).status_code == 404
    finally:
        serve_exit = stop(serve, signal.SIGTERM)
        client.close()
    # uvicorn re-raises the signal it stopped on once it has shut down gracefully.
    assert serve_exit in (0, -signal.SIGTERM)

    api = records(serve_log)
    invalid = [r for r in api if r["event"] == "Invalid HTTP request received."]
    assert [(r["logger"], r["level"]) for r in invalid] == [("uvicorn.error", "warning")]
    (hostile,) = [r for r in api if r.get("path") == DECODED]
    assert (hostile["event"], hostile["status"]) == ("request", 404)
    assert hostile["correlation_id"]
    assert "\\u001b[2J\\u0007\\u202etxt.exe" in serve_log.read_text()
    events = {r["event"] for r in api}
    assert {"api started", "Application shutdown complete.", "api stopped"} <= events
    text = serve_log.read_text().lower()
    assert "panic" not in text
    assert "traceback" not in text


def submit(settings: Settings, trade_id: str) -> str:
    """One trade through the API's own intake (PENDING, then queued); its request id."""
    today = business_today(settings.business_timezone)
    sent = TradeMessage(
        request_id=str(uuid.uuid4()),
        correlation_id=unique("corr"),
        accepted_on=today,
        accepted_at=datetime.now(UTC),
        trade=Trade(trade_id, 1, "CP-1", "B1", today + timedelta(days=30), today),
    )

    async def accept() -> None:
        services = wiring.api_services(settings)
        try:
            await services.intake.accept(Submission([(pending_of(sent), sent)]))
        finally:
            services.close()

    asyncio.run(accept())
    return sent.request_id


@pytest.mark.parametrize("profile", ["embedded", "services"])
def test_the_processor_stops_on_sigterm_with_json_lines_to_the_last(
    profile: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGTERM ends the processor's input: it exits 0 without Bytewax's panic text, and
    its last snapshot holds what it decided (a restart reads none of it again). Snapshots
    are a minute apart, so only the one taken on the way out can hold it."""
    base = (
        Settings(profile="embedded", data_dir=tmp_path / "data")
        if profile == "embedded"
        else own_topics(request.getfixturevalue("migrated"), tmp_path)
    )
    settings = base.model_copy(update={"snapshot_interval_seconds": 60})
    name = f"logs-process-{profile}"
    log = fresh_log(name)
    process = start(name, ["process"], settings_env(settings))
    try:
        wait_for(lambda: "processor started" in log.read_text(), 60, "processor started")
        request_id = submit(settings, unique("T"))
        statuses = wiring.status_store(settings)
        decided = wait_for(
            lambda: (s := statuses.get(request_id)) and s.state.terminal and s, 60, "decided"
        )
        assert decided.state is RequestState.SUCCESS
    finally:
        exit_code = stop(process, signal.SIGTERM)
    assert exit_code == 0

    events = [r["event"] for r in records(log)]
    assert "processor stopping" in events
    assert events[-1] == "processor stopped"
    text = log.read_text().lower()
    assert "panic" not in text
    assert "traceback" not in text
    positions, _ = read_positions(settings)
    assert sum(queue_of(settings).lag(positions).values()) == 0


def test_a_processor_that_cannot_start_logs_its_traceback_as_a_field(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "recovery"
    not_a_folder.write_text("")
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", recovery_dir=not_a_folder)
    log = fresh_log("logs-process-fails")
    process = start("logs-process-fails", ["process"], settings_env(settings))
    assert process.wait(60) == 1
    failed = records(log)[-1]
    assert (failed["event"], failed["level"]) == ("uncaught exception", "critical")
    assert failed["exception"].startswith("Traceback (most recent call last):\n")
    assert "NotADirectoryError" in failed["exception"].splitlines()[-1]


def test_the_console_on_a_tty_shows_a_hostile_path_escaped(tmp_path: Path) -> None:
    """``auto`` on a terminal: coloured console lines, the client's bytes escaped."""
    settings = Settings(profile="embedded", data_dir=tmp_path / "data", port=free_port())
    env = {**settings_env(settings), "TRADE_STORE_LOG_FORMAT": "auto"}
    terminal, child_side = pty.openpty()
    serve = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=child_side,
        stderr=child_side,
    )
    os.close(child_side)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the child side closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    try:
        wait_for(lambda: live(client), 60, "API up")
        assert client.get(HOSTILE).status_code == 404
        wait_for(lambda: ESCAPED.encode() in shown, 10, "the request line")
    finally:
        stop(serve, signal.SIGINT)
        client.close()
        reader.join(10)
        os.close(terminal)
    text = shown.decode()
    assert SGR.search(text), "a terminal gets colours"
    assert not UNSAFE.search(SGR.sub("", text))
    (line,) = [line for line in text.splitlines() if ESCAPED in line]
    assert f"path='{ESCAPED}'" in SGR.sub("", line)
