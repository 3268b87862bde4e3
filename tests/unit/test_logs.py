"""One logging set-up for every logger: JSON lines that are ASCII, a console that shows
what a client sent escaped, tracebacks as a field, uncaught exceptions as log lines."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from config.logs import configure_logging, visible

ROOT = Path(__file__).resolve().parents[2]
# Clear the screen, ring the bell, set the window title, CSI as one C1 byte, DEL, then a
# right-to-left override and isolate, a left-to-right mark and a line separator.
HOSTILE = "/\x1b[2J\x07\x1b]0;pwned\x07\x9b31m\x7f\u202etxt.exe\u2066\u200e\u2028x"
ESCAPED = "/\\x1b[2J\\x07\\x1b]0;pwned\\x07\\x9b31m\\x7f\\u202etxt.exe\\u2066\\u200e\\u2028x"
# Characters that must never reach a terminal raw (newline aside: it ends a line).
UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
SGR = re.compile("\x1b\\[[0-9;]*m")  # the console's own colours


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """configure_logging onto a stream of the test's (a plain one, or a ``Tty``), returned
    to read; the set-up from before restored after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def configure(level: str, fmt: str, stream: io.StringIO | None = None) -> io.StringIO:
        stream = stream or io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)  # in the test: pytest swaps it per phase
        configure_logging(level, fmt)
        return stream

    yield configure
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def failure(message: str) -> BaseException:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


def test_visible_escapes_controls_and_format_characters_only() -> None:
    assert visible(HOSTILE) == ESCAPED
    assert visible("\x00\x7f\t\r\n\u061c\u200b\ufeff") == "\\x00\\x7f\\t\\r\\n\\u061c\\u200b\\ufeff"
    plain = "/api/v1/trades/T-1 Zoë 東京 \\x1b"  # printable text, backslashes included
    assert visible(plain) is plain


def test_json_lines_are_ascii_and_give_every_character_back(configure: Configure) -> None:
    stderr = configure("INFO", "json")
    structlog.get_logger().info("request", path=HOSTILE)
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received: %s", HOSTILE)
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 2
    assert all(line.isascii() and not UNSAFE.search(line) for line in lines)
    ours, uvicorns = (json.loads(line) for line in lines)
    assert ours["path"] == HOSTILE
    assert uvicorns["event"] == f"Invalid HTTP request received: {HOSTILE}"
    assert (uvicorns["logger"], uvicorns["level"]) == ("uvicorn.error", "warning")


def test_a_foreign_traceback_is_one_json_line_with_the_correlation_id(
    configure: Configure,
) -> None:
    """uvicorn's "Exception in ASGI application\\n", as it logs it, during a request."""
    stderr = configure("INFO", "json")
    structlog.contextvars.bind_contextvars(correlation_id="feed-42")
    try:
        logging.getLogger("uvicorn.error").error(
            "Exception in ASGI application\n", exc_info=failure("cursor \x1b[2J")
        )
    finally:
        structlog.contextvars.unbind_contextvars("correlation_id")
    (line,) = stderr.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "Exception in ASGI application"
    assert (record["level"], record["correlation_id"]) == ("error", "feed-42")
    assert record["exception"].startswith("Traceback (most recent call last):\n")
    assert record["exception"].endswith("ValueError: cursor \x1b[2J")
    assert "timestamp" in record


def test_levels_apply_to_foreign_loggers_and_reconfiguring_does_not_repeat_lines(
    configure: Configure,
) -> None:
    stderr = configure("WARNING", "json")
    configure("WARNING", "json", stderr)  # the CLI, then the app factory
    logging.getLogger("bytewax.connectors.kafka").info("hidden")
    logging.getLogger("bytewax.connectors.kafka").warning("shown")
    structlog.get_logger().info("hidden")
    assert [json.loads(line)["event"] for line in stderr.getvalue().splitlines()] == ["shown"]


def test_the_console_shows_hostile_values_escaped(configure: Configure) -> None:
    stderr = configure("INFO", "console")  # not a TTY: no colours
    structlog.get_logger().info("request", path=HOSTILE, method="GET", status=404)
    structlog.get_logger().info(HOSTILE, **{"k\x1b": ["\x07"]})
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received: %s", HOSTILE)
    structlog.get_logger().error("failed", exc_info=failure(f"bad cursor {HOSTILE}"))
    text = stderr.getvalue()
    assert not UNSAFE.search(text)
    request, event, foreign, *traceback = text.splitlines()
    assert f"path='{ESCAPED}'" in request
    assert "status=404" in request
    assert f"'{ESCAPED}'" in event
    assert "k\\x1b=['\\x07']" in event
    assert f"'Invalid HTTP request received: {ESCAPED}'" in foreign
    assert "uvicorn.error" in foreign
    assert "Traceback (most recent call last):" in traceback
    assert traceback[-1] == f"ValueError: bad cursor {ESCAPED}"


def test_on_a_tty_the_only_escape_sequences_are_the_consoles_colours(
    configure: Configure,
) -> None:
    tty = configure("INFO", "auto", Tty())
    structlog.get_logger().info("request", path=HOSTILE)
    logging.getLogger("uvicorn.error").warning(HOSTILE)
    text = tty.getvalue()
    assert SGR.search(text), "a TTY gets colours"
    assert not UNSAFE.search(SGR.sub("", text))
    assert text.count(ESCAPED) == 2


UNCAUGHT = textwrap.dedent(
    """
    import threading, warnings
    from config.logs import capture_uncaught, configure_logging

    configure_logging("INFO", "json")
    capture_uncaught()
    warnings.warn("deprecated\\nsecond line", UserWarning)
    thread = threading.Thread(target=lambda: 1 / 0, name="sweeper")
    thread.start()
    thread.join()

    class Leaky:
        def __del__(self):
            raise OSError("closing")

    Leaky()
    raise RuntimeError("startup failed")
    """
)


def test_uncaught_exceptions_and_warnings_are_json_lines() -> None:
    done = subprocess.run(
        [sys.executable, "-c", UNCAUGHT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    warning, thread, ignored, uncaught = (json.loads(line) for line in done.stderr.splitlines())
    assert (warning["logger"], warning["level"]) == ("py.warnings", "warning")
    assert "UserWarning: deprecated\nsecond line" in warning["event"]
    assert (thread["event"], thread["thread"]) == ("uncaught exception in thread", "sweeper")
    assert thread["exception"].endswith("ZeroDivisionError: division by zero")
    assert ignored["level"] == "warning"
    assert "Leaky.__del__" in ignored["object"]
    assert ignored["exception"].endswith("OSError: closing")
    assert (uncaught["event"], uncaught["level"]) == ("uncaught exception", "critical")
    assert uncaught["exception"].startswith("Traceback (most recent call last):\n")
    assert uncaught["exception"].endswith("RuntimeError: startup failed")
