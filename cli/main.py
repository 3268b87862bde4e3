"""Entry point of the ``trade-store`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from config.logs import capture_uncaught, configure_logging
from config.settings import Settings, get_settings


def _migrate_embedded(settings: Settings, args: argparse.Namespace) -> None:
    """Zero set-up: the SQLite files migrate themselves, unless ``dev`` has done it for both
    of its children already (``--no-migrate``)."""
    if settings.embedded and not args.no_migrate:
        from cli.migrate import migrate

        migrate(settings)


def _refuses_auth(settings: Settings, host: str, command: str) -> bool:
    """Whether the API must not start on ``host`` with these authentication settings (and
    why, on stderr): open to the network only when TRADE_STORE_AUTH=none is set explicitly,
    and a key file or key that cannot work stops the start here, not in a worker."""
    from ingest_api import auth

    if auth.open_to_network(settings, host):
        reason = (
            f"{host} is not a loopback address and TRADE_STORE_AUTH is not set; set it to"
            " api-key or jwt (README: Authentication), or to none to serve without"
            " authentication"
        )
    else:
        try:
            auth.authenticator(settings)
            return False
        except auth.AuthSetupError as exc:
            reason = str(exc)
    print(f"trade-store {command}: refusing to start: {reason}", file=sys.stderr)
    return True


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from ingest_api.metrics_dir import shared_across

    workers = args.workers or settings.api_workers
    # First: what imports prometheus-client (the app's modules) must find its folder ready.
    with shared_across(workers):
        import uvicorn

        from ingest_api.server import uvicorn_options

        if _refuses_auth(settings, args.host or settings.host, "serve"):
            return 2
        _migrate_embedded(settings, args)
        uvicorn.run(
            "ingest_api.app:create_app",
            factory=True,
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=workers,
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=settings.trusted_proxies or None,
            **uvicorn_options(settings),
        )
    return 0


def _process(settings: Settings, args: argparse.Namespace) -> int:
    from ingest_api.metrics_dir import MULTIPROC_ENV

    # The API's variable: the processor's metrics are its own, in memory (README "Metrics").
    os.environ.pop(MULTIPROC_ENV, None)
    from cli import processor

    _migrate_embedded(settings, args)
    if args.recovery_dir:
        settings = settings.model_copy(update={"recovery_dir": Path(args.recovery_dir)})
    processor.run(
        settings,
        workers=args.workers or settings.processor_workers,
        process_id=args.process_id,
        addresses=args.addresses.split(",") if args.addresses else None,
    )
    return 0


def _migrate(settings: Settings, _: argparse.Namespace) -> int:
    from cli.migrate import migrate

    migrate(settings)
    return 0


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    from cli import dev

    if _refuses_auth(settings, args.host or settings.host, "dev"):
        return 2
    return dev.run(settings, host=args.host or settings.host, port=args.port or settings.port)


def _expire(settings: Settings, _: argparse.Namespace) -> int:
    from adapters import wiring
    from config.clock import business_today

    today = business_today(settings.business_timezone)
    count = wiring.trade_store(settings).expire(today)
    print(f"expired {count} trade rows matured before {today.isoformat()}")
    return 0


def _topics(settings: Settings, args: argparse.Namespace) -> int:
    from adapters import wiring

    if args.action == "create":
        created = wiring.create_topics(settings)
        print("created: " + (", ".join(created) if created else "none (all exist)"))
        return 0
    if settings.embedded:
        log = wiring.inbound_log(settings)
        print(f"{log.path}\tpartitions={log.partitions}")
        return 0
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for name, meta in sorted(admin.list_topics(timeout=10).topics.items()):
        if not name.startswith("__"):
            print(f"{name}\tpartitions={len(meta.partitions)}")
    return 0


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from ingest_api import auth

    path = settings.api_keys_file
    if path is None:
        print(
            "trade-store keys add: set TRADE_STORE_API_KEYS_FILE to the key file", file=sys.stderr
        )
        return 2
    try:
        scopes = auth.parse_scopes(",".join(args.scopes))
        key = auth.add_key(path, args.client, scopes, args.rate)
    except (ValueError, OSError) as exc:
        print(f"trade-store keys add: {exc}", file=sys.stderr)
        return 2
    print(key)
    print(
        f"trade-store keys add: key of {args.client} ({', '.join(sorted(scopes))}) added to"
        f" {path}; it is shown only this once",
        file=sys.stderr,
    )
    return 0


def _replay_arguments(replay: argparse.ArgumentParser) -> None:
    """The flags of ``replay`` (README "Replay and backfill")."""
    replay.add_argument(
        "--from",
        dest="start",
        required=True,
        metavar="beginning|TIMESTAMP|offsets:FILE",
        help="where each partition starts: the beginning, the first record at or after an"
        " ISO-8601 timestamp (UTC unless it says), or a JSON file of partition: offset",
    )
    replay.add_argument(
        "--until",
        default="now",
        metavar="now|TIMESTAMP",
        help="where it ends: the high watermarks when it starts (now), or the first record"
        " at or after a timestamp",
    )
    replay.add_argument(
        "--target-db", required=True, help="the trade store to write: a SQLite path or a URL"
    )
    replay.add_argument(
        "--statuses",
        choices=["skip", "write"],
        default="skip",
        help="skip (default): write no statuses; write: to the live status store",
    )
    replay.add_argument("--workers", type=int, help="Bytewax workers in this process")
    replay.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    replay.add_argument("--yes", action="store_true", help="do not ask before replaying")


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--profile",
        choices=["embedded", "services"],
        help="embedded: SQLite files only (default); services: Kafka, PostgreSQL, DynamoDB",
    )
    common.add_argument("--data-dir", help="folder of the embedded profile's files (./data)")
    no_migrate = argparse.ArgumentParser(add_help=False)
    no_migrate.add_argument(
        "--no-migrate",
        action="store_true",
        help="embedded: do not migrate the SQLite files first (dev has already)",
    )

    root = argparse.ArgumentParser(
        prog="trade-store",
        description="Trade ingestion pipeline. Settings come from TRADE_STORE_* variables.",
    )
    sub = root.add_subparsers(dest="command", required=True)

    def command(
        name: str, help_text: str, *parents: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common, *parents])

    dev = command("dev", "run the API and the processor together (Ctrl-C stops both)")
    dev.add_argument("--host")
    dev.add_argument("--port", type=int)
    dev.set_defaults(handler=_dev)

    serve = command("serve", "run the HTTP API (uvicorn)", no_migrate)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="uvicorn worker processes")
    serve.set_defaults(handler=_serve)

    process = command("process", "run the Bytewax dataflow and the expiry sweep", no_migrate)
    process.add_argument("--workers", type=int, help="Bytewax workers in this process")
    process.add_argument("--recovery-dir", help="Bytewax recovery partitions folder")
    process.add_argument("--process-id", type=int, help="this process's index in a cluster")
    process.add_argument("--addresses", help="host:port of every cluster process, comma-separated")
    process.set_defaults(handler=_process)

    command("migrate", "migrate the trade store; create the status store").set_defaults(
        handler=_migrate
    )
    command("expire", "mark matured trades expired now").set_defaults(handler=_expire)

    topics = command("topics", "create or list the inbound queue and dead-letter topics")
    topics.add_argument("action", choices=["create", "list"])
    topics.set_defaults(handler=_topics)

    keys = command("keys", "manage the API key file (TRADE_STORE_API_KEYS_FILE)")
    add = keys.add_subparsers(dest="action", required=True).add_parser(
        "add", help="print a new key for CLIENT once and append its hash to the key file"
    )
    add.add_argument("client", metavar="CLIENT")
    add.add_argument(
        "--scopes",
        nargs="+",
        required=True,
        help="comma- or space-separated, of: trades:write trades:read requests:read"
        " requests:read:any",
    )
    add.add_argument("--rate", metavar="WRITES/READS", help="this client's quotas per second")
    keys.set_defaults(handler=_keys)

    from cli import dlq  # dead letters: list, show, redrive (README "Dead letters")

    dlq.register(sub.add_parser("dlq", help="list, show and redrive dead letters"), common)

    # status (README "Status"): one screen for an operator; exits 1 if a part is unreadable.
    def _status(settings: Settings, args: argparse.Namespace) -> int:
        from cli import status

        return status.run(settings, as_json_out=args.json)

    status = command("status", "lag, throughput, dead letters, oldest pending, row counts")
    status.add_argument("--json", action="store_true", help="one JSON object (README: Status)")
    status.set_defaults(handler=_status)

    # replay (README "Replay and backfill"): the handler lives in cli/replay.py.
    def _replay(settings: Settings, args: argparse.Namespace) -> int:
        from cli import replay

        return replay.run(settings, args)

    replay = command("replay", "replay a stretch of the queue into a trade store, then stop")
    _replay_arguments(replay)
    replay.set_defaults(handler=_replay)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Flags win over the environment, and child processes inherit them.
    if args.profile:
        os.environ["TRADE_STORE_PROFILE"] = args.profile
    if args.data_dir:
        os.environ["TRADE_STORE_DATA_DIR"] = str(Path(args.data_dir).resolve())
    get_settings.cache_clear()
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    capture_uncaught()
    from adapters.inbound_log import PartitionCountMismatch

    try:
        code: int = args.handler(settings, args)
    except PartitionCountMismatch as exc:
        structlog.get_logger("cli").error(f"trade-store {args.command}: refusing to start: {exc}")
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
