"""Entry point of the ``trade-store`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from config.logs import configure_logging
from config.settings import Settings, get_settings


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

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
    from alembic import command
    from alembic.config import Config

    import migrations
    from adapters import wiring

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option(
        "sqlalchemy.url", settings.database_url.get_secret_value().replace("%", "%%")
    )
    command.upgrade(config, "head")
    print("trade store: migrated to head", file=sys.stderr)
    wiring.status_store(settings).ensure_table()
    print(f"status store: table {settings.status_table} ready", file=sys.stderr)
    return 0


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
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for name, meta in sorted(admin.list_topics(timeout=10).topics.items()):
        if not name.startswith("__"):
            print(f"{name}\tpartitions={len(meta.partitions)}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="trade-store", description="Trade ingestion pipeline (settings: TRADE_STORE_*)."
    )
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="uvicorn worker processes")
    serve.set_defaults(handler=_serve)

    process = sub.add_parser("process", help="run the Bytewax dataflow and the expiry sweep")
    process.add_argument("--workers", type=int, help="Bytewax workers in this process")
    process.add_argument("--recovery-dir", help="Bytewax recovery partitions folder")
    process.add_argument("--process-id", type=int, help="this process's index in a cluster")
    process.add_argument("--addresses", help="host:port of every cluster process, comma-separated")
    process.set_defaults(handler=_process)

    migrate = sub.add_parser("migrate", help="migrate PostgreSQL and create the status table")
    migrate.set_defaults(handler=_migrate)

    expire = sub.add_parser("expire", help="mark matured trades expired now")
    expire.set_defaults(handler=_expire)

    topics = sub.add_parser("topics", help="create or list the Kafka topics")
    topics.add_argument("action", choices=["create", "list"])
    topics.set_defaults(handler=_topics)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    code: int = args.handler(settings, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
