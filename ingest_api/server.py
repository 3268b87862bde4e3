"""The HTTP server's own bounds on hostile clients, below the app (README "Limits").

uvicorn's httptools protocol takes headers of any size and waits for them, and for a body,
forever (a 96 MB header was accepted; a byte a second held a connection indefinitely).
``LimitedHttpProtocol`` adds a cap on each request's header bytes (431) and timeouts on
reading its headers and its body (408, then close). It counts bytes per read, and arms a
timer only when a read leaves headers or a body unfinished, so a request that arrives
whole in one read, the usual case, costs no timer. uvicorn's ``limit_concurrency`` caps the
connections of a worker; the answer over it becomes problem+json 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import structlog
from starlette.responses import Response
from starlette.types import ASGIApp
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from config.settings import Settings, get_settings
from ingest_api.metrics import note_refusal
from ingest_api.middleware import NDJSON, CorrelationMiddleware
from ingest_api.problems import problem_response

log = structlog.get_logger("ingest_api")
CLOSE = {"Connection": "close"}
# How long a refused client may go on sending, unread, before the connection closes.
LINGER_S = 2.0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.run`` arguments for these bounds."""
    return {
        "http": LimitedHttpProtocol,
        # uvicorn refuses once the connections, the new one included, reach this number.
        "limit_concurrency": settings.max_connections + 1,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }


@dataclass(frozen=True)
class Limits:
    """A worker's bounds, and its answers past them (each closes the connection)."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    headers_too_large: Response
    timed_out: Response
    too_many_connections: ASGIApp


@lru_cache(maxsize=1)
def limits() -> Limits:
    """This worker's limits and refusals, built once (a protocol is made per connection)."""
    settings = get_settings()
    return Limits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        headers_too_large=problem_response(
            431,
            "REQUEST_HEADER_FIELDS_TOO_LARGE",
            f"Request line and headers exceed {settings.max_header_bytes} bytes",
            headers=CLOSE,
        ),
        timed_out=problem_response(
            408,
            "REQUEST_TIMEOUT",
            "The request was not received in time",
            detail=f"Headers are awaited {settings.header_timeout_s:g} s, a body"
            f" {settings.body_timeout_s:g} s",
            headers=CLOSE,
        ),
        # Through CorrelationMiddleware: like every answer, it carries the id and the timing.
        too_many_connections=CorrelationMiddleware(
            problem_response(
                429,
                "TOO_MANY_REQUESTS",
                "Too many connections are open; retry later",
                detail=f"This API worker serves at most {settings.max_connections} connections",
                headers={"Retry-After": str(settings.retry_after_seconds), **CLOSE},
            )
        ),
    )


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the header cap and the read timeouts.

    A request's headers (request line included) start after the previous message, or at
    the connection's start; the header timer runs from the connection's start for its first
    request, and from the first read of an unfinished header for the next ones (before it,
    uvicorn's keep-alive timeout applies). The body timer runs from the end of the headers
    until the body is complete. A request pipelined behind another in the same read is
    counted from the next read on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits()
        self._in_headers = True  # the next bytes read belong to a request's headers
        self._header_budget = self._limits.max_header_bytes
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._streaming = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes | memoryview) -> None:
        if self._lingering:
            return
        size = len(data)
        if not self._in_headers or size <= self._header_budget:
            if self._in_headers:
                self._header_budget -= size
            super().data_received(data)  # type: ignore[arg-type]
        else:
            # This read takes the headers past the cap: parse only what the cap allows.
            allowed, self._header_budget = self._header_budget, 0
            view = memoryview(data)
            super().data_received(view[:allowed])  # type: ignore[arg-type]
            if self.transport.is_closing():
                return
            if self._in_headers and self._header_budget == 0:  # still the same headers
                self._refuse(self._limits.headers_too_large, "headers too large")
                return
            self.data_received(view[allowed:])
            return
        if self._timer is None and not self.transport.is_closing():
            if not self._in_headers:
                if not self._streaming:
                    self._arm(self._limits.body_timeout_s)
            elif self._header_budget < self._limits.max_header_bytes:
                self._arm(self._limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        # An NDJSON stream has no total time: its route bounds each wait for more (idle).
        self._streaming = any(
            name == b"content-type" and value.lower().startswith(NDJSON.encode())
            for name, value in self.headers
        )
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._in_headers = True
        self._header_budget = self._limits.max_header_bytes

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is service_unavailable:  # uvicorn's text/plain 503 over limit_concurrency
            app = self._limits.too_many_connections  # type: ignore[assignment]
            note_refusal(429, "connections")
        super()._start_asgi_task(cycle, app)

    def _arm(self, seconds: float) -> None:
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        reason = "headers too slow" if self._in_headers else "body too slow"
        self._refuse(self._limits.timed_out, reason)

    def _refuse(self, response: Response, reason: str) -> None:
        """Close the connection, answering ``response`` first unless another answer is under
        way on it; an unfinished request's own answer is then dropped, as on a disconnect.

        It closes in two steps: our side at once, the client's after it stops sending or
        after LINGER_S, dropping what it sends meanwhile. Closing with its bytes unread would
        reset the connection, and the client could lose the answer (a header bomb's would)."""
        cycle: RequestResponseCycle | None = self.cycle
        if self.pipeline:
            clean = False
        elif self._in_headers:
            clean = cycle is None or cycle.response_complete
        else:
            clean = cycle is not None and not cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if clean:
            head = [STATUS_LINE[response.status_code]]
            for name, value in (*self.server_state.default_headers, *response.raw_headers):
                head += (name, b": ", value, b"\r\n")
            self.transport.write(b"".join((*head, b"\r\n", response.body)))
        self._lingering = True
        self._disarm()
        self.flow.resume_reading()
        self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)
        log.info(
            "connection closed",
            reason=reason,
            answered=response.status_code if clean else None,
            client=f"{self.client[0]}:{self.client[1]}" if self.client else None,
        )
