"""The efficiency baseline: a bare FastAPI endpoint on the same stack as the real API.

It validates the very same pydantic model (``ingest_api.schemas.TradeIn``) and answers 202
with a body shaped like the real acknowledgement, but queues nothing and stores nothing.
It is served exactly as ``trade-store serve`` serves the real app (uvicorn, same workers,
no access log, no server header), so the CPU difference per request is what our
middleware, rules, queue and status writes cost.

    python -m bench.bare_app --port 8100 --workers 2
"""

from __future__ import annotations

import argparse
import uuid

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from ingest_api.schemas import TradeIn

app = FastAPI(title="bare baseline")


@app.post("/api/v1/trades", status_code=202)
async def submit_trade(body: TradeIn) -> Response:
    request_id = str(uuid.uuid4())
    return Response(
        orjson.dumps(
            {
                "request_id": request_id,
                "status": "PENDING",
                "trade_id": body.trade_id,
                "version": body.version,
            }
        ),
        202,
        headers={"Location": f"/api/v1/requests/{request_id}"},
        media_type="application/json",
    )


@app.get("/api/v1/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    # The same uvicorn options as cli.main's `serve`.
    uvicorn.run(
        "bench.bare_app:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
