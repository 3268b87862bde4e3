# One image for the API and the processor (the command picks the role).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 UV_PROJECT_ENVIRONMENT=/opt/venv
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY . .
RUN uv sync --frozen --no-dev
ENV PATH=/opt/venv/bin:$PATH TRADE_STORE_HOST=0.0.0.0 TRADE_STORE_LOG_FORMAT=json
EXPOSE 8000
CMD ["trade-store", "serve"]
