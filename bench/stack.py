"""Processes under test: start, wait until ready, stop; and their CPU time from /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where the processes under test run from: this checkout unless --app-root points at another
# one (an A/B comparison of two versions of the app on the same venv and services).
APP_ROOT = [ROOT]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # fields after "(comm)": state ppid ... utime(11) stime(12)
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """user+system CPU seconds of each pid (its threads included)."""
    out = {}
    for pid in pids:
        fields = _stat(pid)
        if fields:
            out[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


class CpuMeter:
    """user+sys CPU of a process tree over an interval (the tree is read at start)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pids = descendants(pid)
        self.before = cpu_seconds(self.pids)

    def stop(self) -> tuple[float, dict[int, float]]:
        after = cpu_seconds(self.pids)
        per = {p: after[p] - self.before.get(p, 0.0) for p in after}
        return sum(per.values()), per


@dataclass
class Proc:
    """A child process of ours with its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20) -> int | None:
        """Ctrl-C (what `trade-store dev` sends), then SIGTERM, then SIGKILL of the tree;
        workers that outlive their supervisor are killed too."""
        tree = [(p, _cmdline(p)) for p in descendants(self.pid) if p != self.pid]
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout / 2)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout / 2)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) did not stop in {timeout}s; killing it")
                for pid in reversed(descendants(self.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.popen.wait(5)
        for pid, cmdline in tree:
            # still there, and still the same program (not a reused pid): an orphan of ours
            if cmdline and _cmdline(pid) == cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return self.popen.returncode


def reap(popen: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for ``popen`` to exit, killing it after ``timeout`` seconds; set its exit status
    and return the CPU seconds the kernel accounted to it (user + sys, from ``wait4``)."""
    watchdog = threading.Timer(timeout, popen.kill)
    watchdog.start()
    try:
        _, status, usage = os.wait4(popen.pid, 0)
    finally:
        watchdog.cancel()
        if popen.returncode is None and popen.poll() is None:
            popen.kill()
    popen.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def start(name: str, args: list[str], env: dict[str, str], logs: Path) -> Proc:
    """Start ``python ARGS`` from the repository root, logging to ``logs/NAME.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{name}.log"
    with path.open("ab") as out:
        popen = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            [sys.executable, *args],
            cwd=APP_ROOT[0],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    return Proc(name, popen, path, time.time())


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: Proc | None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{proc.tail()}" if proc is not None else ""
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(0.2)


def http_ok(port: int, path: str = "/api/v1/health") -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def start_http(
    name: str, args: list[str], env: dict[str, str], logs: Path, port: int, workers: int
) -> Proc:
    """Start an HTTP server and wait until every worker is up and /api/v1/health is 200."""
    proc = start(name, args, env, logs)
    wait_until(lambda: http_ok(port), 90, f"{name} health on port {port}", proc)
    if workers > 1:
        # uvicorn's supervisor forks workers; make sure all of them are there before measuring
        wait_until(lambda: len(descendants(proc.pid)) >= workers + 1, 30, f"{name} workers", proc)
        time.sleep(1.0)
    return proc


SERVICE_MARKERS = {
    "postgres": "postgres",
    "kafka": "kafka.Kafka",
    "dynoxide": "dynoxide",
}


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class GroupMeter:
    """CPU seconds per named group of processes over an interval, plus the machine total.

    Groups: the given process trees (our app processes) and the local services by their
    command lines. Everything else (the load generator, this harness) is "other".
    """

    def __init__(self, trees: dict[str, int]) -> None:
        self.trees = trees
        self.groups = self._scan()
        self.before = {name: cpu_seconds(pids) for name, pids in self.groups.items()}
        self.machine0 = machine_cpu()
        self.t0 = time.monotonic()

    def _scan(self) -> dict[str, list[int]]:
        groups = {name: descendants(pid) for name, pid in self.trees.items()}
        taken = {p for pids in groups.values() for p in pids}
        for name, marker in SERVICE_MARKERS.items():
            groups[name] = [
                int(e)
                for e in os.listdir("/proc")
                if e.isdigit() and int(e) not in taken and marker in _cmdline(int(e))
            ]
        return groups

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        out: dict[str, float] = {}
        # processes born during the interval (database backends of new connections, new
        # workers) count with all their CPU time; those that died meanwhile are lost
        for name, pids in self._scan().items():
            before = self.before.get(name, {})
            after = cpu_seconds(pids)
            used = sum(after[p] - before.get(p, 0.0) for p in after)
            out[name] = round(used / wall, 3) if wall > 0 else 0.0
        total = (machine_cpu() - self.machine0) / wall if wall > 0 else 0.0
        out["other"] = round(max(0.0, total - sum(out.values())), 3)
        out["machine"] = round(total, 3)
        return out  # in cores (CPU-seconds per second)


def connections_per_process(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections to ``port`` held by each of ``pids`` (from /proc/net/tcp).

    Keep-alive connections stay with the worker that accepted them, so this shows how the
    load generator's connections spread over the server's workers.
    """
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            if local_port == port and parts[3] == "01":  # 01 = ESTABLISHED
                established.add(parts[9])  # inode
    out: dict[int, int] = {}
    for pid in pids:
        count = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in established:
                count += 1
        if count:
            out[pid] = count
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssMeter:
    """Peak resident memory of a process tree: VmRSS summed over the tree, sampled every
    0.1 s on a thread, and each process's own high-water mark (VmHWM) at the end."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pids = descendants(pid)
        self.peak_kb = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self.thread.start()

    def _sample(self, every: float) -> None:
        while not self.done.wait(every):
            self.peak_kb = max(self.peak_kb, sum(_status_kb(p, "VmRSS:") for p in self.pids))

    def stop(self) -> dict[str, object]:
        self.done.set()
        self.thread.join()
        return {
            "peak_rss_mb": round(self.peak_kb / 1024, 1),
            "vm_hwm_mb_per_process": {
                str(p): round(_status_kb(p, "VmHWM:") / 1024, 1) for p in self.pids
            },
        }
