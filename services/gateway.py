"""The study gateway: the ingress of the Serve application (REST + gRPC on Serve's proxies).

(No `from __future__ import annotations` here: FastAPI must see real types on the ingress methods.)

REST (OpenAPI at /docs):
  POST /v1/studies:analyze   a whole study -> findings + mask (+ DICOM SEG for DICOM input)
  POST /v1/{task}:predict    one task's section of the findings
  GET  /v1/models, /healthz, /readyz, /metrics
  GET  /ui/ (the web UI), /v1/ui-config, /v1/demo-cases[/{case}/{modality}], /v1/serving/status
  /v2/...                    Open Inference Protocol v2 for raw inference on every task's model
gRPC (same methods, Serve's gRPC port): oncoserve.v1.StudyService/Analyze and
inference.GRPCInferenceService (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer).

A study is decoded and preprocessed once here (the same `imaging` code as training), put in Ray's
object store once, and fanned out to the task deployments in parallel; their sections come back on
the input's grid and are assembled into the published findings.
"""

import asyncio
import base64
import gzip
import hashlib
import json
import logging
import secrets
import time
import zlib

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from ray import serve

from imaging.errors import StudyError
from imaging.preprocess import preprocess
from imaging.qc_preview import qc_png
from imaging.study import MODALITIES
from serving.backends import BackendUnavailable
from services import metrics, ui_support
from services.rate_limit import RateLimiter
from services.analyzer import assemble
from services.grpc_servicers import service_pb2, study_pb2
from services.oip import ProtocolError, decode_grpc, decode_rest, encode_grpc, encode_rest
from services.study_input import InputError, StudyInput, from_dicom_zip, from_nifti, from_s3, parse_mapping
from services.task_logic import TASKS, ServingError, preprocess_config

log = logging.getLogger("ray.serve")
API_VERSION = "1.0"
api = FastAPI(
    title="oncoserve serving API",
    version=API_VERSION,
    description="Glioma MRI analysis (localization, segmentation, classification, survival) and raw model "
    "inference over the Open Inference Protocol v2. Research use only; not a medical device.",
)


# The web UI: static assets from this package, nothing from a CDN, with security headers (the CSP
# names the platform API, known once the gateway has its settings).
api.mount("/ui", StaticFiles(directory=ui_support.UI_DIR, html=True), name="ui")


@api.middleware("http")
async def _security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers["x-content-type-options"] = "nosniff"
    if request.url.path.startswith("/ui"):
        response.headers.update(ui_support.UI_HEADERS)
    return response


def _request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or secrets.token_hex(8)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "request_id": _request_id()}, status)


def _unavailable(task: str, cause: BaseException) -> str | None:
    """The 503 message for a task call that failed because serving cannot answer right now, else None."""
    if isinstance(cause, (BackendUnavailable, ServingError)):
        return f"{task}: {cause}"
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return f"{task}: its replica was lost and is being replaced; retry"  # Serve starts a new one
    return None


def _cause(exc: BaseException) -> BaseException:
    """The exception a replica raised, unwrapped from Ray's RayTaskError."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def _mask_bytes(mask) -> bytes:
    """The label mask as .nii.gz. gzip level 1: a 240x240x155 mask takes 73 ms (69 kB) at level 1 and
    261 ms (19 kB) at level 9 on this CPU; the response is latency-bound, not size-bound."""
    import nibabel as nib

    img = nib.Nifti1Image(mask.data.astype("uint8"), mask.affine)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


async def _mask_b64(mask) -> str:
    """Encoded in a worker thread: never on the gateway's event loop."""
    return base64.b64encode(await asyncio.to_thread(_mask_bytes, mask)).decode()


def _age(raw) -> float | None:
    if raw in (None, ""):
        return None
    try:
        age = float(raw)
    except (TypeError, ValueError):
        raise InputError(f"age {str(raw)[:20]!r} is not a number", 400) from None
    if not 0 <= age <= 130:
        raise InputError(f"age {age} is outside 0-130 years", 400)
    return age


@serve.deployment(name="gateway")
@serve.ingress(api)
class StudyGateway:
    def __init__(self, settings_fields: dict, localization, segmentation, classification, survival, reporting):
        from oncoserve.audit import AuditLog
        from oncoserve.auth import TokenStore
        from oncoserve.settings import Settings

        self.settings = Settings(**settings_fields)
        self.tasks = {"localization": localization, "segmentation": segmentation,
                      "classification": classification, "survival": survival}  # fmt: skip
        self.reporting = reporting
        self.max_bytes = int(self.settings.serve_max_request_mb * 1024 * 1024)
        self.preprocess_config = preprocess_config(self.settings)
        self.limiter = RateLimiter(self.settings.serve_rate_limit_per_min, self.settings.serve_rate_limit_burst)
        self.audit = AuditLog(self.settings.audit_file)
        self.tokens = TokenStore(self.settings.tokens_file)
        self._store = None
        self._salt = self._deid_salt()
        # Kept on the module (Serve ships this class by value, but modules by reference).
        ui_support.UI_HEADERS.update(ui_support.security_headers(self.settings.platform_url))

    def _deid_salt(self) -> str:
        path = self.settings.home / "serve" / ".deid-salt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text(secrets.token_hex(16))
            path.chmod(0o600)
        return path.read_text().strip()

    @property
    def store(self):
        if self._store is None:
            from oncoserve.object_store import object_store

            self._store = object_store(self.settings)
        return self._store

    # -- request decoding -------------------------------------------------------------------------
    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise InputError(f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise InputError(f"request body exceeds the limit of {self.max_bytes} bytes", 413)
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding == "gzip":
            # Bounded decompression: a gzip bomb stops at the limit instead of filling memory.
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                body = inflater.decompress(body, self.max_bytes + 1)
            except zlib.error as exc:
                raise InputError(f"body is not valid gzip ({exc})", 400) from None
            if len(body) > self.max_bytes or inflater.unconsumed_tail:
                raise InputError(f"decompressed body exceeds the limit of {self.max_bytes} bytes", 413)
        elif encoding != "identity":
            raise InputError(f"content-encoding {encoding!r} is not supported (gzip or identity)", 415)
        return body

    async def _study(self, request: Request) -> StudyInput:
        body = await self._body(request)
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            request._body = body  # let Starlette parse the (decoded) body we already read
            form = await request.form(max_files=8, max_fields=16)
            try:
                case_id, age = form.get("case_id") or None, _age(form.get("age"))
                dicom = form.get("dicom")
                if dicom is not None and hasattr(dicom, "read"):
                    mapping = parse_mapping(form.get("mapping") if isinstance(form.get("mapping"), str) else None)
                    return await asyncio.to_thread(from_dicom_zip, await dicom.read(), case_id, age, self._salt, mapping)
                files = {}
                for key, value in form.multi_items():
                    if hasattr(value, "read"):
                        if key in files:
                            raise InputError(f"{key} uploaded twice", 400)
                        files[key] = await value.read()
                return await asyncio.to_thread(from_nifti, files, case_id, age)
            finally:
                await form.close()
        if ctype.startswith("application/json"):
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"body is not JSON ({exc})", 400) from None
            if not isinstance(payload, dict) or not isinstance(payload.get("s3_uri"), str):
                raise InputError('JSON body must be {"s3_uri": "s3://bucket/case/", "case_id"?: ..., "age"?: ...}', 400)
            return await asyncio.to_thread(from_s3, self.store, payload["s3_uri"], (self.settings.bucket_data,),
                                           payload.get("case_id"), _age(payload.get("age")))  # fmt: skip
        raise InputError(
            f"content-type {ctype or 'none'!r} is not supported: send multipart/form-data (files "
            f"{', '.join(MODALITIES)} or dicom) or application/json with an s3_uri", 415
        )  # fmt: skip

    def _authenticate(self, header: str, role: str, action: str):
        """The caller of a request from its `authorization` header (REST) or metadata (gRPC).

        With serving auth on (the default) a token is required: missing, unknown, revoked or expired
        is 401 (gRPC UNAUTHENTICATED), a role below `role` is 403 (PERMISSION_DENIED)."""
        from oncoserve.auth import AuthError, require

        if not header:
            if not self.settings.serve_auth:
                return None  # ONCOSERVE_SERVE_AUTH=off: local development only
            raise InputError(f"{action} needs a token (Authorization: Bearer <token>) with role {role} or higher", 401)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InputError("the authorization header must be `Bearer <token>`", 401)
        try:
            identity = self.tokens.authenticate(token.strip())
            return require(identity, role, action)
        except AuthError as exc:
            raise InputError(str(exc), 401 if exc.kind == "unauthenticated" else 403) from None

    def _identity(self, request: Request, role: str = "app", action: str = "analysis"):
        return self._authenticate(request.headers.get("authorization", ""), role, action)

    def _stored_study_access(self, identity, what: str) -> None:
        """Studies stored in the data bucket and their images need a role allowed to read them."""
        from oncoserve.auth import AuthError, require

        if identity is None and not self.settings.serve_auth:
            return
        try:
            require(identity, "clinician", what)
        except AuthError as exc:
            raise InputError(str(exc), 403) from None

    # -- the work ---------------------------------------------------------------------------------
    async def _run(self, source: StudyInput, tasks: tuple[str, ...]) -> tuple[dict, object]:
        t0 = time.perf_counter()
        try:
            prepared = await asyncio.to_thread(preprocess, source.study, self.preprocess_config)
        except StudyError as exc:  # QualityError included: 422 naming the failing check
            raise InputError(str(exc)) from None
        metrics.STAGE_SECONDS.labels("study", "preprocess", "-").observe(time.perf_counter() - t0)
        # One copy in the object store, shared by every task replica (serialising 16 MB: off the loop).
        ref = await asyncio.to_thread(ray.put, prepared)
        t1 = time.perf_counter()
        calls = {task: self.tasks[task].predict.remote(ref, source.study.age) for task in tasks}
        results = {}
        for task, call in calls.items():
            try:
                results[task] = await call
            except Exception as exc:
                cause = _cause(exc)
                unavailable = _unavailable(task, cause)
                if unavailable:
                    raise InputError(unavailable, 503) from None
                raise
        metrics.STAGE_SECONDS.labels("study", "fanout", "-").observe(time.perf_counter() - t1)
        return results, prepared

    async def _report(self, findings) -> dict:
        """The reporting deployment's report for assembled findings; a failure there never loses the
        analysis (the findings say the report is unavailable and why)."""
        try:
            result = await self.reporting.report.remote(findings.model_dump())
        except Exception as exc:
            log.exception("reporting failed")
            findings.report = {"error": f"report unavailable ({type(_cause(exc)).__name__}: {str(_cause(exc))[:200]})"}
            return {}
        findings.report = result["report"]
        findings.model_versions["reporting"] = result["version"]
        return result

    async def _record(self, identity, request_id: str, source: StudyInput, versions: dict, route: str) -> None:
        """Who asked and which versions answered; the case id only as a salted hash (no PHI).

        The audit write (and its fsync) runs in a worker thread, and is awaited: a response is sent only
        after its audit record is on disk, without holding the event loop while the disk syncs."""
        case_ref = hashlib.sha256(f"{self._salt}:{source.study.case_id}".encode()).hexdigest()[:16]
        await asyncio.to_thread(self.audit.event, identity.name if identity else "anonymous",
                                identity.role if identity else "none", "analyze", request_id=request_id, route=route,
                                input=source.kind, model_versions=versions, case_ref=case_ref)  # fmt: skip

    def _limit(self, request: Request) -> None:
        """429 once the caller (its token, else its address) is over the rate."""
        header = request.headers.get("authorization", "")
        self._limit_caller(("token:" + hashlib.sha256(header.encode()).hexdigest()[:16]) if header
                           else f"ip:{request.client.host if request.client else '-'}")  # fmt: skip

    def _limit_caller(self, caller: str) -> None:
        wait = self.limiter.acquire(caller)
        if wait > 0:
            error = InputError(f"rate limit: {self.settings.serve_rate_limit_per_min:g} requests per minute per caller; "
                               f"retry in {wait:.1f} s", 429)  # fmt: skip
            error.retry_after = max(1, round(wait))
            raise error

    async def _guarded(self, route: str, work, request: Request | None = None):
        status, t0 = 500, time.perf_counter()
        try:
            if request is not None:
                self._limit(request)
            response = await work()
            status = response.status_code
            return response
        except InputError as exc:
            status = exc.status
            response = _error(exc.status, str(exc))
            if getattr(exc, "retry_after", None):
                response.headers["retry-after"] = str(exc.retry_after)
            return response
        except HTTPException as exc:  # Starlette's own refusals (a malformed multipart body, too many parts)
            status = exc.status_code
            return _error(exc.status_code, f"malformed request: {exc.detail}")
        except MultiPartException as exc:
            status = 400
            return _error(400, f"malformed multipart body: {exc.message}")
        except Exception as exc:
            log.exception("%s failed", route)
            return _error(500, f"internal error ({type(_cause(exc)).__name__}); see the server log for request {_request_id()}")
        finally:
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - t0)

    # -- REST: studies and tasks ------------------------------------------------------------------
    @api.post("/v1/studies:analyze", summary="Analyse a study: findings, mask, DICOM SEG for DICOM input")
    async def analyze(self, request: Request):
        async def work():
            identity = self._identity(request)
            preview = request.query_params.get("preview", "").lower() in ("1", "true")
            if preview:
                self._stored_study_access(identity, "study images (preview=true)")
            if request.headers.get("content-type", "").lower().startswith("application/json"):
                self._stored_study_access(identity, "analysing a stored study (s3_uri)")
            t0 = time.perf_counter()
            source = await self._study(request)
            results, prepared = await self._run(source, TASKS)
            versions = {task: results[task]["version"] for task in TASKS}
            analysis = await asyncio.to_thread(assemble, source.study, prepared.version, results, versions, prepared)
            report, mask_b64 = await asyncio.gather(self._report(analysis.findings), _mask_b64(analysis.mask))
            body = {"findings": analysis.findings.model_dump(), "mask_nifti_gz_b64": mask_b64}
            if report:
                body["report_markdown"], body["report_fhir"] = report["markdown"], report["fhir"]
            if preview:  # the web UI's slice viewer, and the quality-control picture (imaging.qc_preview)
                body["images_nifti_gz_b64"] = await asyncio.to_thread(ui_support.preview_images, source.study, prepared)
                body["qc_png_b64"] = base64.b64encode(await asyncio.to_thread(qc_png, prepared)).decode()
            if source.kind == "dicom" and source.dicom_reference:
                from services.dicom_seg import build_dicom_seg

                seg = await asyncio.to_thread(build_dicom_seg, analysis.mask.data, source.dicom_reference, versions["segmentation"])
                body["dicom_seg_b64"] = base64.b64encode(seg).decode()
            body["elapsed_ms"], body["request_id"] = round((time.perf_counter() - t0) * 1000, 1), _request_id()
            await self._record(identity, body["request_id"], source, analysis.findings.model_versions, "analyze")
            return JSONResponse(body)

        return await self._guarded("/v1/studies:analyze", work, request)

    @api.post("/v1/{task}:predict", summary="Run one task on a study (same inputs as analyze)")
    async def predict(self, task: str, request: Request):
        async def work():
            if task not in self.tasks:
                raise InputError(f"unknown task {task!r}; one of {', '.join(TASKS)}", 404)
            identity = self._identity(request)
            if request.headers.get("content-type", "").lower().startswith("application/json"):
                self._stored_study_access(identity, "analysing a stored study (s3_uri)")
            source = await self._study(request)
            results, prepared = await self._run(source, (task,))
            result = results[task]
            body = {"task": task, "case_id": source.study.case_id, "model_version": result["version"],
                    "result": result["section"], "preprocessing_version": prepared.version,
                    "preprocessing": prepared.record, "quality_flags": prepared.flags,
                    "implausible": result.get("implausible", []),
                    "missing_modalities": source.study.missing, "request_id": _request_id()}  # fmt: skip
            if "mask" in result:
                body["mask_nifti_gz_b64"] = await _mask_b64(result["mask"])
            await self._record(identity, body["request_id"], source, {task: result["version"]}, f"{task}:predict")
            return JSONResponse(body)

        return await self._guarded("/v1/{task}:predict", work, request)

    @api.post("/v1/reports", summary="A grounded report for a findings document (JSON in, report out)")
    async def reports(self, request: Request):
        async def work():
            from pydantic import ValidationError

            from services.schemas import Findings

            self._identity(request, "app", "a report")
            body = await self._body(request)
            try:
                findings = Findings.model_validate_json(body)
            except ValidationError as exc:
                raise InputError(f"not a findings document: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", 422) from None
            report = await self._report(findings)
            if not report:
                raise InputError(findings.report["error"], 503)
            return JSONResponse({"report": report["report"], "report_markdown": report["markdown"], "report_fhir": report["fhir"],
                                 "model_version": report["version"], "request_id": _request_id()})  # fmt: skip

        return await self._guarded("/v1/reports", work, request)

    # -- REST: what the web UI needs ---------------------------------------------------------------
    @api.get("/v1/ui-config", summary="Where the web UI finds the platform API, and whether demo studies exist")
    def ui_config(self):
        return {"platform_api": self.settings.platform_url, "api_version": API_VERSION,
                "demo_cases": bool(ui_support.demo_cases(self.settings.ui_demo_cases))}  # fmt: skip

    @api.get("/v1/demo-cases", summary="Demo studies the web UI offers (synthetic phantoms)")
    def list_demo_cases(self):
        return {"cases": ui_support.demo_cases(self.settings.ui_demo_cases)}

    @api.get("/v1/demo-cases/{case_id}/{modality}", summary="One modality of a demo study (NIfTI)")
    def demo_case_file(self, case_id: str, modality: str):
        path = ui_support.demo_file(self.settings.ui_demo_cases, case_id, modality)
        if path is None:
            return _error(404, f"no demo study {case_id[:64]!r} with modality {modality[:16]!r}")
        return FileResponse(path, media_type="application/gzip" if path.name.endswith(".gz") else "application/octet-stream",
                            filename=path.name)  # fmt: skip

    @api.get("/v1/serving/status", summary="Replicas, versions, and per-route requests, error rate and p50/p99 latency")
    async def serving_status(self):
        deployments = {}
        try:
            app_status = await asyncio.to_thread(serve.status)
            for app in app_status.applications.values():
                for name, d in app.deployments.items():
                    replicas = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
                    deployments[name] = {"status": str(getattr(d.status, "value", d.status)), "replicas": replicas,
                                         "running": replicas.get("RUNNING", 0)}  # fmt: skip
        except Exception as exc:  # the controller is busy or unreachable: say so, keep the rest
            deployments = {"error": f"Serve status unavailable: {type(exc).__name__}"}
        described = await self._describe_all()
        exposition, _ = metrics.exposition()
        return {"model_versions": {t: d["version"] for t, d in described.items()},
                "backends": {t: d["backend"] for t, d in described.items()},
                "untrusted_aliases": {t: d["untrusted_alias"] for t, d in described.items() if d.get("untrusted_alias")},
                "auth": "on" if self.settings.serve_auth else "OFF (ONCOSERVE_SERVE_AUTH=off: anyone may analyse)",
                "deployments": deployments, "routes": ui_support.request_summary(exposition.decode())}  # fmt: skip

    async def _describe_all(self) -> dict:
        calls = {task: handle.describe.remote() for task, handle in {**self.tasks, "reporting": self.reporting}.items()}
        return {task: await call for task, call in calls.items()}

    @api.get("/v1/models", summary="The model version each task serves now")
    async def models(self):
        described = await self._describe_all()
        return {"model_versions": {t: d["version"] for t, d in described.items()},
                "deployments": {t: {k: d[k] for k in ("version", "backend", "ready")} for t, d in described.items()}}  # fmt: skip

    @api.get("/healthz", summary="Liveness of the gateway")
    def health(self):
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: every task deployment has a model loaded")
    async def ready(self):
        try:
            described = await asyncio.wait_for(self._describe_all(), timeout=10)
        except Exception as exc:
            return _error(503, f"not ready: {type(_cause(exc)).__name__}: {str(_cause(exc))[:200]}")
        waiting = [t for t, d in described.items() if not d["ready"]]
        if waiting:
            return _error(503, f"not ready: {', '.join(waiting)}")
        return {"status": "ready", "model_versions": {t: d["version"] for t, d in described.items()},
                "untrusted_aliases": {t: d["untrusted_alias"] for t, d in described.items() if d.get("untrusted_alias")},
                "auth": self.settings.serve_auth}  # fmt: skip

    @api.get("/metrics", summary="Prometheus metrics of every serving process on this node")
    def prometheus(self):
        data, ctype = metrics.exposition()
        return Response(data, media_type=ctype)

    # -- REST: Open Inference Protocol v2 ---------------------------------------------------------
    @api.get("/v2/health/live")
    def v2_live(self):
        return {"live": True}

    @api.get("/v2/health/ready")
    async def v2_ready(self):
        response = await self.ready()
        return response if isinstance(response, JSONResponse) else {"ready": True}

    @api.get("/v2")
    def v2_server(self):
        return {"name": "oncoserve", "version": API_VERSION, "extensions": ["binary_tensor_data"]}

    def _known(self, model: str) -> None:
        if model not in self.tasks:
            raise InputError(f"unknown model {model!r}; models: {', '.join(TASKS)}", 404)

    async def _model(self, model: str, version: str | None) -> dict:
        self._known(model)
        described = await self.tasks[model].describe.remote()
        if version not in (None, "", described["version"]):
            raise InputError(f"{model} version {version} is not loaded; serving version {described['version']}", 404)
        return described

    async def _check_model(self, model: str, version: str | None) -> None:
        """Before an inference: the model exists, and a requested version is the one loaded. Without a
        version there is nothing to ask the replica (the answer names the version that ran)."""
        if version:
            await self._model(model, version)
        else:
            self._known(model)

    @api.get("/v2/models/{model}")
    @api.get("/v2/models/{model}/versions/{version}")
    async def v2_metadata(self, model: str, version: str | None = None):
        async def work():
            d = await self._model(model, version)
            return JSONResponse({"name": model, "versions": [d["version"]], "platform": "onnxruntime_onnx",
                                 "inputs": d["inputs"], "outputs": d["outputs"]})  # fmt: skip

        return await self._guarded("/v2/models/{model}", work)

    @api.get("/v2/models/{model}/ready")
    @api.get("/v2/models/{model}/versions/{version}/ready")
    async def v2_model_ready(self, model: str, version: str | None = None):
        async def work():
            d = await self._model(model, version)
            return JSONResponse({"name": model, "ready": d["ready"]}, 200 if d["ready"] else 503)

        return await self._guarded("/v2/models/{model}/ready", work)

    @api.post("/v2/models/{model}/infer")
    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer(self, model: str, request: Request, version: str | None = None):
        async def work():
            self._identity(request, "app", "model inference")
            await self._check_model(model, version)
            body = await self._body(request)
            try:
                inputs, header = decode_rest(body, request.headers.get("inference-header-content-length"))
            except ProtocolError as exc:
                raise InputError(str(exc), 400) from None
            result = await self._raw(model, inputs)
            try:
                payload, headers = encode_rest(model, result["version"], result["outputs"], header)
            except ProtocolError as exc:
                raise InputError(str(exc), 400) from None
            media = headers.pop("content-type")
            return Response(payload, 200, headers=headers, media_type=media)

        return await self._guarded("/v2/models/{model}/infer", work, request)

    async def _raw(self, model: str, inputs: dict) -> dict:
        try:
            return await self.tasks[model].infer_raw.remote(inputs)
        except Exception as exc:
            cause = _cause(exc)
            if isinstance(cause, ValueError):
                raise InputError(str(cause), 400) from None
            unavailable = _unavailable(model, cause)
            if unavailable:
                raise InputError(unavailable, 503) from None
            raise

    # -- gRPC: Open Inference Protocol v2 ---------------------------------------------------------
    def _grpc_caller(self, grpc_context, request, role: str, action: str):
        """The same checks as REST: token and role, the per-caller rate, the size limit."""
        metadata = dict(grpc_context.invocation_metadata() or ()) if grpc_context is not None else {}
        header = metadata.get("authorization", "")
        identity = self._authenticate(header, role, action)
        self._limit_caller(("token:" + hashlib.sha256(header.encode()).hexdigest()[:16]) if header
                           else f"peer:{grpc_context.peer() if grpc_context is not None else '-'}")  # fmt: skip
        if request.ByteSize() > self.max_bytes:
            raise InputError(f"request of {request.ByteSize()} bytes exceeds the limit of {self.max_bytes}", 413)
        return identity

    async def _grpc(self, route: str, grpc_context, work, empty):
        status = "OK"
        try:
            return await work()
        except InputError as exc:
            code = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                    503: grpc.StatusCode.UNAVAILABLE}.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
            status = code.name
            grpc_context.set_code(code)
            grpc_context.set_details(str(exc))
            return empty
        except Exception as exc:
            log.exception("%s failed", route)
            status = "INTERNAL"
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details(f"internal error ({type(_cause(exc)).__name__})")
            return empty
        finally:
            metrics.REQUESTS.labels(f"grpc:{route}", status).inc()

    async def ServerLive(self, request):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request):
        response = await self.ready()
        return service_pb2.ServerReadyResponse(ready=not isinstance(response, JSONResponse))

    async def ServerMetadata(self, request):
        return service_pb2.ServerMetadataResponse(name="oncoserve", version=API_VERSION, extensions=["binary_tensor_data"])

    async def ModelReady(self, request, grpc_context):
        async def work():
            d = await self._model(request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=bool(d["ready"]))

        return await self._grpc("ModelReady", grpc_context, work, service_pb2.ModelReadyResponse())

    async def ModelMetadata(self, request, grpc_context):
        async def work():
            d = await self._model(request.name, request.version)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=request.name, versions=[d["version"]], platform="onnxruntime_onnx",
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in d["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in d["outputs"]])  # fmt: skip

        return await self._grpc("ModelMetadata", grpc_context, work, service_pb2.ModelMetadataResponse())

    async def ModelInfer(self, request, grpc_context):
        async def work():
            self._grpc_caller(grpc_context, request, "app", "model inference")
            await self._check_model(request.model_name, request.model_version)
            try:
                inputs = decode_grpc(request)
                result = await self._raw(request.model_name, inputs)
                return encode_grpc(service_pb2, request.model_name, result["version"], result["outputs"], request)
            except ProtocolError as exc:
                raise InputError(str(exc), 400) from None

        return await self._grpc("ModelInfer", grpc_context, work, service_pb2.ModelInferResponse())

    # -- gRPC: the study service ------------------------------------------------------------------
    async def Analyze(self, request, grpc_context):
        async def work():
            identity = self._grpc_caller(grpc_context, request, "app", "analysis")
            age = request.age if request.HasField("age") else None
            case_id = request.case_id or None
            if request.s3_uri:
                self._stored_study_access(identity, "analysing a stored study (s3_uri)")
            if request.dicom_zip:
                source = await asyncio.to_thread(from_dicom_zip, request.dicom_zip, case_id, age, self._salt)
            elif request.s3_uri:
                source = await asyncio.to_thread(from_s3, self.store, request.s3_uri, (self.settings.bucket_data,), case_id, age)
            else:
                source = await asyncio.to_thread(from_nifti, dict(request.nifti), case_id, _age(age))
            results, prepared = await self._run(source, TASKS)
            versions = {task: results[task]["version"] for task in TASKS}
            analysis = await asyncio.to_thread(assemble, source.study, prepared.version, results, versions, prepared)
            report, mask = await asyncio.gather(self._report(analysis.findings), asyncio.to_thread(_mask_bytes, analysis.mask))
            response = study_pb2.AnalyzeResponse(findings_json=analysis.findings.model_dump_json(),
                                                 report_markdown=report.get("markdown", ""),
                                                 report_fhir_json=json.dumps(report["fhir"]) if report else "",
                                                 segmentation_nifti_gz=mask, request_id=_request_id())  # fmt: skip
            if source.kind == "dicom":
                from services.dicom_seg import build_dicom_seg

                response.dicom_seg = await asyncio.to_thread(build_dicom_seg, analysis.mask.data, source.dicom_reference,
                                                             versions["segmentation"])  # fmt: skip
            await self._record(identity, response.request_id, source, analysis.findings.model_versions, "grpc:Analyze")
            return response

        return await self._grpc("Analyze", grpc_context, work, study_pb2.AnalyzeResponse())
