"""``trade-store dlq list|show|redrive``: read the dead letters and submit their trades again.

A redrive is a new request through the API's own intake (``domain.use_cases.submit``):
PENDING, queued with a ``redriven_from`` header naming the dead letter, then decided like
any other. Each redrive holds an idempotency key named after its dead letter, so a second
one is refused (``--force`` makes another anyway); the original request keeps its status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import unicodedata
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from config.settings import Settings
from domain.message import TradeMessage, UndecodableMessage, valid_id
from domain.redrive import (
    DeadLetterReader,
    StoredDeadLetter,
    redrive_key,
    redrive_key_name,
    redriven_as,
    trade_of,
)

if TYPE_CHECKING:  # the adapters load only when a command runs
    from adapters.wiring import HeldKeys, Redrive

DEFAULT_LIMIT = 50
_PROGRAM = "trade-store dlq"


def register(dlq: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """The ``dlq`` subcommands, each taking the common options (``--profile``...)."""
    sub = dlq.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", parents=[common], help="the newest dead letters first")
    listing.add_argument("--since", type=timestamp, help="ISO-8601 (UTC when it names no zone)")
    listing.add_argument("--reason", help="only reasons containing TEXT (any case)")
    listing.add_argument("--limit", type=positive, default=DEFAULT_LIMIT, metavar="N")
    listing.add_argument("--json", action="store_true", help="one JSON array")
    show = sub.add_parser("show", parents=[common], help="everything about one dead letter")
    show.add_argument("id", metavar="ID")
    show.add_argument("--json", action="store_true", help="one JSON object")
    redrive = sub.add_parser(
        "redrive", parents=[common], help="submit dead letters' trades again as new requests"
    )
    redrive.add_argument("ids", nargs="*", metavar="ID")
    redrive.add_argument("--all", action="store_true", help="every one not redriven yet")
    redrive.add_argument("--dry-run", action="store_true", help="say what would be redriven")
    redrive.add_argument("--force", action="store_true", help="redrive again if redriven before")
    dlq.set_defaults(handler=run)


def timestamp(text: str) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 timestamp: {text!r}") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def positive(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def run(settings: Settings, args: argparse.Namespace) -> int:
    from adapters import wiring
    from domain.ports import Unavailable

    reader, store = wiring.dead_letters(settings)
    try:
        if args.action == "list":
            return _list(reader, args)
        if args.action == "show":
            return _show(reader, args.id, args.json, store, wiring.held_keys(settings))
        if bool(args.ids) == args.all:
            return _fail("redrive: name dead-letter ids, or --all", 2)
        return asyncio.run(_redrive(settings, reader, store, args))
    except ValueError as exc:  # an id this store never gives
        return _fail(str(exc), 2)
    except Unavailable as exc:
        return _fail(f"unavailable: {exc}", 1)


def _fail(message: str, code: int) -> int:
    print(f"{_PROGRAM} {message}", file=sys.stderr)
    return code


def newest(
    letters: Iterable[StoredDeadLetter], reason: str | None, limit: int
) -> list[StoredDeadLetter]:
    """The last ``limit`` letters whose reason contains ``reason`` (any case), newest first."""
    wanted = (reason or "").casefold()
    kept: deque[StoredDeadLetter] = deque(maxlen=limit)
    kept.extend(letter for letter in letters if wanted in letter.reason.casefold())
    return list(reversed(kept))


def escaped(text: str) -> str:
    """Text safe to print: controls, format and unassigned characters as escapes."""
    return "".join(
        c.encode("unicode_escape").decode()
        if unicodedata.category(c)[0] in "CZ" and c != " "
        else c
        for c in text
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else escaped(value.decode("utf-8", errors="backslashreplace"))


def summary(letter: StoredDeadLetter) -> dict[str, Any]:
    """What ``dlq list --json`` says of a letter."""
    return {
        "id": letter.id,
        "at": letter.at.isoformat(),
        "reason": letter.reason,
        "request_id": letter.request_id,
        "correlation_id": letter.header("correlation_id"),
        "key": _text(letter.key),
        "source": letter.source,
        "size": len(letter.value or b""),
        "truncated": letter.header("dlq_truncated") == "true",
    }


def details(letter: StoredDeadLetter, redriven: str | None) -> dict[str, Any]:
    """What ``dlq show --json`` says: the summary, every header, the request it was
    redriven as, and the body: ``value`` when it is JSON, else ``value_escaped``."""
    shown = summary(letter) | {
        "headers": [[name, _text(value)] for name, value in letter.headers],
        "redriven_as": redriven,
    }
    try:
        value = json.loads(letter.value.decode()) if letter.value is not None else None
    except (ValueError, RecursionError):
        return shown | {"value_escaped": _text(letter.value)}
    return shown | {"value": value}


def _list(reader: DeadLetterReader, args: argparse.Namespace) -> int:
    letters = newest(reader.letters(args.since), args.reason, args.limit)
    rows = [summary(letter) for letter in letters]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    columns = ["id", "at", "reason", "request_id", "key", "source"]
    cells = [[escaped(str(row[c])) if row[c] is not None else "-" for c in columns] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(*columns, title=f"{len(rows)} dead letters, newest first")
        for line in cells:
            table.add_row(*(Text(cell) for cell in line))  # Text: no markup from the data
        Console().print(table)
    else:
        for line in cells:
            print("\t".join(line))
    return 0


def _show(
    reader: DeadLetterReader, letter_id: str, as_json: bool, store: str, held: HeldKeys
) -> int:
    letter = reader.letter(letter_id)
    if letter is None:
        return _fail(f"show: no dead letter {letter_id}", 1)
    key = asyncio.run(held(redrive_key_name(store, letter.id)))
    shown = details(letter, redriven_as(key.answer) if key else None)
    if as_json:
        print(json.dumps(shown, ensure_ascii=False))
        return 0
    names = ("id", "at", "reason", "request_id", "correlation_id", "key", "source", "size")
    for name in (*names, "redriven_as"):
        print(f"{name:<15} {escaped(str(shown[name])) if shown[name] is not None else '-'}")
    if shown["truncated"]:
        print(f"{'truncated':<15} from {letter.header('dlq_original_size')} bytes")
    print("headers")
    for name, value in shown["headers"]:
        print(f"  {escaped(name)}: {value}")
    if "value" in shown:
        print("value (JSON)")
        print(escaped_lines(json.dumps(shown["value"], indent=2, ensure_ascii=False)))
    else:
        print("value (not JSON; escaped)")
        print(shown["value_escaped"])
    return 0


def escaped_lines(text: str) -> str:
    return "\n".join(escaped(line) for line in text.splitlines())


@dataclass
class Tally:
    redriven: int = 0
    skipped: int = 0
    refused: int = 0


def _asked(
    reader: DeadLetterReader, ids: list[str]
) -> Iterator[tuple[str, StoredDeadLetter | None]]:
    for letter_id in ids:
        yield letter_id, reader.letter(letter_id)


async def _redrive(
    settings: Settings,
    reader: DeadLetterReader,
    store: str,
    args: argparse.Namespace,
) -> int:
    """On the event loop the status store's connections belong to, closed on it."""
    from adapters import wiring

    parts = wiring.redrive(settings)
    try:
        return await _each(settings, reader, store, parts, args)
    finally:
        parts.close()


async def _each(
    settings: Settings,
    reader: DeadLetterReader,
    store: str,
    parts: Redrive,
    args: argparse.Namespace,
) -> int:
    found: Iterable[tuple[str, StoredDeadLetter | None]] = (
        ((letter.id, letter) for letter in reader.letters())
        if args.all
        else _asked(reader, args.ids)
    )
    tally = Tally()
    for letter_id, letter in found:
        if letter is None:
            _say(f"{letter_id}: skipped: no such dead letter")
            tally.skipped += 1
            continue
        await _one(settings, store, parts, args, letter, tally)
    verb = "would redrive" if args.dry_run else "redriven"
    _say(f"{tally.redriven} {verb}, {tally.skipped} skipped, {tally.refused} refused")
    # --all means the letters not redriven yet: one redriven before is not a failure there.
    failed = tally.skipped or (tally.refused and not args.all)
    return 1 if failed else 0


def _say(line: str) -> None:
    print(f"{_PROGRAM} redrive: {line}", file=sys.stderr)


async def _one(
    settings: Settings,
    store: str,
    parts: Redrive,
    args: argparse.Namespace,
    letter: StoredDeadLetter,
    tally: Tally,
) -> None:
    from config.clock import business_today, utc_now
    from domain.use_cases import Arrival, admit, submit

    try:
        trade = trade_of(letter)
    except UndecodableMessage as exc:
        _say(f"{letter.id}: skipped: still undecodable ({exc.reason})")
        tally.skipped += 1
        return
    original = parts.statuses.get(letter.request_id) if letter.request_id else None
    correlation = letter.header("correlation_id") or ""
    arrival = Arrival(
        correlation_id=correlation if valid_id(correlation) else str(uuid.uuid4()),
        today=business_today(settings.business_timezone),
        now=utc_now(),
        client_id=original.client_id if original else None,  # the client may read it back
    )
    [(_, admitted)] = admit([(0, trade)], arrival)
    if not isinstance(admitted, TradeMessage):
        _say(f"{letter.id}: skipped: {admitted.message}")
        tally.skipped += 1
        return
    message = replace(admitted, redriven_from=letter.id)
    key = redrive_key(store, letter.id, message.request_id, arrival.now)
    what = f"trade {trade.trade_id} version {trade.version}"
    if args.dry_run:
        held = await parts.held(key.key)
        if held is not None and not args.force:
            _say(f"{letter.id}: would refuse: redriven before as {redriven_as(held.answer)}")
            tally.refused += 1
        else:
            print(f"{letter.id}\twould redrive\t{what}")
            tally.redriven += 1
        return
    answer = await submit(parts.intake, [(0, message)], arrival, key=key)
    if answer is not None:
        earlier = redriven_as(answer)
        if not args.force:
            _say(f"{letter.id}: refused: redriven before as {earlier} (--force to redrive again)")
            tally.refused += 1
            return
        await submit(parts.intake, [(0, message)], arrival)
    print(f"{letter.id}\t{message.request_id}")
    tally.redriven += 1
