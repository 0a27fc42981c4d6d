"""Bearer tokens -> principals, and who may read what.

A principal is either one user (reads only their own orders and stream) or
an operator (reads everyone's). Tokens come from configuration only
(``OHS_API_TOKENS_FILE`` and/or ``OHS_API_TOKENS``), never from code.

Lookups are keyed by the SHA-256 of the token and confirmed with
``hmac.compare_digest``: a dict lookup by the token itself would compare
secrets with ``==`` and leak, through timing, how much of a guess matched.
Denials are logged on ``ohs.api`` with the path and the principal, never the
token (nor the query string, which may carry one).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from api.errors import ApiError
from api.settings import ApiSettings

__all__ = [
    "ANONYMOUS",
    "Principal",
    "TokenError",
    "TokenTable",
    "authenticate",
    "bearer_token",
    "decide",
    "log_denial",
    "require_principal",
    "require_reader",
]

log = logging.getLogger("ohs.api")

ANONYMOUS = "anonymous"
"""How a request without a valid token is named in logs."""
OPERATOR = "operator"


class TokenError(ApiError, ValueError):
    """The token configuration is unusable: the API refuses to start rather than guess."""

    retriable = False


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: int | None
    """None for an operator."""
    name: str
    """What logs call this principal (never the token)."""

    @property
    def is_operator(self) -> bool:
        return self.user_id is None

    def may_read(self, owner: int) -> bool:
        return self.is_operator or self.user_id == owner


def _principal(entry: Any) -> Principal:
    if not isinstance(entry, Mapping):
        raise TokenError(f"a token must map to an object, not {type(entry).__name__}")
    unknown = set(entry) - {"user_id", "role", "name"}
    if unknown:
        raise TokenError(f"unknown token fields {sorted(unknown)}")
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise TokenError("a token's name must be a non-empty string")
    if "role" in entry:
        if entry["role"] != OPERATOR or "user_id" in entry:
            raise TokenError(f'role must be "{OPERATOR}" and comes without user_id')
        return Principal(None, f"{OPERATOR}:{name}" if name else OPERATOR)
    user_id = entry.get("user_id")
    # bool is an int subclass: {"user_id": true} is a mistake, not user 1.
    if not isinstance(user_id, int) or isinstance(user_id, bool) or not 0 < user_id < 2**63:
        raise TokenError(f"user_id must be a positive 64-bit integer, not {user_id!r}")
    return Principal(user_id, f"user:{user_id}" + (f"({name})" if name else ""))


class TokenTable:
    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._by_digest = {_digest(token): (token.encode(), p) for token, p in entries.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def parse(cls, *documents: Mapping[str, Any]) -> TokenTable:
        """Merge JSON documents token -> principal; a token given twice must mean the same principal."""
        entries: dict[str, Principal] = {}
        for doc in documents:
            if not isinstance(doc, Mapping):
                raise TokenError("the token configuration must be a JSON object token -> principal")
            for token, entry in doc.items():
                if not isinstance(token, str) or len(token) < 16 or token != token.strip():
                    # Short tokens are guessable; surrounding spaces never survive an HTTP header.
                    raise TokenError("every token must be a string of at least 16 characters without spaces")
                principal = _principal(entry)
                if entries.get(token, principal) != principal:
                    raise TokenError(f"a token is configured twice, as {entries[token].name} and {principal.name}")
                entries[token] = principal
        return cls(entries)

    @classmethod
    def from_settings(cls, s: ApiSettings) -> TokenTable:
        docs: list[Mapping[str, Any]] = []
        try:
            if s.tokens_file is not None:
                docs.append(json.loads(s.tokens_file.read_text()))
            if s.tokens is not None:
                docs.append(json.loads(s.tokens.get_secret_value()))
        except (OSError, json.JSONDecodeError) as exc:
            # The message of a JSONDecodeError quotes no input, so no secret reaches the log.
            raise TokenError(f"cannot read the token configuration: {exc}") from exc
        return cls.parse(*docs)

    def lookup(self, token: str) -> Principal | None:
        found = self._by_digest.get(_digest(token))
        if found is None:
            return None
        stored, principal = found
        return principal if hmac.compare_digest(stored, token.encode()) else None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(table: TokenTable, token: str | None) -> Principal | None:
    return table.lookup(token) if token else None


def decide(principal: Principal | None, owner: int | None) -> int | None:
    """HTTP status of a denial (401 unauthenticated, 403 not theirs), or None when allowed.
    ``owner`` None means the resource needs authentication only."""
    if principal is None:
        return 401
    if owner is not None and not principal.may_read(owner):
        return 403
    return None


def log_denial(status: int, path: str, principal: Principal | None, reason: str) -> None:
    who = principal.name if principal is not None else ANONYMOUS
    log.warning("denied status=%d path=%s principal=%s reason=%s", status, path, who, reason)


def _deny(request: Request, status: int, principal: Principal | None, reason: str) -> HTTPException:
    log_denial(status, request.url.path, principal, reason)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    detail = "missing or invalid bearer token" if status == 401 else "not allowed to read this user's data"
    return HTTPException(status, detail=detail, headers=headers)


def require_principal(request: Request) -> Principal:
    """FastAPI dependency: the caller's principal, or 401."""
    token = bearer_token(request.headers.get("authorization"))
    principal = authenticate(request.app.state.tokens, token)
    if principal is None:
        raise _deny(request, 401, None, "no token" if token is None else "unknown token")
    return principal


def require_reader(request: Request, principal: Principal, owner: int) -> None:
    """Raise 403 unless ``principal`` may read ``owner``'s data."""
    if decide(principal, owner) is not None:
        raise _deny(request, 403, principal, f"owner user:{owner}")
