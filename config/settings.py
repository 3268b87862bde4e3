"""All configuration, from TRADE_STORE_* environment variables or a .env file."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, HttpUrl, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """One place for every knob; README's Settings table documents each field."""

    model_config = SettingsConfigDict(
        env_prefix="TRADE_STORE_", env_file=".env", extra="ignore", frozen=True
    )

    # Deployment shape: "embedded" keeps everything in SQLite files under data_dir;
    # "services" uses Kafka, PostgreSQL and DynamoDB.
    profile: Literal["embedded", "services"] = "embedded"
    data_dir: Path = Path("data")

    # HTTP API
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=16_384, ge=256)
    retry_after_seconds: int = Field(default=5, ge=1)
    # Trades of one API worker awaiting their durable ack at once; beyond, 429 OVERLOADED.
    max_in_flight: int = Field(default=5_000, ge=1)
    # POST /api/v1/trades/batch: items of a JSON batch, and its body's bytes (over: 413).
    batch_max_items: int = Field(default=1_000, ge=1)
    max_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    business_timezone: str = "UTC"

    # PostgreSQL trade store
    database_url: SecretStr = SecretStr(
        "postgresql+psycopg://trade_store:trade_store@127.0.0.1:55432/trade_store"
    )
    db_pool_size: int = Field(default=10, ge=1)
    db_statement_timeout_ms: int = Field(default=5_000, ge=100)

    # Kafka queue
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    inbound_topic: str = "trades-inbound"
    dlq_topic: str = "trades-dlq"
    inbound_partitions: int = Field(default=12, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    produce_timeout_ms: int = Field(default=5_000, ge=100)
    producer_linger_ms: int = Field(default=2, ge=0)

    # DynamoDB request-status store
    dynamodb_endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    status_table: str = "trade-requests"
    status_ttl_days: int = Field(default=7, ge=1)

    # Bytewax processor
    recovery_dir: Path | None = None  # default: <data_dir>/recovery
    recovery_partitions: int = Field(default=1, ge=1)
    snapshot_interval_seconds: float = Field(default=2.0, gt=0)
    processor_workers: int = Field(default=1, ge=1)
    source_batch_size: int = Field(default=1000, ge=1)
    expiry_check_seconds: float = Field(default=30.0, gt=0)

    # Retention (README "Retention"): the processor's sweep, at start and then every
    # retention_check_seconds. Days may be fractional.
    retention_check_seconds: float = Field(default=3600.0, gt=0)
    decision_log_margin_days: float = Field(default=1.0, ge=0)
    inbound_retention_days: float | None = Field(default=None, gt=0)  # default: status TTL
    dead_letter_retention_days: float = Field(default=30.0, gt=0)

    # Logging
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    # Authentication (README "Authentication"). Unset: none, and `serve`/`dev` refuse a
    # non-loopback host; "none" set explicitly opens the API wherever it is bound.
    auth: Literal["none", "api-key", "jwt"] | None = None
    api_keys_file: Path | None = None
    jwt_jwks_url: str | None = None
    jwt_public_key_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_algorithms: str = "RS256,ES256"  # comma-separated; asymmetric ones only
    jwt_leeway_seconds: float = Field(default=30.0, ge=0)
    jwt_jwks_cache_seconds: float = Field(default=300.0, gt=0)

    # Per-client quotas (README "Quotas"): token buckets per client id (per IP without
    # authentication) in each API worker; 0 = unlimited. A key file's own rates win.
    quota_writes_per_second: float = Field(default=1000.0, ge=0)  # trades
    quota_reads_per_second: float = Field(default=1000.0, ge=0)  # requests
    quota_burst_seconds: int = Field(default=2, ge=1)  # a bucket holds this many seconds' rate
    quota_max_clients: int = Field(default=10_000, ge=1)  # buckets kept per policy (LRU)

    # API reads and health (README "Health", "Guarantees"): an API worker's status reads
    # run on read_threads threads of its own, its trade reads in read_processes processes
    # (0: on those threads); at most max_waiting_reads more wait for each (then 429);
    # each health probe's result is reused for health_cache_seconds.
    read_threads: int = Field(default=2, ge=1)
    read_processes: int = Field(default=1, ge=0)
    max_waiting_reads: int = Field(default=64, ge=0)
    health_cache_seconds: float = Field(default=1.0, ge=0)

    # Hostile clients (README "Limits"): the HTTP server's own bounds, per API worker.
    max_header_bytes: int = Field(default=16_384, ge=1_024)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)  # an idle connection, then closed
    max_connections: int = Field(default=1_024, ge=1)

    @property
    def embedded(self) -> bool:
        return self.profile == "embedded"

    @property
    def trade_store_url(self) -> str:
        """PostgreSQL in the services profile, a SQLite file under data_dir when embedded."""
        if self.embedded:
            return f"sqlite:///{self.data_dir / 'trades.db'}"
        return self.database_url.get_secret_value()

    @property
    def recovery_path(self) -> Path:
        return self.recovery_dir or self.data_dir / "recovery"

    @property
    def inbound_retention(self) -> timedelta:
        """How long embedded log entries are kept after the processor passed them, so a
        replay stays possible within it."""
        return timedelta(days=self.inbound_retention_days or self.status_ttl_days)

    @property
    def decision_log_retention(self) -> timedelta:
        """Longer than any status and any log entry a replay could read (plus a margin):
        a replayed request must still find its logged outcome."""
        kept = max(timedelta(days=self.status_ttl_days), self.inbound_retention)
        return kept + timedelta(days=self.decision_log_margin_days)

    # The HTTP contract (README "The HTTP API"): URLs the API writes, proxies, browsers.
    # Link and Location are relative, or absolute from this base (never from the Host header).
    public_base_url: HttpUrl | None = None
    # Comma-separated addresses or networks whose X-Forwarded-For/-Proto uvicorn believes.
    trusted_proxies: str = ""
    # Comma-separated origins that browsers may call the API from; empty: CORS off.
    cors_origins: str = ""

    def public_url(self, path: str) -> str:
        """``path`` (with its query) as a client should follow it."""
        base = str(self.public_base_url).rstrip("/") if self.public_base_url else ""
        return base + path

    # Metrics (README "Metrics"): the processor's Prometheus endpoint; unset, none is served.
    # Each process of a cluster listens on this port + its --process-id.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"

    # Tracing (README "Tracing"): OpenTelemetry spans, off by default; "otlp" exports them by
    # OTLP/HTTP, to where the standard OTEL_EXPORTER_OTLP_* variables say (OTEL_SERVICE_NAME,
    # OTEL_TRACES_SAMPLER and the SDK's other variables apply too).
    tracing: Literal["off", "otlp"] = "off"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once on first use (not at import)."""
    return Settings()
