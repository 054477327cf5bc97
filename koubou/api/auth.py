"""Bearer-token authentication of API requests (tokens belong to `agents` rows).

When auth is on, every request needs `Authorization: Bearer <token>` of an active agent, except:
- `/health`, which without a valid token answers only `{"status": ...}`;
- `/openapi.json` and spectree's `/apidoc/...` pages: they describe the API and hold no data,
  so clients can read them before they have a token.

Auth is on when the API binds to anything but loopback, and on loopback as soon as one active
agent exists. A token that is sent is checked against the database on every request (one
indexed SELECT), even while auth is off, so a revoked token fails at once (401). Whether any
active agent exists is cached per process for `ACTIVE_CACHE_SECONDS`, so a first
`koubou agent add` turns auth on within that time.

Nothing here logs a token, or the Authorization header: only the agent's name, or why a request
was refused.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from datetime import timedelta
from typing import Any

from flask import Flask, Response, g, jsonify, request
from spectree import SecurityScheme
from spectree.models import SecureType, SecuritySchemeData
from sqlalchemy.orm import Session, sessionmaker

from .. import agents
from ..config import Settings
from ..db.session import utcnow

log = logging.getLogger(__name__)

#: Seconds a process trusts its answer to "does any active agent exist?".
ACTIVE_CACHE_SECONDS = 2.0
#: `agents.last_seen` is written at most this often per agent.
LAST_SEEN_INTERVAL = timedelta(seconds=60)
#: Endpoints anyone may call. /health shows only its status to the unauthenticated.
PUBLIC_ENDPOINTS = frozenset({"health", "openapi"})
PUBLIC_PREFIX = "openapi_apidoc"  # spectree's /apidoc/openapi.json, swagger, redoc, scalar
REALM = "koubou"

#: For `SpecTree(..., **OPENAPI_SECURITY)`: documents the bearer scheme in /openapi.json.
OPENAPI_SECURITY: dict[str, Any] = {
    "security_schemes": [
        SecurityScheme(
            name="bearer",
            data=SecuritySchemeData(
                type=SecureType.HTTP, scheme="bearer", description="a token from `koubou agent add NAME`"
            ),
        )
    ],
    "security": {"bearer": []},
}


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the API on this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # a host name or an interface: may well be reachable from elsewhere
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    parts = (header or "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    token = parts[1].strip()
    return token if token and not any(c.isspace() for c in token) else None


class Authenticator:
    """One per app (so per gunicorn process); shared by its threads."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.always = not is_loopback(settings.api_host)
        self._lock = threading.Lock()
        self._active: bool | None = None  # unknown until first read
        self._active_until = 0.0
        self._seen_claims: dict[str, float] = {}

    def required(self) -> bool:
        """Whether requests need a token now."""
        if self.always:
            return True
        now = time.monotonic()
        with self._lock:
            if self._active is not None and now < self._active_until:
                return self._active
        try:
            active = agents.any_active(self.sessions)
        except Exception as error:  # database down: keep the last answer; never known, require a token
            with self._lock:
                if self._active is None:
                    log.warning("cannot tell whether API agents exist (%s): requiring a token", type(error).__name__)
                    return True
                log.warning("cannot tell whether API agents exist (%s): keeping the last answer", type(error).__name__)
                self._active_until = now + ACTIVE_CACHE_SECONDS  # retry (and warn) at most this often
                return self._active
        with self._lock:
            self._active, self._active_until = active, now + ACTIVE_CACHE_SECONDS
        return active

    def check(self) -> Response | None:
        """The before_request hook: None lets the request through, else the error response.

        A bearer token, when sent, is always checked, even while auth is off: a revoked or
        mistyped token gets a 401 rather than silently passing as anonymous.
        """
        g.agent_id = None
        g.koubou_full_health = False
        endpoint = request.endpoint or ""
        public = endpoint in PUBLIC_ENDPOINTS or endpoint.startswith(PUBLIC_PREFIX)
        header = request.headers.get("Authorization", "").strip()
        token = bearer_token(header)
        if token is None:
            if not self.required():
                g.koubou_full_health = True
                return None
            if public:
                return None
            if header:
                return self._refuse("the Authorization header must be `Bearer <token>`", invalid=True)
            return self._refuse(
                "this API needs an `Authorization: Bearer <token>` header; `koubou agent add NAME` makes one",
                invalid=False,
            )
        try:
            owner = agents.find_token_owner(self.sessions, token)
        except Exception as error:  # the database is down: a good token cannot be told from a bad one
            log.warning("cannot check an API token: database error (%s)", type(error).__name__)
            if public:
                g.koubou_full_health = not self.required()
                return None
            detail = "cannot check the token: database unavailable"
            response = jsonify({"error": "service unavailable", "detail": detail})
            response.status_code = 503
            return response
        if owner is not None and owner.active:
            g.agent_id = owner.agent_id
            g.koubou_full_health = True
            self._note_seen(owner)
            return None
        if public:  # a bad token on /health gets the answer of no token, not an error
            g.koubou_full_health = not self.required()
            return None
        return self._refuse("unknown token" if owner is None else "this token was revoked", invalid=True)

    def _refuse(self, detail: str, invalid: bool) -> Response:
        log.info("refused %s %s from %s: %s", request.method, request.path, request.remote_addr, detail)
        response = jsonify({"error": "unauthorized", "detail": detail})
        response.status_code = 401
        challenge = f'Bearer realm="{REALM}"'
        if invalid:
            challenge += ', error="invalid_token"'
        response.headers["WWW-Authenticate"] = challenge
        return response

    def _note_seen(self, owner: agents.TokenOwner) -> None:
        """Update last_seen when it is older than LAST_SEEN_INTERVAL, once per process and interval."""
        now = utcnow()
        if owner.last_seen is not None and now - owner.last_seen < LAST_SEEN_INTERVAL:
            return
        clock = time.monotonic()
        with self._lock:  # many threads may see the same stale value; one of them writes
            if clock < self._seen_claims.get(owner.agent_id, 0.0):
                return
            self._seen_claims[owner.agent_id] = clock + LAST_SEEN_INTERVAL.total_seconds()
        try:
            agents.touch(self.sessions, owner.agent_id, now)
        except Exception as error:  # a busy database must not fail the request over a timestamp
            log.warning("could not update last_seen of agent %s: %s", owner.name, type(error).__name__)
            with self._lock:
                self._seen_claims.pop(owner.agent_id, None)


def install(app: Flask, sessions: sessionmaker[Session], settings: Settings) -> None:
    """Require a bearer token where auth applies; set `flask.g.agent_id` for authenticated requests."""
    authenticator = Authenticator(sessions, settings)
    app.extensions["koubou.auth"] = authenticator
    app.before_request(authenticator.check)
    if authenticator.always:
        log.info("API bound to %s (not loopback): every request needs an agent token", settings.api_host)


def full_health_allowed() -> bool:
    """Whether this request may see /health's details (components, backends, workers)."""
    return bool(g.get("koubou_full_health", False))
