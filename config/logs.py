"""structlog set-up: JSON lines unless attached to a TTY; correlation ids via contextvars."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from functools import cache
from typing import cast

import structlog


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Route structlog and stdlib logging through one renderer."""
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


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
