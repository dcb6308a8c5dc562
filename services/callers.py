"""Who is calling, and may they: tokens and roles, the per-caller rate, access to stored studies.

REST and gRPC requests go through the same checks: an `authorization` header (REST) or metadata
entry (gRPC) carrying `Bearer <token>`; a caller is rate-limited by its token, else by its address.
"""

from __future__ import annotations

import hashlib

from oncoserve.auth import AuthError, TokenStore, require
from services.rate_limit import RateLimiter
from services.study_input import InputError


class CallerGate:
    def __init__(self, settings):
        self.settings = settings
        self.tokens = TokenStore(settings.tokens_file)
        self.limiter = RateLimiter(settings.serve_rate_limit_per_min, settings.serve_rate_limit_burst)

    def authenticate(self, header: str, role: str, action: str):
        """The caller's identity. With serving auth on (the default) a token is required: missing,
        unknown, revoked or expired is 401 (gRPC UNAUTHENTICATED), a role below `role` is 403."""
        if not header:
            if not self.settings.serve_auth:
                return None  # ONCOSERVE_SERVE_AUTH=off: local development only
            raise InputError(f"{action} needs a token (Authorization: Bearer <token>) with role {role} or higher", 401)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InputError("the authorization header must be `Bearer <token>`", 401)
        try:
            return require(self.tokens.authenticate(token.strip()), role, action)
        except AuthError as exc:
            raise InputError(str(exc), 401 if exc.kind == "unauthenticated" else 403) from None

    def limit(self, header: str, peer: str) -> None:
        """429 (with `retry_after`) once the caller, its token else its address, is over the rate."""
        caller = ("token:" + hashlib.sha256(header.encode()).hexdigest()[:16]) if header else f"peer:{peer}"
        wait = self.limiter.acquire(caller)
        if wait > 0:
            error = InputError(f"rate limit: {self.settings.serve_rate_limit_per_min:g} requests per minute per caller; "
                               f"retry in {wait:.1f} s", 429)  # fmt: skip
            error.retry_after = max(1, round(wait))
            raise error

    def stored_study_access(self, identity, what: str) -> None:
        """Studies stored in the data bucket and their images need a role allowed to read them."""
        if identity is None and not self.settings.serve_auth:
            return
        try:
            require(identity, "clinician", what)
        except AuthError as exc:
            raise InputError(str(exc), 403) from None
