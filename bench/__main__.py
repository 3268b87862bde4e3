"""``python -m bench``: the project's benchmark (issue #4); see bench/README.md."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from bench.run import main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Throughput, latency and sink rate of the trade store, side by side with"
        " the machine's own ceilings. Targets only 127.0.0.1; every phase is bounded.",
    )
    p.add_argument("--profile", choices=["embedded", "services"], default="embedded")
    p.add_argument("--quick", action="store_true", help="CI smoke run, under 3 minutes")
    p.add_argument("--out", default="bench/results/latest.json", help="result JSON path")
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn workers (default 2)")
    p.add_argument("--processor-workers", type=int, default=1, help="Bytewax workers")
    p.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    p.add_argument(
        "--sink-messages",
        type=int,
        help="pre-loaded trades of the sink and of each scale shape (full: 200,000)",
    )
    p.add_argument(
        "--cpu-rate",
        type=float,
        help="rate of the CPU-per-request runs (default: min(1,000, 0.8 x api_max_rps))",
    )
    p.add_argument(
        "--phases",
        default="api,e2e,batch,ndjson,overload,sink,scale,replay",
        help="comma-separated subset of api,e2e,batch,ndjson,overload,sink,scale,replay",
    )
    p.add_argument(
        "--app-root",
        help="run the API and processor from another checkout (A/B runs on the same venv)",
    )
    p.add_argument("--keep", action="store_true", help="keep logs and data of the run")
    p.add_argument(
        "--keep-services", action="store_true", help="leave services this run started running"
    )
    return p


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Started in the background SIGINT may be ignored, and children would inherit that; a
    # handler here is reset to the default in every child we start. SIGTERM cleans up too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main(parser().parse_args()))
