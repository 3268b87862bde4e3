"""Who is calling, and may they: one authenticator per ``TRADE_STORE_AUTH`` mode, and the
``require(scope)`` dependency each route declares.

``none`` lets everyone in as nobody (client None); ``api-key`` looks the presented key's
SHA-256 up in the key file, comparing every line in constant time; ``jwt`` verifies an
OAuth2 bearer token with PyJWT against a JWKS URL or a public key file. Failures are
problem+json: 401 without (valid) credentials, 403 without the scope, each with the
``WWW-Authenticate`` challenge of RFC 6750.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
import structlog
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from config.settings import Settings
from domain.message import valid_id
from domain.ports import Unavailable
from domain.status import Batch, RequestStatus
from ingest_api.openapi import problem
from ingest_api.problems import problem_response

log = structlog.get_logger("ingest_api")

TRADES_WRITE = "trades:write"
TRADES_READ = "trades:read"
REQUESTS_READ = "requests:read"
REQUESTS_READ_ANY = "requests:read:any"
SCOPES = (TRADES_WRITE, TRADES_READ, REQUESTS_READ, REQUESTS_READ_ANY)
# Seeing every request includes seeing one's own.
IMPLIED = {REQUESTS_READ_ANY: REQUESTS_READ}
# Only asymmetric algorithms: a verifier that holds a public key must never accept "none"
# or an HMAC signed with that (public) key as the secret.
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
REALM = 'Bearer realm="trade-store"'
KEY_FILE_RECHECK_S = 1.0  # how often the key file's stamp is looked at for changes
JWKS_TIMEOUT_S = 5.0
# An unknown kid refreshes the key set at most this often (PyJWT's cooldown), so tokens
# with made-up kids cannot turn the API into a load on the identity provider.
JWKS_REFRESH_COOLDOWN_S = 30.0
CHALLENGE = {
    "WWW-Authenticate": {
        "description": 'The RFC 6750 challenge, e.g. Bearer realm="trade-store"',
        "schema": {"type": "string"},
    }
}
AUTHENTICATED: dict[int | str, dict[str, Any]] = {
    401: {**problem("No valid credentials (code UNAUTHENTICATED)"), "headers": CHALLENGE},
    403: {
        **problem("The credentials lack the route's scope (code FORBIDDEN)"),
        "headers": CHALLENGE,
    },
}


@dataclass(frozen=True, slots=True)
class Client:
    """An authenticated caller: its id (the key file's client id, or the token's subject),
    its scopes, and its quotas when the key file sets them."""

    id: str
    scopes: frozenset[str]
    write_rate: float | None = None  # trades/s from the key file; None: the default setting
    read_rate: float | None = None  # requests/s from the key file; None: the default setting


class AuthError(Exception):
    """Answered as a problem with a ``WWW-Authenticate`` challenge."""

    def __init__(
        self, status: int, code: str, title: str, challenge: str, field: str | None = None
    ) -> None:
        super().__init__(title)
        self.status = status
        self.code = code
        self.title = title
        self.challenge = challenge
        self.field = field


class AuthSetupError(Exception):
    """The authentication settings or the key file cannot work; the server must not start."""


def unauthenticated() -> AuthError:
    return AuthError(401, "UNAUTHENTICATED", "Authentication is required", REALM, "Authorization")


def invalid(title: str, field: str = "Authorization") -> AuthError:
    challenge = f'{REALM}, error="invalid_token", error_description="{title}"'
    return AuthError(401, "UNAUTHENTICATED", title, challenge, field)


def forbidden(scope: str) -> AuthError:
    challenge = f'{REALM}, error="insufficient_scope", scope="{scope}"'
    return AuthError(403, "FORBIDDEN", f"This route needs the scope {scope}", challenge)


def granted(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes given, with those they imply."""
    given = set(scopes)
    return frozenset(given | {IMPLIED[s] for s in given if s in IMPLIED})


def bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    credentials = credentials.strip()
    return credentials if scheme.lower() == "bearer" and credentials else None


class Authenticator(Protocol):
    async def authenticate(self, headers: Mapping[str, str]) -> Client:
        """The caller, or AuthError (or Unavailable when its verifier's keys are out of reach)."""


# --- api-key ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyLine:
    """One line of the key file: a key's hash and the client it stands for."""

    digest: bytes
    client: Client


def digest_of(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_rates(text: str) -> tuple[float, float]:
    """``WRITES/READS`` per second, e.g. ``200/50``."""
    writes, slash, reads = text.partition("/")
    try:
        rates = float(writes), float(reads)
    except ValueError:
        rates = (0.0, 0.0)
    if not slash or not all(0 < r < float("inf") for r in rates):
        raise ValueError(f"rates must be WRITES/READS per second, above 0, not {text!r}")
    return rates


def parse_scopes(text: str) -> frozenset[str]:
    scopes = [s for s in text.split(",") if s]
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}, not {text!r}")
    return frozenset(scopes)


def parse_key_line(line: str) -> KeyLine:
    """``client_id scope[,scope...] sha256-hex-of-key [WRITES/READS]``."""
    fields = line.split()
    if len(fields) not in (3, 4):
        raise ValueError("expected: client_id scope[,scope...] sha256-hex [WRITES/READS]")
    client_id, scopes, hex_digest = fields[:3]
    if not valid_id(client_id):
        raise ValueError(f"client id {client_id!r} is not 1-64 printable characters")
    try:
        digest = bytes.fromhex(hex_digest)
    except ValueError:
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("the key's hash must be 64 hexadecimal digits (SHA-256)")
    writes, reads = parse_rates(fields[3]) if len(fields) == 4 else (None, None)
    return KeyLine(digest, Client(client_id, granted(parse_scopes(scopes)), writes, reads))


def read_key_file(path: Path) -> list[KeyLine]:
    """Every key of the file; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthSetupError(
            f"cannot read the API key file {path}: {exc} (`trade-store keys add` creates it)"
        ) from exc
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(parse_key_line(line))
        except ValueError as exc:
            raise AuthSetupError(f"{path}, line {number}: {exc}") from exc
    return keys


def add_key(path: Path, client_id: str, scopes: frozenset[str], rates: str | None) -> str:
    """A new key for ``client_id``, its hash line appended to the key file (created 0600).
    The key itself is returned, never stored: this is the only time anyone sees it."""
    if len(client_id.split()) != 1:
        raise ValueError(f"a client id is one word, not {client_id!r}")
    key = secrets.token_urlsafe(32)
    line = f"{client_id} {','.join(sorted(scopes))} {digest_of(key).hex()}"
    if rates is not None:
        parse_rates(rates)
        line += f" {rates}"
    parse_key_line(line)  # what the server will read back
    unterminated = path.exists() and path.read_bytes()[-1:] not in (b"", b"\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        out.write(("\n" if unterminated else "") + line + "\n")
    return key


class ApiKeys:
    """Keys from ``TRADE_STORE_API_KEYS_FILE``, sent as ``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``. The file is read again when it changes (checked at most once a
    second), so ``trade-store keys add`` and removed lines take effect without a restart;
    a file that no longer parses keeps the keys read before, and says so in the log."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp = self._stat()
        self._keys = read_key_file(path)
        self._next_check = time.monotonic() + KEY_FILE_RECHECK_S

    def _stat(self) -> tuple[int, int] | None:
        try:
            info = self._path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + KEY_FILE_RECHECK_S
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._keys = read_key_file(self._path)
        except AuthSetupError as exc:
            log.error("API key file not reloaded; the keys read before stay", error=str(exc))

    async def authenticate(self, headers: Mapping[str, str]) -> Client:
        key, field = bearer(headers), "Authorization"
        if key is None:
            key, field = headers.get("x-api-key", "").strip() or None, "X-API-Key"
        if key is None:
            raise unauthenticated()
        self._reload_if_changed()
        presented = digest_of(key)
        found = None
        for line in self._keys:  # every line, so the time taken says nothing of where
            if hmac.compare_digest(line.digest, presented):
                found = line.client
        if found is None:
            raise invalid("The API key is not valid", field)
        return found


# --- jwt -------------------------------------------------------------------------------


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """The OAuth2 ``scope`` claim: space-separated names (a list of names is taken too)."""
    claim = claims.get("scope", "")
    names = claim.split() if isinstance(claim, str) else claim
    if not isinstance(names, list):
        return frozenset()
    return granted(n for n in names if isinstance(n, str) and n in SCOPES)


class Jwt:
    """OAuth2 bearer tokens (RFC 6750) verified by PyJWT: the signature with a key from the
    JWKS URL (PyJWKClient's cached key set; keys already used are kept for the cache's
    lifespan, so only a new or expired ``kid`` goes to a thread, where the client may
    fetch) or from the public key file; ``exp``, ``iss`` and ``aud`` required and checked."""

    def __init__(self, settings: Settings) -> None:
        if not settings.jwt_issuer or not settings.jwt_audience:
            raise AuthSetupError("jwt needs TRADE_STORE_JWT_ISSUER and TRADE_STORE_JWT_AUDIENCE")
        if bool(settings.jwt_jwks_url) == bool(settings.jwt_public_key_file):
            raise AuthSetupError(
                "jwt needs exactly one of TRADE_STORE_JWT_JWKS_URL and"
                " TRADE_STORE_JWT_PUBLIC_KEY_FILE"
            )
        self._algorithms = [a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()]
        refused = sorted(set(self._algorithms) - ASYMMETRIC)
        if not self._algorithms or refused:
            raise AuthSetupError(
                f"TRADE_STORE_JWT_ALGORITHMS may name only {', '.join(sorted(ASYMMETRIC))}"
                f" (refused: {', '.join(refused) or 'none given'})"
            )
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_seconds
        self._lifespan = settings.jwt_jwks_cache_seconds
        self._jwks: jwt.PyJWKClient | None = None
        self._public_key: Any = None
        self._known: dict[str, tuple[jwt.PyJWK, float]] = {}
        if settings.jwt_jwks_url:
            self._jwks = jwt.PyJWKClient(
                settings.jwt_jwks_url,
                lifespan=self._lifespan,
                timeout=JWKS_TIMEOUT_S,
                cooldown_duration=JWKS_REFRESH_COOLDOWN_S,
            )
        else:
            assert settings.jwt_public_key_file is not None
            self._public_key = _public_key(settings.jwt_public_key_file)

    async def _key(self, token: str) -> Any:
        if self._jwks is None:
            return self._public_key
        kid = jwt.get_unverified_header(token).get("kid")
        if not isinstance(kid, str):
            raise jwt.InvalidTokenError("a key set's token names its key (kid)")
        known = self._known.get(kid)
        now = time.monotonic()
        if known is not None and now < known[1]:
            return known[0]
        try:
            key = await run_in_threadpool(self._jwks.get_signing_key, kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise Unavailable(f"identity provider's key set: {exc}") from exc
        # A PyJWK: PyJWT (>= 2.15) then verifies only with the JWK's own algorithm, which the
        # token's alg must name, besides being in our allow-list.
        self._known[kid] = (key, now + self._lifespan)
        return key

    async def authenticate(self, headers: Mapping[str, str]) -> Client:
        token = bearer(headers)
        if token is None:
            raise unauthenticated()
        try:
            claims = jwt.decode(
                token,
                await self._key(token),
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise invalid("The token has expired") from None
        except jwt.InvalidIssuerError:
            raise invalid("The token's issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise invalid("The token's audience is not accepted") from None
        except jwt.PyJWTError:
            raise invalid("The token is not valid") from None
        subject = claims.get("sub") or claims.get("client_id")
        if not isinstance(subject, str) or not valid_id(subject):
            raise invalid("The token names no client (sub or client_id)")
        return Client(subject, scopes_of(claims))


def _public_key(path: Path) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuthSetupError(f"cannot read a PEM public key from {path}: {exc}") from exc


# --- the mode, the dependency ------------------------------------------------------------


def authenticator(settings: Settings) -> Authenticator | None:
    """The configured authenticator; None when anyone may call (``none``, or unset)."""
    if settings.auth == "api-key":
        if settings.api_keys_file is None:
            raise AuthSetupError("api-key needs TRADE_STORE_API_KEYS_FILE")
        return ApiKeys(settings.api_keys_file)
    if settings.auth == "jwt":
        return Jwt(settings)
    return None


def loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_to_network(settings: Settings, host: str) -> bool:
    """An API bound beyond loopback with authentication unset: refused, so an open API on
    the network is only ever a choice (``TRADE_STORE_AUTH=none`` set explicitly)."""
    return settings.auth is None and not loopback(host)


def _authenticator_of(request: Request) -> Authenticator | None:
    found: Authenticator | None = request.app.state.authenticator
    return found


def require(scope: str) -> Callable[[Request], Awaitable[Client | None]]:
    """A route dependency: the caller, who must hold ``scope`` (None when auth is off);
    also left in ``request.scope["state"]["client"]`` for the layers after it."""

    async def authorize(request: Request) -> Client | None:
        verifier = _authenticator_of(request)
        client = None if verifier is None else await verifier.authenticate(request.headers)
        if client is not None and scope not in client.scopes:
            raise forbidden(scope)
        request.scope.setdefault("state", {})["client"] = client
        return client

    return authorize


async def authenticated(request: Request) -> bool:
    """Whether the caller proved who it is (always, when auth is off); never an error, for
    open routes that only show more to known callers."""
    verifier = _authenticator_of(request)
    if verifier is None:
        return True
    try:
        await verifier.authenticate(request.headers)
    except (AuthError, Unavailable):
        return False
    return True


def sees(client: Client | None, status: RequestStatus | Batch) -> bool:
    """A client sees the requests (and batches) it submitted, or every one with
    ``requests:read:any``."""
    return client is None or REQUESTS_READ_ANY in client.scopes or status.client_id == client.id


def install(app: FastAPI, settings: Settings) -> None:
    """Make the configured authenticator (a bad key file or key stops the start here) and
    answer its errors as problem+json with their challenge."""
    app.state.authenticator = authenticator(settings)

    async def on_auth_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, AuthError)
        return problem_response(
            exc.status,
            exc.code,
            exc.title,
            field=exc.field,
            headers={"WWW-Authenticate": exc.challenge},
        )

    app.add_exception_handler(AuthError, on_auth_error)
