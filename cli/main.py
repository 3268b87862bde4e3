"""Entry point of the ``trade-store`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from config.logs import configure_logging
from config.settings import Settings, get_settings


def migrate(settings: Settings) -> None:
    """Bring the trade store to the latest schema and create the status store and queue."""
    from alembic import command
    from alembic.config import Config

    import migrations
    from adapters import wiring

    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        wiring.inbound_log(settings).ensure_schema()  # refuses another partition count
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", settings.trade_store_url.replace("%", "%%"))
    command.upgrade(config, "head")
    print(f"trade store ({settings.profile}): migrated to head", file=sys.stderr)
    print(f"status store: {wiring.prepare_status_store(settings)} ready", file=sys.stderr)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    if settings.embedded:  # zero set-up: the SQLite files migrate themselves
        migrate(settings)
    uvicorn.run(
        "ingest_api.app:create_app",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.api_workers,
        log_config=None,
        access_log=False,
        server_header=False,
    )
    return 0


def _process(settings: Settings, args: argparse.Namespace) -> int:
    from cli import processor

    if settings.embedded:
        migrate(settings)
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
    migrate(settings)
    return 0


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    from cli import dev

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


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--profile",
        choices=["embedded", "services"],
        help="embedded: SQLite files only (default); services: Kafka, PostgreSQL, DynamoDB",
    )
    common.add_argument("--data-dir", help="folder of the embedded profile's files (./data)")

    root = argparse.ArgumentParser(
        prog="trade-store",
        description="Trade ingestion pipeline. Settings come from TRADE_STORE_* variables.",
    )
    sub = root.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common])

    dev = command("dev", "run the API and the processor together (Ctrl-C stops both)")
    dev.add_argument("--host")
    dev.add_argument("--port", type=int)
    dev.set_defaults(handler=_dev)

    serve = command("serve", "run the HTTP API (uvicorn)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="uvicorn worker processes")
    serve.set_defaults(handler=_serve)

    process = command("process", "run the Bytewax dataflow and the expiry sweep")
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
    from adapters.inbound_log import PartitionCountMismatch

    try:
        code: int = args.handler(settings, args)
    except PartitionCountMismatch as exc:
        print(f"trade-store {args.command}: refusing to start: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
