"""`trade-store dev`: the API and the processor as two supervised child processes.

Ctrl-C, SIGTERM or SIGHUP stops both cleanly; if either dies, the other is stopped too and the
command exits non-zero, so a broken half never keeps running unnoticed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

import structlog

from cli.migrate import migrate
from config.settings import Settings

STOP_TIMEOUT_S = 20
log = structlog.get_logger("dev")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run(settings: Settings, host: str, port: int) -> int:
    if port_in_use(host, port):
        log.error(
            f"trade-store dev: {host}:{port} is already in use; stop what holds it or pass --port N"
        )
        return 2
    migrate(settings)
    env = {
        **os.environ,
        "TRADE_STORE_PROFILE": settings.profile,
        "TRADE_STORE_DATA_DIR": str(settings.data_dir.resolve()),
        "TRADE_STORE_HOST": host,
        "TRADE_STORE_PORT": str(port),
    }
    command = [sys.executable, "-m", "cli.main"]
    # Migrated once, above: the children start on it. Each in a process group of its own,
    # so a Ctrl-C reaches only this process, which stops each child with one SIGTERM (the
    # processor takes a second signal as an interrupt).
    named = {
        name: subprocess.Popen([*command, name, "--no-migrate"], env=env, process_group=0)  # noqa: S603
        for name in ("process", "serve")
    }
    children = list(named.values())
    stopping = False

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, request_stop)  # the terminal closed: its hangup is ours only
    where = settings.data_dir.resolve() if settings.embedded else "Kafka/PostgreSQL/DynamoDB"
    log.info(
        f"trade-store dev ({settings.profile}): API on http://{host}:{port}/docs, data in"
        f" {where}. Ctrl-C stops."
    )
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    crashed = [name for name, child in named.items() if child.poll() is not None]
    _stop(children)
    if crashed and not stopping:
        log.error(f"trade-store dev: {', '.join(crashed)} exited; stopped both")
        return 1
    log.info("trade-store dev: stopped")
    return 0
