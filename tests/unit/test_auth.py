"""Authentication and scopes through the ASGI app, on the fakes: none / api-key / jwt ×
every scope × every route, a client reading another client's request, Bearer and X-API-Key,
bad tokens of every kind, a JWKS served on 127.0.0.1 (and cached), a public key file, the
key file read again when it changes, the loopback refusal and `trade-store keys add`."""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import http.server
import json
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from adapters.intake import PendingThenQueue
from adapters.wiring import Services
from cli.main import _refuses_auth, main
from config.clock import business_today
from config.settings import Settings, get_settings
from domain.status import Batch, RequestState, RequestStatus
from domain.trade import Trade
from ingest_api import auth
from ingest_api.app import create_app
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore
from tests.support import upsert

TODAY = business_today("UTC")
ISSUER = "https://issuer.test/"
AUDIENCE = "trade-store-api"
ROUTES = {  # route -> the scope it needs, and its answer when held
    ("POST", "/api/v1/trades"): (auth.TRADES_WRITE, 202),
    ("GET", "/api/v1/trades"): (auth.TRADES_READ, 200),
    ("GET", "/api/v1/trades/T1"): (auth.TRADES_READ, 200),
    ("GET", "/api/v1/requests/{own}"): (auth.REQUESTS_READ, 200),
    ("GET", "/api/v1/requests?ids={own}"): (auth.REQUESTS_READ, 200),
    ("GET", "/api/v1/batches/{own_batch}"): (auth.REQUESTS_READ, 200),
    ("GET", "/api/v1/batches/{own_batch}/items"): (auth.REQUESTS_READ, 200),
}


def trade_body() -> dict[str, object]:
    return {
        "trade_id": "T9",
        "version": 1,
        "counterparty_id": "CP-1",
        "book_id": "B1",
        "maturity_date": (TODAY + timedelta(days=30)).isoformat(),
    }


def client_of(scope: str) -> str:
    return f"c-{scope}"


def request_of(client_id: str) -> str:
    """The id of the request seeded as submitted by ``client_id``."""
    return f"r-{client_id}"


def batch_of(client_id: str) -> str:
    """The id of the batch seeded as submitted by ``client_id`` (its one item: the request)."""
    return f"b-{client_id}"


@dataclass
class Api:
    http: TestClient
    statuses: FakeStatusStore
    queue: FakeQueue

    def call(self, method: str, path: str, headers: dict[str, str], owner: str) -> Any:
        path = path.replace("{own}", request_of(owner)).replace("{own_batch}", batch_of(owner))
        if method == "POST":
            return self.http.post(path, json=trade_body(), headers=headers)
        return self.http.get(path, headers=headers)


@contextmanager
def running(settings: Settings) -> Iterator[Api]:
    trades, statuses, queue = FakeTradeStore(), FakeStatusStore(), FakeQueue()
    upsert(
        trades, [Trade("T1", 1, "CP-1", "B1", TODAY + timedelta(days=30), TODAY)]
    )  # GET /trades/T1 has a row
    at = datetime.now(UTC)
    for owner in [*(client_of(s) for s in auth.SCOPES), "writer", "other", None]:
        rid = request_of(str(owner))
        batch = Batch(batch_of(str(owner)), at, 1, owner)
        statuses.items[rid] = RequestStatus(
            rid, RequestState.PENDING, "T1", 1, at, at, None, None, owner, batch.batch_id, 0
        )
        statuses.batches[batch.batch_id] = batch
    app = create_app(
        settings,
        services=lambda _: Services(
            trades, statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    threshold = gc.get_threshold()
    with TestClient(app) as http:
        yield Api(http, statuses, queue)
    gc.unfreeze()  # the app tuned the collector for a server process, not for pytest
    gc.set_threshold(*threshold)


# --- keys and tokens ---------------------------------------------------------------------


def key_of(client_id: str) -> str:
    return f"key-of-{client_id}"


def key_line(client_id: str, scopes: str, extra: str = "") -> str:
    digest = hashlib.sha256(key_of(client_id).encode()).hexdigest()
    return f"{client_id} {scopes} {digest} {extra}".rstrip()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    lines = [
        "# one line per key",
        *(key_line(client_of(s), s) for s in auth.SCOPES),
        "",
        key_line("writer", "trades:write,requests:read", "200/50"),
        key_line("other", "trades:write,requests:read"),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class Signer:
    """An issuer's RSA key pair, publishing its public half under ``kid``."""

    kid: str
    private: rsa.RSAPrivateKey

    @classmethod
    def new(cls, kid: str) -> Signer:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        key: dict[str, Any] = json.loads(
            jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key())
        )
        return {**key, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def token(self, scope: str = "", sub: str | None = "svc", **claims: Any) -> str:
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": int(time.time()) + 300,
            "scope": scope,
            **claims,
        }
        if sub is not None:
            payload["sub"] = sub
        return jwt.encode(payload, self.private, algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.new("k1")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Jwks(http.server.ThreadingHTTPServer):
    """An identity provider's key set on 127.0.0.1, counting how often it is fetched."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        jwks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.fetches += 1
                body = json.dumps({"keys": jwks.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/.well-known/jwks.json"


@pytest.fixture
def jwks(signer: Signer) -> Iterator[Jwks]:
    server = Jwks()
    server.keys = [signer.jwk()]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def jwt_settings(**overrides: Any) -> Settings:
    values = {"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, "jwt_leeway_seconds": 0}
    return Settings(auth="jwt", **(values | overrides))


# --- the matrix ----------------------------------------------------------------------------


@pytest.fixture(params=["api-key", "jwt-jwks", "jwt-public-key-file"])
def mode(
    request: pytest.FixtureRequest, key_file: Path, signer: Signer, tmp_path: Path
) -> Iterator[tuple[Api, Any]]:
    """A running app in one mode, and how a client of given scopes authenticates in it."""
    if request.param == "api-key":
        with running(Settings(auth="api-key", api_keys_file=key_file)) as api:
            yield api, lambda client_id, scope: {"X-API-Key": key_of(client_id)}
        return
    if request.param == "jwt-jwks":
        settings = jwt_settings(jwt_jwks_url=request.getfixturevalue("jwks").url)
    else:
        pem = tmp_path / "issuer.pem"
        pem.write_bytes(signer.pem())
        settings = jwt_settings(jwt_public_key_file=pem)
    with running(settings) as api:
        yield api, lambda client_id, scope: bearer(signer.token(scope, sub=client_id))


@pytest.mark.parametrize("route", list(ROUTES), ids=" ".join)
@pytest.mark.parametrize("scope", auth.SCOPES)
def test_each_scope_opens_exactly_its_routes(
    mode: tuple[Api, Any], route: tuple[str, str], scope: str
) -> None:
    api, credentials = mode
    needed, answer = ROUTES[route]
    client_id = client_of(scope)
    reply = api.call(*route, credentials(client_id, scope), owner=client_id)
    if needed == scope or (scope, needed) == (auth.REQUESTS_READ_ANY, auth.REQUESTS_READ):
        assert reply.status_code == answer, reply.text
        return
    assert reply.status_code == 403
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["code"] == "FORBIDDEN"
    assert reply.headers["www-authenticate"] == (
        f'Bearer realm="trade-store", error="insufficient_scope", scope="{needed}"'
    )


@pytest.mark.parametrize("route", list(ROUTES), ids=" ".join)
def test_no_credentials_is_401_on_every_route(
    mode: tuple[Api, Any], route: tuple[str, str]
) -> None:
    api, _ = mode
    reply = api.call(*route, {}, owner="writer")
    assert reply.status_code == 401
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["code"] == "UNAUTHENTICATED"
    assert reply.headers["www-authenticate"] == 'Bearer realm="trade-store"'
    assert api.queue.messages == []


@pytest.mark.parametrize("route", list(ROUTES), ids=" ".join)
def test_auth_none_lets_everyone_in(route: tuple[str, str]) -> None:
    with running(Settings(auth="none")) as api:
        reply = api.call(*route, {}, owner="None")
        assert reply.status_code == ROUTES[route][1]


def test_a_client_sees_only_its_own_requests(mode: tuple[Api, Any]) -> None:
    api, credentials = mode
    as_writer = credentials("writer", "trades:write requests:read")
    as_other = credentials("other", "trades:write requests:read")
    submitted = api.http.post("/api/v1/trades", json=trade_body(), headers=as_writer)
    assert submitted.status_code == 202
    location = submitted.headers["location"]
    assert api.statuses.items[submitted.json()["request_id"]].client_id == "writer"
    assert api.http.get(location, headers=as_writer).status_code == 200

    theirs = api.http.get(location, headers=as_other)
    unknown = api.http.get("/api/v1/requests/no-such-request", headers=as_other)
    assert theirs.status_code == unknown.status_code == 404
    # Nothing tells another client's request from one that does not exist.
    assert theirs.json() == {**unknown.json(), "title": theirs.json()["title"]}
    assert theirs.json()["title"] == "No such request"
    assert theirs.headers.keys() - {"x-correlation-id", "server-timing"} == (
        unknown.headers.keys() - {"x-correlation-id", "server-timing"}
    )
    # A request from before authentication (no client) is nobody's to read, but :any's.
    assert api.http.get("/api/v1/requests/r-None", headers=as_writer).status_code == 404

    auditor = credentials(client_of(auth.REQUESTS_READ_ANY), auth.REQUESTS_READ_ANY)
    assert api.http.get(location, headers=auditor).json()["status"] == "PENDING"
    assert api.http.get("/api/v1/requests/r-None", headers=auditor).status_code == 200


def test_a_client_sees_only_its_own_requests_in_bulk_and_its_own_batches(
    mode: tuple[Api, Any],
) -> None:
    """Another client's requests are missing and its batches unknown, like those that do
    not exist; ``requests:read:any`` sees them all."""
    api, credentials = mode
    as_writer = credentials("writer", "requests:read")
    ids = ",".join([request_of("other"), request_of("writer"), "no-such-request"])
    bulk = api.http.get(f"/api/v1/requests?ids={ids}", headers=as_writer).json()
    assert [r["request_id"] for r in bulk["requests"]] == [request_of("writer")]
    assert bulk["missing"] == [request_of("other"), "no-such-request"]
    for path in ("/api/v1/batches/{}", "/api/v1/batches/{}/items"):
        theirs = api.http.get(path.format(batch_of("other")), headers=as_writer)
        unknown = api.http.get(path.format("no-such-batch"), headers=as_writer)
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json() == unknown.json()
        mine = api.http.get(path.format(batch_of("writer")), headers=as_writer)
        assert mine.status_code == 200
    items = api.http.get(f"/api/v1/batches/{batch_of('writer')}/items", headers=as_writer)
    assert [i["request_id"] for i in items.json()] == [request_of("writer")]
    auditor = credentials(client_of(auth.REQUESTS_READ_ANY), auth.REQUESTS_READ_ANY)
    everyone = api.http.get(f"/api/v1/requests?ids={ids}", headers=auditor).json()
    assert everyone["missing"] == ["no-such-request"]
    progress = api.http.get(f"/api/v1/batches/{batch_of('other')}", headers=auditor).json()
    assert (progress["total"], progress["pending"]) == (1, 1)


def test_the_client_outlives_the_outcome(mode: tuple[Api, Any]) -> None:
    """The owner still reads its request once it is terminal; another client still cannot."""
    api, credentials = mode
    as_writer = credentials("writer", "requests:read")
    rid = request_of("writer")
    old = api.statuses.items[rid]
    api.statuses.items[rid] = replace(old, state=RequestState.SUCCESS)
    assert api.http.get(f"/api/v1/requests/{rid}", headers=as_writer).json()["status"] == "SUCCESS"
    as_other = credentials("other", "requests:read")
    assert api.http.get(f"/api/v1/requests/{rid}", headers=as_other).status_code == 404


def test_health_shows_its_parts_only_to_authenticated_callers(mode: tuple[Api, Any]) -> None:
    api, credentials = mode
    assert api.http.get("/api/v1/health/live").json() == {"status": "ok"}
    assert api.http.get("/api/v1/health").json() == {"status": "ok"}
    assert api.http.get("/api/v1/health", headers={"X-API-Key": "nope"}).json() == {"status": "ok"}
    known = api.http.get("/api/v1/health", headers=credentials("other", auth.TRADES_READ))
    assert known.json() == {"status": "ok", "db": "ok", "kafka": "ok", "status_store": "ok"}
    with running(Settings(auth="none")) as open_api:
        assert open_api.http.get("/api/v1/health").json()["db"] == "ok"


# --- api-key --------------------------------------------------------------------------------


def test_a_key_is_taken_as_bearer_or_x_api_key(key_file: Path) -> None:
    with running(Settings(auth="api-key", api_keys_file=key_file)) as api:
        for headers in (bearer(key_of("writer")), {"X-API-Key": key_of("writer")}):
            assert (
                api.http.post("/api/v1/trades", json=trade_body(), headers=headers).status_code
                == 202
            )
        assert {api.statuses.items[m.request_id].client_id for m in api.queue.messages} == {
            "writer"
        }


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"X-API-Key": "key-of-nobody"}, "X-API-Key"),
        (bearer("key-of-nobody"), "Authorization"),
        (bearer(hashlib.sha256(b"key-of-writer").hexdigest()), "Authorization"),  # the hash
        ({"X-API-Key": key_of("writer") + "x"}, "X-API-Key"),
    ],
)
def test_a_wrong_key_is_401_invalid_token(
    key_file: Path, headers: dict[str, str], field: str
) -> None:
    with running(Settings(auth="api-key", api_keys_file=key_file)) as api:
        reply = api.http.post("/api/v1/trades", json=trade_body(), headers=headers)
    assert reply.status_code == 401
    problem = reply.json()
    assert (problem["code"], problem["field"]) == ("UNAUTHENTICATED", field)
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]
    assert key_of("writer") not in reply.text


def test_basic_credentials_are_no_credentials(key_file: Path) -> None:
    with running(Settings(auth="api-key", api_keys_file=key_file)) as api:
        basic = "Basic " + base64.b64encode(b"writer:" + key_of("writer").encode()).decode()
        reply = api.http.get("/api/v1/trades", headers={"Authorization": basic})
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="trade-store"'


def test_the_key_file_is_read_again_when_it_changes(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "KEY_FILE_RECHECK_S", 0.0)
    with running(Settings(auth="api-key", api_keys_file=key_file)) as api:
        new_key = auth.add_key(key_file, "late", frozenset({auth.TRADES_READ}), None)
        assert api.http.get("/api/v1/trades", headers=bearer(new_key)).status_code == 200
        # Revoked: the writer's line removed.
        kept = [line for line in key_file.read_text().splitlines() if not line.startswith("writer")]
        key_file.write_text("\n".join(kept) + "\n")
        assert api.http.get("/api/v1/health", headers=bearer(key_of("writer"))).json() == {
            "status": "ok"
        }
        # A broken file keeps the keys read before.
        key_file.write_text("not a key line\n")
        assert api.http.get("/api/v1/trades", headers=bearer(new_key)).status_code == 200


def test_key_file_lines_carry_quotas() -> None:
    line = auth.parse_key_line(key_line("writer", "trades:write,requests:read:any", "200/50"))
    assert line.client == auth.Client(
        "writer",
        frozenset({"trades:write", "requests:read:any", "requests:read"}),
        write_rate=200.0,
        read_rate=50.0,
    )
    assert line.digest == hashlib.sha256(key_of("writer").encode()).digest()
    assert auth.parse_key_line(key_line("r", "trades:read")).client.write_rate is None


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("writer trades:write", "expected"),
        ("writer trades:wirte " + "0" * 64, "scopes must be among"),
        ("writer trades:write " + "0" * 63, "64 hexadecimal"),
        ("writer trades:write " + "g" * 64, "64 hexadecimal"),
        ("writer trades:write " + "0" * 64 + " 200", "WRITES/READS"),
        ("writer trades:write " + "0" * 64 + " 0/5", "above 0"),
        ("writer trades:write " + "0" * 64 + " 1/inf", "above 0"),
        ("x" * 65 + " trades:write " + "0" * 64, "client id"),
    ],
)
def test_a_bad_key_file_stops_the_start(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# fine\n{line}\n")
    with pytest.raises(auth.AuthSetupError, match=f"line 2: .*{says}"):
        auth.authenticator(Settings(auth="api-key", api_keys_file=path))


def test_api_key_mode_needs_a_readable_key_file(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthSetupError, match="TRADE_STORE_API_KEYS_FILE"):
        auth.authenticator(Settings(auth="api-key"))
    with pytest.raises(auth.AuthSetupError, match="cannot read"):
        auth.authenticator(Settings(auth="api-key", api_keys_file=tmp_path / "absent"))


# --- jwt ------------------------------------------------------------------------------------


def forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), "sha256").digest() if secret else b""
    return f"{signing_input}.{b64(signature)}"


def bad_tokens(signer: Signer) -> dict[str, str]:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "exp": int(time.time()) + 300}
    stranger = Signer.new(signer.kid)  # same kid, another key
    return {
        "expired": signer.token(auth.TRADES_READ, exp=int(time.time()) - 60),
        "wrong issuer": signer.token(auth.TRADES_READ, iss="https://evil.test/"),
        "wrong audience": signer.token(auth.TRADES_READ, aud="another-api"),
        "signed by another key": stranger.token(auth.TRADES_READ),
        "no expiry": jwt.encode(
            {k: v for k, v in claims.items() if k != "exp"},
            signer.private,
            algorithm="RS256",
            headers={"kid": signer.kid},
        ),
        "no client": signer.token(auth.TRADES_READ, sub=None),
        "alg none": forged({"alg": "none", "kid": signer.kid}, claims),
        "HS256 with the public key as secret": forged(
            {"alg": "HS256", "kid": signer.kid}, claims, signer.pem()
        ),
        "kid not a string": forged({"alg": "RS256", "kid": ["k1"]}, claims, b"x"),
        "not a token": "abc.def.ghi",
        "not even dots": "garbage",
    }


TOKEN_TITLES = {
    "expired": "The token has expired",
    "wrong issuer": "The token's issuer is not accepted",
    "wrong audience": "The token's audience is not accepted",
    "no client": "The token names no client (sub or client_id)",
}


BAD_TOKENS = [
    "expired",
    "wrong issuer",
    "wrong audience",
    "signed by another key",
    "no expiry",
    "no client",
    "alg none",
    "HS256 with the public key as secret",
    "kid not a string",
    "not a token",
    "not even dots",
]


@pytest.mark.parametrize("kind", BAD_TOKENS)
@pytest.mark.parametrize("source", ["jwks", "public-key-file"])
def test_a_bad_token_is_401_invalid_token(
    kind: str, source: str, signer: Signer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if source == "jwks":
        settings = jwt_settings(jwt_jwks_url=request.getfixturevalue("jwks").url)
    else:
        (tmp_path / "issuer.pem").write_bytes(signer.pem())
        settings = jwt_settings(jwt_public_key_file=tmp_path / "issuer.pem")
    with running(settings) as api:
        reply = api.http.get("/api/v1/trades", headers=bearer(bad_tokens(signer)[kind]))
    assert reply.status_code == 401, kind
    problem = reply.json()
    assert (problem["code"], problem["field"]) == ("UNAUTHENTICATED", "Authorization")
    title = TOKEN_TITLES.get(kind, "The token is not valid")
    assert problem["title"] == title
    assert reply.headers["www-authenticate"] == (
        f'Bearer realm="trade-store", error="invalid_token", error_description="{title}"'
    )


def test_a_key_set_token_must_name_its_key(jwks: Jwks, signer: Signer, tmp_path: Path) -> None:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "exp": int(time.time()) + 300}
    unnamed = jwt.encode({**claims, "scope": "trades:read"}, signer.private, algorithm="RS256")
    with running(jwt_settings(jwt_jwks_url=jwks.url)) as api:
        reply = api.http.get("/api/v1/trades", headers=bearer(unnamed))
        assert (reply.status_code, reply.json()["title"]) == (401, "The token is not valid")
    (tmp_path / "issuer.pem").write_bytes(signer.pem())  # one key: no kid needed
    with running(jwt_settings(jwt_public_key_file=tmp_path / "issuer.pem")) as api:
        assert api.http.get("/api/v1/trades", headers=bearer(unnamed)).status_code == 200


def test_client_id_claim_stands_in_for_sub(jwks: Jwks, signer: Signer) -> None:
    with running(jwt_settings(jwt_jwks_url=jwks.url)) as api:
        token = signer.token("trades:write", sub=None, client_id="machine-7")
        reply = api.http.post("/api/v1/trades", json=trade_body(), headers=bearer(token))
        assert reply.status_code == 202
        assert api.statuses.items[reply.json()["request_id"]].client_id == "machine-7"


def test_scopes_come_from_the_space_separated_scope_claim(jwks: Jwks, signer: Signer) -> None:
    with running(jwt_settings(jwt_jwks_url=jwks.url)) as api:
        token = signer.token("openid trades:read profile trades:write")
        assert api.http.get("/api/v1/trades", headers=bearer(token)).status_code == 200
        assert (
            api.http.post("/api/v1/trades", json=trade_body(), headers=bearer(token)).status_code
            == 202
        )
        no_scope = signer.token("openid")
        assert api.http.get("/api/v1/trades", headers=bearer(no_scope)).status_code == 403


def test_the_key_set_is_fetched_once_and_again_for_a_new_key(
    jwks: Jwks, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "JWKS_REFRESH_COOLDOWN_S", 0.0)
    with running(jwt_settings(jwt_jwks_url=jwks.url)) as api:
        assert jwks.fetches == 0  # nothing fetched before the first token
        for _ in range(5):
            reply = api.http.get("/api/v1/trades", headers=bearer(signer.token("trades:read")))
            assert reply.status_code == 200
        assert jwks.fetches == 1
        rotated = Signer.new("k2")
        jwks.keys = [signer.jwk(), rotated.jwk()]
        for _ in range(3):
            reply = api.http.get("/api/v1/trades", headers=bearer(rotated.token("trades:read")))
            assert reply.status_code == 200
        assert jwks.fetches == 2
        assert (
            api.http.get("/api/v1/trades", headers=bearer(signer.token("trades:read"))).status_code
            == 200
        )
        assert jwks.fetches == 2


def test_made_up_key_ids_do_not_make_the_api_fetch_the_key_set(jwks: Jwks, signer: Signer) -> None:
    """Within PyJWT's cooldown after a fetch, an unknown kid is refused from the cached set."""
    with running(jwt_settings(jwt_jwks_url=jwks.url)) as api:
        assert (
            api.http.get("/api/v1/trades", headers=bearer(signer.token("trades:read"))).status_code
            == 200
        )
        for n in range(20):
            made_up = Signer(f"made-up-{n}", signer.private).token("trades:read")
            assert api.http.get("/api/v1/trades", headers=bearer(made_up)).status_code == 401
    assert jwks.fetches == 1


def test_an_unreachable_key_set_is_503_for_keys_not_yet_known(signer: Signer) -> None:
    with running(jwt_settings(jwt_jwks_url="http://127.0.0.1:1/jwks.json")) as api:
        reply = api.http.get("/api/v1/trades", headers=bearer(signer.token("trades:read")))
    assert reply.status_code == 503
    assert reply.json()["code"] == "SERVICE_UNAVAILABLE"
    assert "127.0.0.1" not in reply.text


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"jwt_issuer": None}, "TRADE_STORE_JWT_ISSUER"),
        ({"jwt_audience": None}, "TRADE_STORE_JWT_AUDIENCE"),
        ({}, "exactly one of"),
        ({"jwt_jwks_url": "http://x", "jwt_public_key_file": Path("k.pem")}, "exactly one of"),
        ({"jwt_jwks_url": "http://x", "jwt_algorithms": "RS256,HS256"}, "refused: HS256"),
        ({"jwt_jwks_url": "http://x", "jwt_algorithms": "none"}, "refused: none"),
        ({"jwt_public_key_file": Path("/nonexistent.pem")}, "cannot read a PEM public key"),
    ],
)
def test_jwt_settings_that_cannot_work_stop_the_start(overrides: dict[str, Any], says: str) -> None:
    with pytest.raises(auth.AuthSetupError, match=says):
        auth.authenticator(jwt_settings(**overrides))


# --- loopback, and `keys add` ------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("api.example", False),
    ],
)
def test_loopback(host: str, expected: bool) -> None:
    assert auth.loopback(host) is expected


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A clean TRADE_STORE_* environment for the CLI; its cached settings dropped after."""
    for name in ("TRADE_STORE_AUTH", "TRADE_STORE_API_KEYS_FILE", "TRADE_STORE_HOST"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    get_settings.cache_clear()


@pytest.mark.parametrize("command", ["serve", "dev"])
def test_serving_beyond_loopback_needs_auth_or_an_explicit_none(
    command: str, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    env.setenv("TRADE_STORE_DATA_DIR", str(tmp_path / "data"))
    assert main([command, "--host", "0.0.0.0"]) == 2
    assert not (tmp_path / "data").exists()  # refused before anything started or migrated
    error = capsys.readouterr().err
    assert f"trade-store {command}: refusing to start: 0.0.0.0 is not a loopback" in error
    assert "TRADE_STORE_AUTH" in error
    env.setenv("TRADE_STORE_HOST", "10.1.2.3")
    assert main([command]) == 2
    assert "10.1.2.3 is not a loopback" in capsys.readouterr().err


def test_what_may_serve_where(tmp_path: Path, key_file: Path) -> None:
    anywhere = "0.0.0.0"
    assert not _refuses_auth(Settings(), "127.0.0.1", "serve")
    assert _refuses_auth(Settings(), anywhere, "serve")
    assert not _refuses_auth(Settings(auth="none"), anywhere, "serve")
    assert not _refuses_auth(Settings(auth="api-key", api_keys_file=key_file), anywhere, "serve")
    assert _refuses_auth(Settings(auth="api-key", api_keys_file=tmp_path / "no"), anywhere, "serve")
    assert _refuses_auth(Settings(auth="jwt"), "127.0.0.1", "dev")


def test_keys_add_prints_a_key_once_and_appends_its_hash(
    tmp_path: Path, env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "api-keys"
    env.setenv("TRADE_STORE_API_KEYS_FILE", str(path))
    args = ["keys", "add", "feed-1", "--scopes", "trades:write,requests:read", "--rate", "200/50"]
    assert main(args) == 0
    first = capsys.readouterr()
    key = first.out.strip()
    assert len(key) >= 40
    assert "shown only this once" in first.err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key not in path.read_text()
    assert main(["keys", "add", "reader", "--scopes", "trades:read", "requests:read:any"]) == 0
    second = capsys.readouterr().out.strip()
    assert second != key

    lines = [auth.parse_key_line(line) for line in path.read_text().splitlines()]
    assert [(k.client.id, k.client.write_rate, k.client.read_rate) for k in lines] == [
        ("feed-1", 200.0, 50.0),
        ("reader", None, None),
    ]
    assert lines[0].digest == hashlib.sha256(key.encode()).digest()
    assert lines[1].client.scopes == {"trades:read", "requests:read:any", "requests:read"}
    with running(Settings(auth="api-key", api_keys_file=path)) as api:
        reply = api.http.post("/api/v1/trades", json=trade_body(), headers={"X-API-Key": key})
        assert reply.status_code == 202
        assert api.http.get("/api/v1/trades", headers=bearer(second)).status_code == 200


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["keys", "add", "feed-1", "--scopes", "trades:everything"], "scopes must be among"),
        (["keys", "add", "feed 1", "--scopes", "trades:read"], "one word"),
        (["keys", "add", "feed-1", "--scopes", "trades:read", "--rate", "fast"], "WRITES/READS"),
    ],
)
def test_keys_add_refuses_what_the_server_could_not_read(
    tmp_path: Path,
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    says: str,
) -> None:
    path = tmp_path / "api-keys"
    env.setenv("TRADE_STORE_API_KEYS_FILE", str(path))
    assert main(args) == 2
    assert says in capsys.readouterr().err
    assert not path.exists()


def test_keys_add_needs_the_key_file_setting(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "add", "feed-1", "--scopes", "trades:read"]) == 2
    assert "TRADE_STORE_API_KEYS_FILE" in capsys.readouterr().err


def test_the_quota_counts_the_authenticated_client_not_its_address(
    tmp_path: Path, key_file: Path
) -> None:
    """Authentication runs before the quota: a key's own rate (a burst of one here) throttles
    that client, while another client from the same address still gets through."""
    key_file.write_text(
        key_line("slow", "trades:write", "0.5/0.5") + "\n" + key_line("other", "trades:write")
    )
    settings = Settings(
        data_dir=tmp_path, auth="api-key", api_keys_file=key_file, quota_burst_seconds=2
    )
    with running(settings) as api:
        slow = {"X-API-Key": key_of("slow")}
        answers = [api.call("POST", "/api/v1/trades", slow, "slow").status_code for _ in range(2)]
        assert answers == [202, 429]
        other = {"X-API-Key": key_of("other")}
        assert api.call("POST", "/api/v1/trades", other, "other").status_code == 202
