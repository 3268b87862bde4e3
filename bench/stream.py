"""The NDJSON stream client: one chunked upload of trades, its result lines read meanwhile.

vegeta sends a body whole and reads the response after it; a stream of a million lines must
be written while its results stream back (else both sides' buffers fill and stall), and must
never be held in memory whole. HTTP/1.1 framing is h11's (chunked both ways); the reader
keeps only the counts and the unfinished tail of a line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson

PATH = "/api/v1/trades/batch"


@dataclass
class StreamResult:
    status: int = 0
    lines_sent: int = 0
    results: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    out_of_order: int = 0
    summary: dict[str, Any] | None = None
    started: float = 0.0
    sent_at: float = 0.0
    finished: float = 0.0
    error: str | None = None

    def count(self, item: dict[str, Any]) -> None:
        """One result line: a per-item result, or the closing summary."""
        if "index" not in item:
            self.summary = item
            return
        if item["index"] != self.results:
            self.out_of_order += 1
        self.results += 1
        code = int(item.get("status", 0))
        self.statuses[code] = self.statuses.get(code, 0) + 1

    def figures(self) -> dict[str, Any]:
        wall = self.finished - self.started if self.finished else 0.0
        accepted = self.statuses.get(202, 0)
        return {
            "http_status": self.status,
            "lines_sent": self.lines_sent,
            "result_lines": self.results,
            "result_statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "out_of_order": self.out_of_order,
            "summary_line": self.summary,
            "wall_s": round(wall, 2),
            "upload_s": round(self.sent_at - self.started, 2) if self.sent_at else None,
            "trades_per_s": round(accepted / wall, 1) if wall else None,
            "error": self.error,
        }


async def send_stream(
    host: str, port: int, lines: Iterable[bytes], chunk_bytes: int = 64 * 1024
) -> StreamResult:
    """POST ``lines`` (each a trade, no newline) as NDJSON; count the streamed results."""
    res = StreamResult(started=time.monotonic())
    reader, writer = await asyncio.open_connection(host, port)
    conn = h11.Connection(our_role=h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=PATH,
        headers=[
            ("Host", f"{host}:{port}"),
            ("Content-Type", "application/x-ndjson"),
            ("Transfer-Encoding", "chunked"),
        ],
    )

    async def upload() -> None:
        writer.write(conn.send(request) or b"")
        for chunk in _chunks(lines, chunk_bytes, res):
            writer.write(conn.send(h11.Data(data=chunk)) or b"")
            await writer.drain()  # back-pressure: the server reads as fast as it acks
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        res.sent_at = time.monotonic()

    async def download() -> None:
        tail = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(256 * 1024)
                conn.receive_data(data)
                if not data and conn.their_state is not h11.DONE:
                    raise ConnectionError("the server closed the stream early")
                continue
            if isinstance(event, h11.Response):
                res.status = event.status_code
            elif isinstance(event, h11.Data):
                *complete, tail = (tail + bytes(event.data)).split(b"\n")
                for line in complete:
                    if line.strip():
                        res.count(orjson.loads(line))
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                if tail.strip():
                    res.count(orjson.loads(tail))
                return

    up = asyncio.create_task(upload())
    try:
        await download()
        if res.status < 300:
            await up
        else:  # an error answer ends the exchange; the rest of the upload is moot
            up.cancel()
    except (OSError, ValueError, h11.ProtocolError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        up.cancel()
    finally:
        res.finished = time.monotonic()
        writer.close()
    return res


def _chunks(lines: Iterable[bytes], size: int, res: StreamResult) -> Iterable[bytes]:
    """NDJSON in pieces of about ``size`` bytes, counting the lines into ``res``."""
    chunk: list[bytes] = []
    held = 0
    for line in lines:
        chunk.append(line)
        held += len(line) + 1
        res.lines_sent += 1
        if held >= size:
            yield b"\n".join(chunk) + b"\n"
            chunk, held = [], 0
    if chunk:
        yield b"\n".join(chunk) + b"\n"


def run_stream(host: str, port: int, lines: Iterable[bytes]) -> StreamResult:
    return asyncio.run(send_stream(host, port, lines))
