# One image for the API, the processor and the migration; the command picks the role:
#   trade-store serve (the default) | trade-store process | trade-store migrate
# Builder: uv installs the locked runtime dependencies and the project (as a wheel, not an
# editable link to the sources) into /opt/venv. Runtime: the same base, the venv, a non-root user.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
# dependencies first: this layer is rebuilt only when the lock changes
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY domain/ domain/
COPY config/ config/
COPY adapters/ adapters/
COPY ingest_api/ ingest_api/
COPY sources/ sources/
COPY dataflows/ dataflows/
COPY sinks/ sinks/
COPY migrations/ migrations/
COPY cli/ cli/
RUN uv sync --frozen --no-dev --no-editable

FROM ${PYTHON_IMAGE} AS runtime
# Bound beyond loopback, so the API authenticates: API keys from the key file below (made
# by `trade-store keys add`; docker-compose.yml keeps it on a volume), or set
# TRADE_STORE_AUTH=jwt and its TRADE_STORE_JWT_* settings (README: Authentication).
# The key file's path is no secret (the file holds only hashes of the keys):
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    TRADE_STORE_HOST=0.0.0.0 TRADE_STORE_PORT=8000 TRADE_STORE_LOG_FORMAT=json \
    TRADE_STORE_AUTH=api-key TRADE_STORE_API_KEYS_FILE=/etc/trade-store/api-keys
RUN groupadd --system --gid 10001 trade-store \
    && useradd --system --uid 10001 --gid trade-store --no-log-init \
       --home-dir /var/lib/trade-store --create-home --shell /usr/sbin/nologin trade-store \
    && install -d -o 10001 -g 10001 -m 700 /etc/trade-store
COPY --from=builder /opt/venv /opt/venv
# embedded data and recovery snapshots default to here (a volume in docker-compose.yml)
WORKDIR /var/lib/trade-store
USER 10001:10001
EXPOSE 8000
# the API's liveness route; the processor and the migration turn it off (docker-compose.yml)
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/v1/health/live' % os.environ.get('TRADE_STORE_PORT', '8000'), timeout=2)"]
CMD ["trade-store", "serve"]
