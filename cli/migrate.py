"""``trade-store migrate``, in a module of its own: ``cli.main`` and ``cli.dev`` both run it,
so ``cli.dev`` need not import ``cli.main``."""

from __future__ import annotations

from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config

import migrations
from adapters import wiring
from config.settings import Settings

log = structlog.get_logger("migrate")


def migrate(settings: Settings) -> None:
    """Bring the trade store to the latest schema and create the status store; embedded, the
    inbound log (the queue) too. The services profile's topics are made by ``topics create``
    or the API's and the processor's first start."""
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        wiring.inbound_log(settings).ensure_schema()  # refuses another partition count
    upgrade(settings.trade_store_url)
    log.info(f"trade store ({settings.profile}): migrated to head")
    log.info(f"status store: {wiring.prepare_status_store(settings)} ready")


def upgrade(url: str) -> None:
    """Bring the trade store at ``url`` to the latest schema (a replay's target, too)."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")
