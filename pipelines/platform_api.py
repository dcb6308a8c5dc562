"""The platform API: the one writer of the registry's aliases, over REST; and the home of analysis jobs
(`/v1/jobs`, pipelines.jobs: a durable table and the runner thread that works through it).

It owns, server side: the gates file (loaded at start; its sha256 goes with every decision), the token
store and roles, the Ed25519 signing key of promotion records, and the audit log. The CLI
(`models promote|rollback`, `compile`, `pipeline run --promote`) and the web console are its clients;
nothing promotes in-process any more. It also signs each task's traffic policy (`/v1/rollouts`: shadow
and canary candidates beside the champion, pipelines.rollouts) and withdraws a canary that breaches
its limits.

Every call is authenticated with `Authorization: Bearer <token>` and role-checked (reads need
`viewer`). Domain errors become HTTP errors here, at the edge: 401/403 auth, 404 unknown task/version,
400 bad request, 409 a promotion or compile refused by its gates (the body lists every gate).
Evaluation data is accepted only as an `s3://<data bucket>/...` prefix, never a server path.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from oncoserve import __version__
from oncoserve.audit import AuditLog
from oncoserve.auth import AuthError, Identity, TokenStore, require
from oncoserve.settings import Settings
from oncoserve.signing import Signer, UntrustedRecord
from pipelines.promotion import Promoter, PromotionRefused
from pipelines.champion_guard import ChampionGuard
from pipelines.drift_monitor import DriftMonitor
from pipelines.rollouts import Rollouts
from serving import promotion_ledger as ledger
from serving import rollout_ledger
from serving.registry import TASKS, Registry, RegistryError, RegistryUnavailable

log = logging.getLogger("oncoserve.platform")
S3_PREFIX = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/([A-Za-z0-9._\-/]+)$")
MAX_EVAL_BYTES = 2 << 30


class PromoteRequest(BaseModel):
    to: str = Field(..., description="candidate | champion")
    reason: str | None = None
    force: bool = False
    eval_data: str | None = Field(None, description="s3://<data bucket>/<prefix>/: a dataset to compare on (never a server path).")
    regression_data: list[str] = Field(default_factory=list, max_length=8,
                                       description="s3://<data bucket>/<prefix>/ datasets the no-regression gate compares "
                                                   "both versions on (cases either saw are left out)")


class RollbackRequest(BaseModel):
    reason: str | None = None


class GateRequest(BaseModel):
    eval_data: str | None = Field(None, description="s3://<data bucket>/<prefix>/")
    regression_data: list[str] = Field(default_factory=list, max_length=8, description="as in PromoteRequest")


class RolloutRequest(BaseModel):
    # (optional here so that a caller without the role hears 403 before any word about the body)
    mode: Literal["shadow", "canary", "champion"] | None = Field(None, description="champion: the champion answers everything (off)")
    version: str | None = Field(None, description="the candidate (shadow, canary)")
    share: float = Field(0.0, ge=0.0, le=1.0, description="shadow: the sampled share of studies; canary: the weight")
    reason: str | None = None
    limits: dict[str, float | int | None] = Field(default_factory=dict,
                                                  description="min_studies, max_error_rate, max_p95_ms, min_agreement")


class CompileRequest(BaseModel):
    gpu: bool = False
    max_batch: int = Field(4, ge=1, le=256)
    triton_backend: Literal["onnxruntime", "openvino", "measured"] = Field(
        "onnxruntime", description="the backend config.pbtxt names on CPU nodes (measured: the runtime compile chose)")
    force: bool = False
    reason: str | None = None


def fetch_eval_data(store, settings: Settings, uri: str | None) -> Path | None:
    """A dataset prefix of the data bucket, copied into the server's cache; anything else is refused."""
    if not uri:
        return None
    match = S3_PREFIX.match(uri)
    if not match or ".." in uri:
        raise ValueError(f"eval_data {uri[:80]!r}: expected s3://{settings.bucket_data}/<prefix>/ (server paths are not accepted)")
    bucket, prefix = match.group(1), match.group(2).rstrip("/") + "/"
    if bucket != settings.bucket_data:
        raise ValueError(f"eval_data must be in the data bucket {settings.bucket_data!r}, not {bucket!r}")
    dst = settings.home / "cache" / "eval" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dst / ".complete").exists():  # uploads are content-addressed: the same URI is the same data
        return dst
    total = 0
    objects = [o for o in store.list_objects(bucket, prefix=prefix, recursive=True) if not o.is_dir]
    if not objects:
        raise ValueError(f"eval_data: nothing under {uri}")
    for obj in objects:
        total += obj.size or 0
        if total > MAX_EVAL_BYTES:
            raise ValueError(f"eval_data: more than {MAX_EVAL_BYTES >> 30} GiB under {uri}")
        rel = obj.object_name[len(prefix):]
        if not rel or rel.startswith("/") or ".." in Path(rel).parts:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        store.fget_object(bucket, obj.object_name, str(target))
    (dst / ".complete").touch()
    return dst


class _LazyStore:
    """The object store client, made on first use (the API starts, and refuses callers, without one)."""

    def __init__(self, settings: Settings):
        self._settings, self._client = settings, None

    def __getattr__(self, name: str):
        if self._client is None:
            from oncoserve.object_store import object_store

            self._client = object_store(self._settings)
        return getattr(self._client, name)


def create_app(settings: Settings, reconcile_interval_s: float = 10.0) -> FastAPI:
    from oncoserve.credentials import use_mlflow_account

    use_mlflow_account(settings.mlflow_accounts_file, "platform")  # MLflow's admin: the one that moves aliases
    app = FastAPI(title="oncoserve platform API", version=__version__)
    # Browsers may call this API only from the origins named (the serving API's, where the web UI is
    # served, by default): no wildcard, and the token travels in a header, never a cookie.
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                       allow_headers=["authorization", "content-type"], allow_credentials=False, max_age=600)  # fmt: skip
    registry = Registry(settings.mlflow_url)
    audit = AuditLog(settings.audit_file)
    tokens = TokenStore(settings.tokens_file)
    store = _LazyStore(settings)
    signer = Signer.load_or_create(settings.signing_key_file, settings.signing_public_key_file)
    promoter = Promoter(registry, audit, settings.home / "cache", settings.gates_file, signer, store,
                        settings.bucket_models, settings.triton_repo_prefix)  # fmt: skip
    log.warning("gates %s (sha256 %s), signing key %s", promoter.gates_file, promoter.gates_sha256[:16], signer.key_id)

    # Alias moves made behind the platform's back (a direct MLflow client) are audited as they appear.
    stop = threading.Event()
    seen: dict[str, str] = {}

    # Canaries are watched on the same beat: one that breaches its limits is withdrawn (pipelines.rollouts).
    rollouts = Rollouts(promoter, store, settings.bucket_models, audit)
    # Drift of every task's inputs against its champion's training reference, once a minute (and on request).
    drift = DriftMonitor(registry, promoter, store, settings.bucket_artifacts, settings.payload_retention_days)
    # A champion swap that starts failing studies goes back to `previous` (pipelines.champion_guard).
    guard = ChampionGuard(promoter, store, settings.bucket_artifacts, settings.rollback_max_error_rate,
                          settings.rollback_min_studies, settings.rollback_window_s)  # fmt: skip
    beats = {"n": 0}

    def watch() -> None:
        while not stop.wait(reconcile_interval_s):
            beats["n"] += 1
            if beats["n"] % max(1, round(60 / reconcile_interval_s)) == 0:
                try:
                    drift.beat(TASKS)
                except Exception as exc:
                    log.warning("drift pass failed: %s: %s", type(exc).__name__, str(exc)[:200])
            try:
                promoter.reconcile((*TASKS, "reporting"), seen)
            except Exception as exc:  # the registry or S3 briefly unreachable: look again next time
                log.warning("alias reconcile failed: %s: %s", type(exc).__name__, str(exc)[:200])
            try:
                for w in rollouts.check(TASKS):
                    log.warning("%s: canary v%s withdrawn: %s", w["task"], w["version"], w["reason"])
            except Exception as exc:
                log.warning("canary check failed: %s: %s", type(exc).__name__, str(exc)[:200])
            try:
                for r in guard.check(TASKS):
                    log.warning("%s: champion rolled back from v%s to v%s: %s", r["task"], r["from"], r["to"], r["reason"])
            except Exception as exc:
                log.warning("champion error-rate check failed: %s: %s", type(exc).__name__, str(exc)[:200])

    threading.Thread(target=watch, name="alias-reconcile", daemon=True).start()
    app.router.on_shutdown.append(stop.set)

    def caller(authorization: str | None = Header(None)) -> Identity | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError("unauthenticated", "Authorization header must be `Bearer <token>`")
        return tokens.authenticate(token)

    # Analysis jobs: the durable table, the runner thread that works through it, and their routes.
    from pipelines.jobs.api import add_job_routes
    from pipelines.jobs.runner import JobRunner
    from pipelines.jobs.store import JobStore

    jobs = JobStore(settings.home / "jobs" / "jobs.sqlite")
    runner = JobRunner(settings, jobs, store, audit)
    runner.start()
    app.router.on_shutdown.append(runner.stop)
    add_job_routes(app, settings, jobs, store, audit, runner, caller)

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError):
        return JSONResponse({"error": str(exc)}, status_code=401 if exc.kind == "unauthenticated" else 403)

    @app.exception_handler(RegistryError)
    async def _missing(request: Request, exc: RegistryError):
        return JSONResponse({"error": str(exc)}, status_code=503 if isinstance(exc, RegistryUnavailable) else 404)

    @app.exception_handler(ValueError)
    async def _bad(request: Request, exc: ValueError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(UntrustedRecord)
    async def _untrusted(request: Request, exc: UntrustedRecord):  # a ledger head that does not verify
        return JSONResponse({"error": f"untrusted record: {exc}"}, status_code=409)

    @app.exception_handler(PromotionRefused)
    async def _refused(request: Request, exc: PromotionRefused):
        return JSONResponse({"error": str(exc), "gates": [g.to_json() for g in exc.gates],
                             "gates_sha256": promoter.gates_sha256}, status_code=409)  # fmt: skip

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/platform", summary="The gates and signing key this platform enforces (public)")
    def platform_info() -> dict:
        return {"gates_file": promoter.gates_file.name, "gates_version": promoter.gates["version"],
                "gates_sha256": promoter.gates_sha256, "signing_key_id": signer.key_id,
                "signing_public_key": signer.public_pem.decode()}  # fmt: skip

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

    @app.post("/v1/models/{task}/versions/{version}:gate")
    def gate(task: str, version: str, body: GateRequest, who: Identity | None = Depends(caller)) -> dict:
        require(who, "data-scientist", "running the gates")
        regression = [fetch_eval_data(store, settings, uri) for uri in body.regression_data]
        results = promoter.gate(who, task, version, fetch_eval_data(store, settings, body.eval_data), body.eval_data,
                                regression or None, body.regression_data or None)  # fmt: skip
        return {"task": task, "version": version, "passed": all(g.passed for g in results),
                "gates": [g.to_json() for g in results], "gates_sha256": promoter.gates_sha256}  # fmt: skip

    @app.post("/v1/models/{task}/versions/{version}:promote")
    def promote(task: str, version: str, body: PromoteRequest, who: Identity | None = Depends(caller)) -> dict:
        require(who, "data-scientist", "promoting")
        eval_dir = fetch_eval_data(store, settings, body.eval_data)
        regression = [fetch_eval_data(store, settings, uri) for uri in body.regression_data]
        result = promoter.promote(who, task, version, body.to, body.reason, body.force, eval_dir, body.eval_data,
                                  regression or None, body.regression_data or None)  # fmt: skip
        return {"task": task, "version": version, "to": body.to, "previous_holder": result.previous_holder,
                "forced": result.forced, "gates": [g.to_json() for g in result.gates], "action_id": result.action_id,
                "gates_sha256": result.gates_sha256}  # fmt: skip

    @app.post("/v1/models/{task}:rollback")
    def rollback(task: str, body: RollbackRequest, who: Identity | None = Depends(caller)) -> dict:
        old, new = promoter.rollback(who, task, body.reason)
        return {"task": task, "from": old, "to": new}

    @app.post("/v1/models/{task}/versions/{version}:compile")
    def compile_(task: str, version: str, body: CompileRequest, who: Identity | None = Depends(caller)) -> dict:
        from serving.compile import CompileOptions

        options = CompileOptions(max_batch_size=body.max_batch, gpu=body.gpu, triton_cpu_backend=body.triton_backend,
                                 preferred_batch_sizes=[b for b in (2, 4) if b <= body.max_batch])  # fmt: skip
        result, gates = promoter.compile(who, task, version, options, body.force, body.reason)
        return {"task": task, "version": version, "files": result.files, "tensorrt": result.tensorrt,
                "runtime": asdict(result.runtime) if result.runtime else None,
                "bucket": settings.bucket_models, "prefix": settings.triton_repo_prefix,
                "gates": [g.to_json() for g in gates], "gates_sha256": promoter.gates_sha256}  # fmt: skip

    @app.get("/v1/models/{task}/history", summary="Which version held `champion` when (the signed alias ledger)")
    def history(task: str, who: Identity | None = Depends(caller)) -> list[dict]:
        require(who, "viewer", "reading the alias history")
        if task not in (*TASKS, "reporting"):
            raise RegistryError(f"unknown task {task!r}")
        records = [s["record"] for s in ledger.history(store, settings.bucket_models, task)]
        moves = [e for e in audit.entries() if e.get("task") == task and e.get("action") == "untrusted_alias"]
        return [{"seq": r["seq"], "time": r["time"], "alias": r["alias"], "version": r["version"], "action": r["action"],
                 "actor": r["actor"], "forced": r["forced"], "gates_sha256": r["gates_sha256"], "signed": True} for r in records] + \
               [{"seq": None, "time": e["time"], "alias": "champion", "version": e.get("version"), "action": "untrusted_alias",
                 "actor": e.get("actor"), "forced": False, "gates_sha256": None, "signed": False} for e in moves]  # fmt: skip

    def _model_task(task: str) -> None:
        if task not in TASKS:
            raise RegistryError(f"unknown task {task!r}; rollouts are for {', '.join(TASKS)}")

    @app.get("/v1/rollouts/{task}", summary="The traffic policy in force (champion, shadow or canary) and its history")
    def rollout(task: str, who: Identity | None = Depends(caller)) -> dict:
        require(who, "viewer", "reading traffic policies")
        _model_task(task)
        history = [s["record"] for s in rollout_ledger.history(store, settings.bucket_models, task)]
        return {"task": task, "policy": rollouts.policy(task).describe(), "champion": promoter.signed_champion(task),
                "history": [{k: r.get(k) for k in ("seq", "mode", "version", "share", "actor", "reason", "time")} for r in history]}  # fmt: skip

    @app.post("/v1/rollouts/{task}", summary="Set a task's traffic policy (role: platform; signed and audited)")
    def rollout_set(task: str, body: RolloutRequest, who: Identity | None = Depends(caller)) -> dict:
        _model_task(task)
        policy = rollouts.set(who, task, body.mode, body.version, body.share, body.reason, body.limits)
        return {"task": task, "policy": policy.describe(), "limits": policy.limits}

    @app.get("/v1/rollouts/{task}/report", summary="Candidate vs champion evidence under a policy, with 95% intervals")
    def rollout_report(task: str, seq: int | None = None, who: Identity | None = Depends(caller)) -> dict:
        require(who, "viewer", "reading rollout evidence")
        _model_task(task)
        return rollouts.report(task, seq)

    @app.get("/v1/monitoring/drift", summary="Each site's input drift against the champion's training reference")
    def drift_report(task: str = "segmentation", days: float = 7.0, who: Identity | None = Depends(caller)) -> dict:
        require(who, "viewer", "reading drift monitoring")
        _model_task(task)
        if not 0 < days <= 366:
            raise ValueError("days must be in (0, 366]")
        return drift.report(task, days)

    @app.get("/metrics", summary="Prometheus metrics of the platform (drift gauges)")
    def platform_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from pipelines.drift_monitor import REGISTRY

        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/audit")
    def audit_log(task: str | None = None, who: Identity | None = Depends(caller)) -> list[dict]:
        require(who, "viewer", "reading the audit log")
        return [e for e in audit.entries() if not task or e.get("task") == task]

    @app.get("/v1/audit:verify")
    def audit_verify(who: Identity | None = Depends(caller)) -> dict:
        require(who, "viewer", "verifying the audit log")
        result = audit.verify()
        return {"ok": result.ok, "records": result.records, "first_bad_line": result.first_bad, "problem": result.problem}

    return app
