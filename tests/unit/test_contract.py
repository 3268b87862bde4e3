"""The HTTP contract at the edge, on fakes of the ports: problem+json for every error, URLs
that never come from the Host header, the id grammar in paths, HEAD/OPTIONS/Allow, the
headers every answer carries, CORS, offline docs, and the OpenAPI document saying so."""

from __future__ import annotations

import base64
import gc
import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import date, timedelta
from typing import Any

import pytest
import structlog
import uvicorn
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from adapters.intake import PendingThenQueue
from adapters.wiring import Services
from cli.main import main
from config.clock import business_today
from config.settings import Settings, get_settings
from domain.ports import StoredTrade, Unavailable
from domain.trade import Trade
from ingest_api.app import create_app
from ingest_api.schemas import ID_SCHEMA
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore
from tests.support import upsert

TODAY = business_today("UTC")
PROBLEM = "application/problem+json"
JSON = {"content-type": "application/json"}
Serve = Callable[..., TestClient]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Clients of apps on fakes (``trades`` to seed, any settings); all closed at the end."""
    threshold = gc.get_threshold()
    with ExitStack() as clients:

        def make(trades: FakeTradeStore | None = None, **settings: Any) -> TestClient:
            statuses, queue = FakeStatusStore(), FakeQueue()
            app = create_app(
                Settings(**settings),
                services=lambda _: Services(
                    trades if trades is not None else FakeTradeStore(),
                    statuses,
                    queue,
                    PendingThenQueue(statuses, queue, FakeKeys()),
                ),
            )
            return clients.enter_context(TestClient(app, follow_redirects=False))

        yield make
    gc.unfreeze()  # the app tuned the collector for a server process, not for pytest
    gc.set_threshold(*threshold)


def trade(**overrides: object) -> dict[str, object]:
    return {
        "trade_id": "T1",
        "version": 1,
        "counterparty_id": "CP-1",
        "book_id": "B1",
        "maturity_date": (TODAY + timedelta(days=30)).isoformat(),
        **overrides,
    }


def seeded(*trade_ids: str) -> FakeTradeStore:
    trades = FakeTradeStore()
    maturity = TODAY + timedelta(days=1)
    upsert(trades, [Trade(t, 1, "CP-1", "B1", maturity, TODAY) for t in trade_ids])
    return trades


def is_problem(reply: Any, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status
    assert reply.headers["content-type"] == PROBLEM
    problem: dict[str, Any] = reply.json()
    assert (problem["status"], problem["code"]) == (status, code)
    return problem


# --- URLs -------------------------------------------------------------------------------


def test_link_and_location_never_echo_the_host_header(serve: Serve) -> None:
    client = serve(seeded("A", "B"))
    evil = {"Host": "evil.example"}
    page = client.get("/api/v1/trades?limit=1", headers=evil)
    assert page.headers["link"].startswith("</api/v1/trades?limit=1&after=")
    accepted = client.post("/api/v1/trades", json=trade(), headers=evil)
    assert accepted.headers["location"] == f"/api/v1/requests/{accepted.json()['request_id']}"
    # No trailing-slash redirect (it named the Host): a path that is not a route is a 404.
    for path in ("/api/v1/trades/", "/api/v1/trades/A/"):
        reply = client.get(path, headers=evil)
        is_problem(reply, 404, "NOT_FOUND")
        assert "location" not in reply.headers
        assert "evil" not in reply.text


def test_public_base_url_makes_link_and_location_absolute(serve: Serve) -> None:
    client = serve(seeded("A", "B"), public_base_url="https://trades.example.com/edge/")
    page = client.get("/api/v1/trades?limit=1&book_id=B1", headers={"Host": "evil.example"})
    assert page.headers["link"].startswith(
        "<https://trades.example.com/edge/api/v1/trades?limit=1&book_id=B1&after="
    )
    accepted = client.post("/api/v1/trades", json=trade())
    rid = accepted.json()["request_id"]
    assert accepted.headers["location"] == f"https://trades.example.com/edge/api/v1/requests/{rid}"


# --- Ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/api/v1/trades/FZ%2F", "/api/v1/trades/FZ%2Fx", "/api/v1/trades/%2F", "/api/v1/trades/FZ/"],
)
def test_a_trade_id_with_a_slash_is_404_never_another_trade(serve: Serve, path: str) -> None:
    reply = serve(seeded("FZ")).get(path)
    is_problem(reply, 404, "NOT_FOUND")
    assert "FZ" not in reply.text


def test_a_request_id_with_a_slash_is_404(serve: Serve) -> None:
    client = serve()
    rid = client.post("/api/v1/trades", json=trade()).json()["request_id"]
    for path in (f"/api/v1/requests/{rid}%2F", f"/api/v1/requests/{rid}%2Fx"):
        is_problem(client.get(path), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    "bad",
    [
        "FZ/1",
        "a\u202eb",  # right-to-left override
        "\u2066x",  # left-to-right isolate
        "a\u200bb",  # zero-width space
        "x\U000e0041",  # a tag character (invisible)
        "a\x1bb",  # ESC
        "\ud800",  # a lone surrogate, which JSON can spell
        "\ue000",  # private use
    ],
)
def test_ids_outside_the_grammar_are_422(serve: Serve, bad: str) -> None:
    body = json.dumps(trade(book_id=bad))  # ASCII: a lone surrogate only as an escape
    reply = serve().post("/api/v1/trades", content=body, headers=JSON)
    assert is_problem(reply, 422, "VALIDATION_ERROR")["field"] == "book_id"


def test_a_version_is_a_json_schema_integer(serve: Serve) -> None:
    """7.0 is the integer 7 to JSON Schema, and so to the API; 7.5, "7" and true are not."""
    client = serve()
    accepted = client.post("/api/v1/trades", json=trade(version=7.0))
    assert accepted.status_code == 202
    assert accepted.json()["version"] == 7
    for version in (7.5, "7", True):
        reply = client.post("/api/v1/trades", json=trade(version=version))
        assert is_problem(reply, 422, "VALIDATION_ERROR")["field"] == "version"


def test_ids_are_nfc_everywhere(serve: Serve) -> None:
    """One spelling of "é": the decomposed form submitted, filtered on or looked up is the
    composed one stored."""
    trades = FakeTradeStore()
    client = serve(trades)
    decomposed = "e\u0301"
    accepted = client.post("/api/v1/trades", json=trade(trade_id=decomposed, book_id=decomposed))
    assert accepted.status_code == 202
    assert accepted.json()["trade_id"] == "\xe9"
    upsert(trades, [Trade("\xe9", 1, "CP-1", "\xe9", TODAY + timedelta(days=1), TODAY)])
    assert client.get("/api/v1/trades/e%CC%81").json()[0]["trade_id"] == "\xe9"
    listed = client.get("/api/v1/trades", params={"book_id": f" {decomposed} "}).json()
    assert [r["trade_id"] for r in listed] == ["\xe9"]


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        (b"feed-42", True),
        ("caf\xe9".encode(), False),  # UTF-8 bytes, which latin-1 reads as "cafÃ©"
        ("caf\xe9".encode("latin-1"), False),
        (b"a/b", False),
    ],
)
def test_correlation_id_is_visible_ascii_or_a_fresh_one(
    serve: Serve, sent: bytes, echoed: bool
) -> None:
    reply = serve().get("/api/v1/health/live", headers={"X-Correlation-ID": sent})
    value = dict(reply.headers.raw)[b"x-correlation-id"]
    if echoed:
        assert value == sent
    else:
        assert re.fullmatch(rb"[0-9a-f]{32}", value)


# --- Every error is problem+json --------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"trade_id": "\xff\xfe"}',  # not UTF-8
        b"[" * 3000,  # nested deeper than the parser recurses
        b'{"version": ' + b"1" * 5000 + b"}",  # more digits than Python converts
    ],
    ids=["syntax", "utf-8", "depth", "long-int"],
)
def test_every_undecodable_body_is_422_malformed_json(serve: Serve, raw: bytes) -> None:
    reply = serve().post("/api/v1/trades", content=raw, headers=JSON)
    is_problem(reply, 422, "MALFORMED_JSON")


def test_a_crafted_cursor_is_400_not_500(serve: Serve) -> None:
    after = base64.urlsafe_b64encode(b"[" * 3000).decode()
    reply = serve().get("/api/v1/trades", params={"after": after})
    assert is_problem(reply, 400, "INVALID_CURSOR")["field"] == "after"


class BrokenTradeStore(FakeTradeStore):
    def versions(self, trade_id: str, today: date) -> list[StoredTrade]:
        raise RuntimeError("secret internal state")


def test_an_unexpected_exception_is_a_logged_500_problem(serve: Serve) -> None:
    client = serve(BrokenTradeStore())
    with capture_logs(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.format_exc_info]
    ) as logs:
        reply = client.get("/api/v1/trades/T1", headers={"X-Correlation-ID": "corr-500"})
    problem = is_problem(reply, 500, "INTERNAL_ERROR")
    assert "secret" not in reply.text
    assert problem["detail"].startswith("An unexpected error")
    assert reply.headers["x-correlation-id"] == "corr-500"
    [entry] = [e for e in logs if e["event"] == "unexpected error"]
    assert entry["log_level"] == "error"
    assert entry["correlation_id"] == "corr-500"
    assert "Traceback" in entry["exception"]
    assert "RuntimeError: secret internal state" in entry["exception"]


class LockedTradeStore(FakeTradeStore):
    def versions(self, trade_id: str, today: date) -> list[StoredTrade]:
        raise Unavailable("trade store: database is locked")


def test_a_503_names_the_dependency_and_logs_its_error(serve: Serve) -> None:
    client = serve(LockedTradeStore())
    with capture_logs() as logs:
        reply = client.get("/api/v1/trades/T1")
    problem = is_problem(reply, 503, "SERVICE_UNAVAILABLE")
    assert "locked" not in reply.text
    assert problem["detail"].startswith("The trade store is unavailable")
    [entry] = [e for e in logs if e["event"] == "dependency unavailable"]
    assert entry["log_level"] == "error"
    assert entry["error"] == "trade store: database is locked"


# --- Methods and headers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v1/trades", "/api/v1/trades/T1", "/api/v1/trades/none", "/api/v1/health"]
)
def test_head_answers_as_get_without_a_body(serve: Serve, path: str) -> None:
    client = serve(seeded("T1"))
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code
    assert head.content == b""
    for name in ("content-type", "content-length", "cache-control", "x-content-type-options"):
        assert head.headers[name] == got.headers[name]


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/api/v1/trades", "GET, HEAD, OPTIONS, POST"),
        ("/api/v1/trades/T1", "GET, HEAD, OPTIONS"),
        ("/api/v1/requests/r-1", "GET, HEAD, OPTIONS"),
        ("/docs", "GET, HEAD, OPTIONS"),
    ],
)
def test_options_and_405_list_every_method_of_the_path(serve: Serve, path: str, allow: str) -> None:
    client = serve()
    options = client.options(path)
    assert options.status_code == 204
    assert options.headers["allow"] == allow
    refused = client.request("PATCH", path)
    is_problem(refused, 405, "METHOD_NOT_ALLOWED")
    assert refused.headers["allow"] == allow


def test_options_on_an_unknown_path_is_404(serve: Serve) -> None:
    is_problem(serve().options("/api/v1/nowhere"), 404, "NOT_FOUND")


def test_answers_say_nosniff_and_no_store(serve: Serve) -> None:
    client = serve()
    replies = [
        client.post("/api/v1/trades", json=trade()),
        client.post("/api/v1/trades", json={}),
        client.get("/api/v1/trades/none"),
        client.get("/openapi.json"),
        client.options("/api/v1/trades"),
    ]
    for reply in replies:
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["cache-control"] == "no-store"
    asset = client.get("/docs-assets/swagger-ui.css")
    assert asset.headers["x-content-type-options"] == "nosniff"
    assert "cache-control" not in asset.headers


ORIGIN = "https://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}


def test_cors_is_off_by_default(serve: Serve) -> None:
    client = serve()
    assert (
        "access-control-allow-origin"
        not in client.get("/api/v1/trades", headers={"Origin": ORIGIN}).headers
    )
    preflight = client.options("/api/v1/trades", headers=PREFLIGHT)
    assert preflight.status_code == 204
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_listed_origins(serve: Serve) -> None:
    client = serve(cors_origins=f"{ORIGIN}, https://other.example")
    simple = client.post("/api/v1/trades", json=trade(), headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "Location" in simple.headers["access-control-expose-headers"]
    preflight = client.options("/api/v1/trades", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    refused = client.options(
        "/api/v1/trades", headers={**PREFLIGHT, "Origin": "https://evil.example"}
    )
    is_problem(refused, 400, "CORS_REFUSED")
    assert "access-control-allow-origin" not in refused.headers
    stranger = client.get("/api/v1/trades", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in stranger.headers


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_the_api_serves(serve: Serve, page: str) -> None:
    """Nothing from another host, so the page works offline; the assets are there."""
    client = serve()
    html = client.get(page)
    assert html.status_code == 200
    assert "://" not in html.text
    if page == "/docs":
        assert '"validatorUrl": null' in html.text  # Swagger UI would ask an online validator
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
    assert any(u.endswith(".js") for u in urls)
    for url in [*urls, "/openapi.json"]:
        assert url.startswith("/")
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url


@pytest.mark.parametrize(
    ("trusted", "options"),
    [
        ("", {"proxy_headers": False, "forwarded_allow_ips": None}),
        (
            "10.0.0.0/8,10.1.2.3",
            {"proxy_headers": True, "forwarded_allow_ips": "10.0.0.0/8,10.1.2.3"},
        ),
    ],
)
def test_forwarded_headers_are_believed_only_from_trusted_proxies(
    monkeypatch: pytest.MonkeyPatch, trusted: str, options: dict[str, object]
) -> None:
    """uvicorn's own default believes X-Forwarded-* from 127.0.0.1, i.e. any local client."""
    seen: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *_, **kwargs: seen.append(kwargs))
    monkeypatch.setenv("TRADE_STORE_TRUSTED_PROXIES", trusted)
    try:
        assert main(["serve", "--no-migrate"]) == 0
    finally:
        get_settings.cache_clear()  # main() read them from the patched environment
    assert {k: seen[0][k] for k in options} == options


# --- The OpenAPI document ---------------------------------------------------------------


@pytest.fixture
def document(serve: Serve) -> dict[str, Any]:
    doc: dict[str, Any] = serve().get("/openapi.json").json()
    return doc


def test_every_error_is_documented_as_a_problem(document: dict[str, Any]) -> None:
    assert "Problem" in document["components"]["schemas"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/api/v1/health":
                    assert set(answer["content"]) == {PROBLEM}, (method, path, status)
                    assert answer["content"][PROBLEM]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }
                assert {"X-Correlation-ID", "Server-Timing"} <= set(answer["headers"])


def test_headers_links_and_the_id_grammar_are_documented(document: dict[str, Any]) -> None:
    paths = document["paths"]
    submit = paths["/api/v1/trades"]["post"]["responses"]
    assert submit["202"]["headers"]["Location"]["required"] is True
    assert set(submit["202"]["links"]) == {"GetRequest"}
    status = paths["/api/v1/requests/{request_id}"]["get"]["responses"]["200"]
    assert set(status["links"]) == {"GetTrade"}
    assert "Retry-After" in submit["429"]["headers"]
    assert "Retry-After" in submit["503"]["headers"]
    assert "Link" in paths["/api/v1/trades"]["get"]["responses"]["200"]["headers"]
    body = document["components"]["schemas"]["TradeIn"]["properties"]
    assert body["trade_id"]["pattern"] == ID_SCHEMA["pattern"]
    assert (body["version"]["minimum"], body["version"]["maximum"]) == (1, 2**31 - 1)
    [trade_id] = paths["/api/v1/trades/{trade_id}"]["get"]["parameters"]
    assert trade_id["schema"]["pattern"] == ID_SCHEMA["pattern"]
    query = {p["name"]: p["schema"] for p in paths["/api/v1/trades"]["get"]["parameters"]}
    assert query["book_id"]["pattern"] == ID_SCHEMA["pattern"]
    assert all("anyOf" not in schema for schema in query.values())  # absent, never null
