"""A read flood for tests: ``python -m tests.timing.read_flood PORT CLIENTS SECONDS PATH``.

CLIENTS keep-alive connections each loop on ``GET PATH``; SIGUSR1 pauses them (each after
its answer in flight), SIGUSR2 resumes them. It prints "flooding" once it takes the signals; at SIGTERM (or after SECONDS at most) the
answers' status codes are printed as JSON ({"200": n, "429": m}). Raw asyncio streams, not
an HTTP client library, so the flood costs this process little of the shared CPU.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time


async def client(
    port: int,
    path: str,
    until: float,
    running: asyncio.Event,
    stop: asyncio.Event,
    codes: collections.Counter[int],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    while time.monotonic() < until and not stop.is_set():
        await running.wait()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        length = next(
            int(line.split(":", 1)[1])
            for line in lines
            if line.lower().startswith("content-length")
        )
        await reader.readexactly(length)
        codes[int(lines[0].split()[1])] += 1
    writer.close()


async def flood(port: int, clients: int, seconds: float, path: str) -> dict[int, int]:
    codes: collections.Counter[int] = collections.Counter()
    until = time.monotonic() + seconds
    running, stop = asyncio.Event(), asyncio.Event()
    running.set()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, running.clear)
    loop.add_signal_handler(signal.SIGUSR2, running.set)
    loop.add_signal_handler(signal.SIGTERM, lambda: (stop.set(), running.set()))
    print("flooding", flush=True)
    await asyncio.gather(*(client(port, path, until, running, stop, codes) for _ in range(clients)))
    return dict(codes)


if __name__ == "__main__":
    # Real readers run on machines of their own; here they share the API's two cores, and
    # at the API's priority they would take the cores from it as no remote client can.
    os.nice(10)
    port, clients, seconds, path = sys.argv[1:5]
    print(json.dumps(asyncio.run(flood(int(port), int(clients), float(seconds), path))))
