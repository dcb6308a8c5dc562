"""The platform API: the registry, promotion with gates, rollback and the audit log over REST.

Every call is authenticated with `Authorization: Bearer <token>` and role-checked exactly as the CLI
is (reads need `viewer`). Domain errors become HTTP errors here, at the edge: 401/403 auth, 404 unknown
task/version, 400 bad request, 409 a promotion refused by its gates (the body lists every gate).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI, Header, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from oncoserve import __version__
from oncoserve.audit import AuditLog
from oncoserve.auth import AuthError, Identity, TokenStore, require
from oncoserve.settings import Settings
from pipelines.promotion import Promoter, PromotionRefused
from serving.registry import TASKS, Registry, RegistryError


class PromoteRequest(BaseModel):
    to: str = Field(..., description="candidate | champion")
    reason: str | None = None
    force: bool = False
    eval_data: str | None = Field(None, description="Dataset directory on the server to compare on.")


class RollbackRequest(BaseModel):
    reason: str | None = None


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="oncoserve platform API", version=__version__)
    # Browsers may call this API only from the origins named (the serving API's, where the web UI is
    # served, by default): no wildcard, and the token travels in a header, never a cookie.
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                       allow_headers=["authorization", "content-type"], allow_credentials=False, max_age=600)  # fmt: skip
    registry = Registry(settings.mlflow_url)
    audit = AuditLog(settings.audit_file)
    tokens = TokenStore(settings.tokens_file)
    promoter = Promoter(registry, audit, settings.home / "cache", settings.gates_file)

    def caller(authorization: str | None = Header(None)) -> Identity | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("unauthenticated", "Authorization header must be `Bearer <token>`")
        return tokens.authenticate(token)

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError):
        return JSONResponse({"error": str(exc)}, status_code=401 if exc.kind == "unauthenticated" else 403)

    @app.exception_handler(RegistryError)
    async def _missing(request: Request, exc: RegistryError):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(ValueError)
    async def _bad(request: Request, exc: ValueError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(PromotionRefused)
    async def _refused(request: Request, exc: PromotionRefused):
        return JSONResponse({"error": str(exc), "gates": [g.to_json() for g in exc.gates]}, status_code=409)

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/whoami")
    def whoami(who: Identity | None = Depends(caller)) -> dict:
        if who is None:
            raise AuthError("unauthenticated", "no token, or an unknown or revoked one")
        return {"name": who.name, "role": who.role}

    @app.get("/v1/models")
    def models(who: Identity | None = Depends(caller)) -> list[dict]:
        require(who, "viewer", "reading the registry")
        return [v.to_json() for task in TASKS for v in registry.versions(task)]

    @app.get("/v1/models/{task}/versions/{version}")
    def version(task: str, version: str, who: Identity | None = Depends(caller)) -> dict:
        require(who, "viewer", "reading the registry")
        return registry.version(task, version).to_json()

    @app.post("/v1/models/{task}/versions/{version}:promote")
    def promote(task: str, version: str, body: PromoteRequest, who: Identity | None = Depends(caller)) -> dict:
        result = promoter.promote(who, task, version, body.to, body.reason, body.force,
                                  Path(body.eval_data) if body.eval_data else None)  # fmt: skip
        return {"task": task, "version": version, "to": body.to, "previous_holder": result.previous_holder,
                "forced": result.forced, "gates": [g.to_json() for g in result.gates], "action_id": result.action_id}  # fmt: skip

    @app.post("/v1/models/{task}:rollback")
    def rollback(task: str, body: RollbackRequest, who: Identity | None = Depends(caller)) -> dict:
        old, new = promoter.rollback(who, task, body.reason)
        return {"task": task, "from": old, "to": new}

    @app.get("/v1/audit")
    def audit_log(task: str | None = None, who: Identity | None = Depends(caller)) -> list[dict]:
        require(who, "viewer", "reading the audit log")
        return [e for e in audit.entries() if not task or e.get("task") == task]

    return app
