"""structlog set-up: one line per event, JSON unless attached to a TTY; correlation ids via
contextvars.

Every logger of the process goes through the same processors and renderer: ours
(structlog), and the standard library's (uvicorn's, Bytewax's, Alembic's, librdkafka's
through ``kafka_logger``) by a ``ProcessorFormatter`` on the root logger. JSON lines are
ASCII (control, bidi and every other non-ASCII character as ``\\uXXXX``); the console
shows unprintable characters as Python escapes, so no value a client sent (a request
path) can drive the operator's terminal.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from functools import cache
from types import TracebackType
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, ExcInfo, Processor, WrappedLogger

HANDLER_NAME = "trade-store"


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Route structlog and stdlib logging through one renderer, to stderr (again on every
    call: the app factory calls it in uvicorn's worker processes too)."""
    tty = sys.stderr.isatty()
    json_output = fmt == "json" or (fmt == "auto" and not tty)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    rendering: list[Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(_ascii_json)]
        if json_output
        else [
            escape_unprintable,
            structlog.dev.ConsoleRenderer(colors=tty, exception_formatter=visible_traceback),
        ]
    )
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        # One write per line, like the stdlib handler's: their lines never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, _strip_message, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _ascii_json(obj: Any, **kw: Any) -> str:
    """JSON that is printable ASCII: json escapes controls and (``ensure_ascii``) every
    other non-ASCII character, bidi ones included, but leaves DEL raw."""
    return json.dumps(obj, ensure_ascii=True, **kw).replace("\x7f", "\\u007f")


def _strip_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """uvicorn ends some messages with a newline ("Exception in ASGI application\\n")."""
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = event.rstrip()
    return event_dict


def visible(text: str) -> str:
    """``text`` with each unprintable character (C0 and C1 controls such as ESC and BEL,
    bidi and other format characters, line separators) as its Python escape: ``\\x1b``,
    ``\\u202e``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _visible_lines(text: str) -> str:
    return "\n".join(visible(line) for line in text.split("\n"))


class _Shown:
    """Text already escaped, which the console renderer prints as it is (its ``repr``)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


_MULTILINE = frozenset({"exception", "stack"})


def escape_unprintable(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Console only: every key and value with an unprintable character is shown escaped
    (strings quoted, as ``repr`` shows them); tracebacks keep their line breaks."""
    shown: EventDict = {}
    for key, value in event_dict.items():
        if key == "exc_info":  # rendered by visible_traceback
            shown[key] = value
        elif key in _MULTILINE and isinstance(value, str):
            shown[key] = _visible_lines(value)
        elif isinstance(value, str):
            shown[visible(key)] = value if value.isprintable() else _Shown(repr(value))
        else:
            text = repr(value)  # what the renderer would print
            shown[visible(key)] = value if text.isprintable() else _Shown(visible(text))
    return shown


def visible_traceback(sio: TextIO, exc_info: ExcInfo) -> None:
    """structlog's plain traceback (no local variables), each line escaped: an exception's
    message may quote what a client sent."""
    text = io.StringIO()
    structlog.dev.plain_traceback(text, exc_info)
    sio.write(_visible_lines(text.getvalue()))


def capture_uncaught() -> None:
    """Uncaught exceptions (of the main thread, other threads, and "ignored" ones) and
    warnings become log lines with the traceback as a field, instead of raw text on stderr.

    For processes' entry points: it replaces interpreter-wide hooks, so it is not part of
    ``configure_logging``, which the app factory also runs inside tests (pytest has its own).
    """
    log = structlog.get_logger("uncaught")

    def uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):  # Ctrl-C: the operator knows where it was
            log.info("interrupted")
        else:
            log.critical("uncaught exception", exc_info=(kind, exc, tb))

    def uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not SystemExit:  # as Python's own hook: a thread may exit so
            log.error(
                "uncaught exception in thread",
                thread=args.thread.name if args.thread else None,
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            )

    def unraisable(args: Any) -> None:  # sys.UnraisableHookArgs
        log.warning(
            args.err_msg or "Exception ignored in",
            object=repr(args.object),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = uncaught
    threading.excepthook = uncaught_in_thread
    sys.unraisablehook = unraisable
    logging.captureWarnings(True)


KAFKA_LOG_EVERY_S = 10.0
_NUMBERS = re.compile(r"\d+")


class ThrottledKafkaLog(logging.Handler):
    """librdkafka's lines as structlog events, each distinct message (numbers aside) at most
    once per ``every_s``, with how many were suppressed since: with Kafka down, its dozen
    clients retry connecting several times a second, each with a line."""

    def __init__(
        self, every_s: float = KAFKA_LOG_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._every_s = every_s
        self._clock = clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # → logged at, suppressed
        self._log = structlog.get_logger("librdkafka")

    def emit(self, record: logging.LogRecord) -> None:  # serialised by handle()
        facility, client, message = cast(tuple[str, str, str], record.args)  # "%s [%s] %s"
        key = (facility, _NUMBERS.sub("#", message))
        now = self._clock()
        logged_at, suppressed = self._seen.get(key, (now - self._every_s, 0))
        if now - logged_at < self._every_s:
            self._seen[key] = (logged_at, suppressed + 1)
            return
        if len(self._seen) > 1000:  # keys are few; this only bounds a pathological stream
            self._seen.clear()
        self._seen[key] = (now, 0)
        self._log.log(
            record.levelno,
            "librdkafka",
            facility=facility,
            client=client,
            message=message,
            suppressed=suppressed,
        )


@cache
def kafka_logger() -> logging.Logger:
    """The ``logger`` for every confluent-kafka client's config (served by its poll())."""
    logger = logging.getLogger("librdkafka")
    logger.propagate = False
    logger.addHandler(ThrottledKafkaLog())
    return logger
