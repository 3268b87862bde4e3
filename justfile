# Recipes wrap the scripts; `just` alone lists them. (`.venv/bin/just` after scripts/bootstrap.)

default:
    @just --list

# Run API + processor (embedded by default; `just run --profile services`)
run *ARGS:
    scripts/run {{ARGS}}

# Lint, types, audit and the whole test suite on real services
test *ARGS:
    scripts/test {{ARGS}}

# Start/stop/inspect PostgreSQL, Kafka and dynoxide (DynamoDB)
services ACTION="up":
    scripts/services {{ACTION}}

# Benchmarks (see bench/README.md)
bench *ARGS:
    scripts/bench {{ARGS}}

# Create the venv from uv.lock
bootstrap:
    scripts/bootstrap

# Format and autofix
fmt:
    .venv/bin/ruff format .
    .venv/bin/ruff check --fix .

# Audit the locked dependencies
audit:
    scripts/audit
