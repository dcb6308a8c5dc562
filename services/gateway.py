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
import json
import logging
import secrets
import time

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from ray import serve

from imaging.qc_preview import qc_png
from services import metrics, remote_errors, ui_support
from services.callers import CallerGate
from services.grpc_servicers import service_pb2, study_pb2
from services.raw_inference import RawInference
from services.request_body import read_body
from services.study_analysis import StudyAnalysis
from services.study_input import InputError
from services.study_requests import StudyRequests, reads_stored_study
from services.task_logic import preprocess_config

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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GRPC_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
              403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
              415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
              429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}  # fmt: skip


@serve.deployment(name="gateway")
@serve.ingress(api)
class StudyGateway:
    """The orchestrator: each route checks its caller (services.callers), decodes (services.request_body,
    services.study_requests), runs the shared analysis (services.study_analysis) or raw inference
    (services.raw_inference), and formats the answer for its protocol."""

    def __init__(self, settings_fields: dict, localization, segmentation, classification, survival, reporting,
                 watch_interval_s: float = 2.0):  # fmt: skip
        from oncoserve.audit import AuditLog
        from oncoserve.deid_salt import deid_salt
        from oncoserve.settings import Settings

        self.settings = Settings(**settings_fields)
        self.tasks = {"localization": localization, "segmentation": segmentation,
                      "classification": classification, "survival": survival}  # fmt: skip
        self.reporting = reporting
        self.max_bytes = int(self.settings.serve_max_request_mb * 1024 * 1024)
        self.callers = CallerGate(self.settings)
        self._store = None
        salt = deid_salt(self.settings.home, self.settings.deid_salt)
        self.requests = StudyRequests(lambda: self.store, self.settings.bucket_data, salt)
        from services.monitoring import StudyMonitor

        monitor = StudyMonitor(lambda: self.store, self.settings.bucket_artifacts, self.settings.monitoring_records,
                               self.settings.payload_logging)  # fmt: skip
        from services.version_barrier import BarrierReader, serve_app

        app = serve_app()
        self.barrier = BarrierReader(app, watch_interval_s) if app else None  # None: not in Serve, nothing to pin
        self.analysis = StudyAnalysis(self.tasks, reporting, preprocess_config(self.settings), AuditLog(self.settings.audit_file),
                                      salt, monitor, self.barrier)  # fmt: skip
        self.raw = RawInference(self.tasks)
        # Kept on the module (Serve ships this class by value, but modules by reference).
        ui_support.UI_HEADERS.update(ui_support.security_headers(self.settings.platform_url))

    @property
    def store(self):
        if self._store is None:
            from oncoserve.object_store import object_store

            self._store = object_store(self.settings)
        return self._store

    # -- callers ----------------------------------------------------------------------------------
    def _identity(self, request: Request, role: str = "app", action: str = "analysis"):
        return self.callers.authenticate(request.headers.get("authorization", ""), role, action)

    def _grpc_caller(self, grpc_context, request, role: str, action: str):
        """The same checks as REST: token and role, the per-caller rate, the size limit."""
        metadata = dict(grpc_context.invocation_metadata() or ()) if grpc_context is not None else {}
        header = metadata.get("authorization", "")
        identity = self.callers.authenticate(header, role, action)
        self.callers.limit(header, grpc_context.peer() if grpc_context is not None else "-")
        if request.ByteSize() > self.max_bytes:
            raise InputError(f"request of {request.ByteSize()} bytes exceeds the limit of {self.max_bytes}", 413)
        return identity

    async def _guarded(self, route: str, work, request: Request | None = None):
        """REST: rate limit, then the work; an InputError is its status with a message, anything else a
        500 that names the request id (the trace goes to the server log, never to the caller)."""
        status, t0 = 500, time.perf_counter()
        try:
            if request is not None:
                self.callers.limit(request.headers.get("authorization", ""), request.client.host if request.client else "-")
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
            return _error(500, f"internal error ({type(remote_errors.cause(exc)).__name__}); see the server log for request {_request_id()}")
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
                self.callers.stored_study_access(identity, "study images (preview=true)")
            if reads_stored_study(request.headers.get("content-type", "")):
                self.callers.stored_study_access(identity, "analysing a stored study (s3_uri)")
            t0 = time.perf_counter()
            source = await self.requests.from_rest(request, await read_body(request, self.max_bytes))
            result = await self.analysis.analyze(source, identity, _request_id(), "analyze")
            body = {"findings": result.analysis.findings.model_dump(), "mask_nifti_gz_b64": _b64(result.mask_nifti_gz)}
            if result.report:
                body["report_markdown"], body["report_fhir"] = result.report["markdown"], result.report["fhir"]
            if preview:  # the web UI's slice viewer, and the quality-control picture (imaging.qc_preview)
                body["images_nifti_gz_b64"] = await asyncio.to_thread(ui_support.preview_images, source.study, result.prepared)
                body["qc_png_b64"] = _b64(await asyncio.to_thread(qc_png, result.prepared))
            if result.dicom_seg is not None:
                body["dicom_seg_b64"] = _b64(result.dicom_seg)
            body["elapsed_ms"], body["request_id"] = round((time.perf_counter() - t0) * 1000, 1), _request_id()
            return JSONResponse(body)

        return await self._guarded("/v1/studies:analyze", work, request)

    @api.post("/v1/{task}:predict", summary="Run one task on a study (same inputs as analyze)")
    async def predict(self, task: str, request: Request):
        async def work():
            if task not in self.tasks:
                raise InputError(f"unknown task {task!r}; one of {', '.join(self.tasks)}", 404)
            identity = self._identity(request)
            if reads_stored_study(request.headers.get("content-type", "")):
                self.callers.stored_study_access(identity, "analysing a stored study (s3_uri)")
            source = await self.requests.from_rest(request, await read_body(request, self.max_bytes))
            body = await self.analysis.predict(source, task, identity, _request_id(), f"{task}:predict")
            if "mask_nifti_gz" in body:
                body["mask_nifti_gz_b64"] = _b64(body.pop("mask_nifti_gz"))
            body["request_id"] = _request_id()
            return JSONResponse(body)

        return await self._guarded("/v1/{task}:predict", work, request)

    @api.post("/v1/reports", summary="A grounded report for a findings document (JSON in, report out)")
    async def reports(self, request: Request):
        async def work():
            from pydantic import ValidationError

            from services.schemas import Findings

            self._identity(request, "app", "a report")
            body = await read_body(request, self.max_bytes)
            try:
                findings = Findings.model_validate_json(body)
            except ValidationError as exc:
                raise InputError(f"not a findings document: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", 422) from None
            report = await self.analysis.report(findings)
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
        barrier = await self.barrier.describe() if self.barrier is not None else {}
        active = {t: b["active"] for t, b in barrier.items() if isinstance(b, dict) and b.get("active")}
        return {"model_versions": {t: active.get(t, d["version"]) for t, d in described.items()},
                "version_barrier": barrier,
                "deployments": {t: {k: d[k] for k in ("version", "backend", "ready")} for t, d in described.items()},
                "rollouts": {t: d["rollout"] for t, d in described.items() if "rollout" in d}}  # fmt: skip

    @api.get("/healthz", summary="Liveness of the gateway")
    def health(self):
        return {"status": "ok"}

    @api.get("/readyz", summary="Readiness: every task deployment has a model loaded")
    async def ready(self):
        try:
            described = await asyncio.wait_for(self._describe_all(), timeout=10)
        except Exception as exc:
            error = remote_errors.cause(exc)
            return _error(503, f"not ready: {type(error).__name__}: {str(error)[:200]}")
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

    @api.get("/v2/models/{model}")
    @api.get("/v2/models/{model}/versions/{version}")
    async def v2_metadata(self, model: str, version: str | None = None):
        async def work():
            return JSONResponse(await self.raw.metadata(model, version))

        return await self._guarded("/v2/models/{model}", work)

    @api.get("/v2/models/{model}/ready")
    @api.get("/v2/models/{model}/versions/{version}/ready")
    async def v2_model_ready(self, model: str, version: str | None = None):
        async def work():
            d = await self.raw.model(model, version)
            return JSONResponse({"name": model, "ready": d["ready"]}, 200 if d["ready"] else 503)

        return await self._guarded("/v2/models/{model}/ready", work)

    @api.post("/v2/models/{model}/infer")
    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer(self, model: str, request: Request, version: str | None = None):
        async def work():
            self._identity(request, "app", "model inference")
            await self.raw.check(model, version)
            body = await read_body(request, self.max_bytes)
            payload, headers = await self.raw.rest(model, version, body, request.headers.get("inference-header-content-length"))
            media = headers.pop("content-type")
            return Response(payload, 200, headers=headers, media_type=media)

        return await self._guarded("/v2/models/{model}/infer", work, request)

    # -- gRPC: Open Inference Protocol v2 ---------------------------------------------------------
    async def _grpc(self, route: str, grpc_context, work, empty):
        status = "OK"
        try:
            return await work()
        except InputError as exc:
            code = GRPC_CODES.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
            status = code.name
            grpc_context.set_code(code)
            grpc_context.set_details(str(exc))
            return empty
        except Exception as exc:
            log.exception("%s failed", route)
            status = "INTERNAL"
            grpc_context.set_code(grpc.StatusCode.INTERNAL)
            grpc_context.set_details(f"internal error ({type(remote_errors.cause(exc)).__name__})")
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
            d = await self.raw.model(request.name, request.version)
            return service_pb2.ModelReadyResponse(ready=bool(d["ready"]))

        return await self._grpc("ModelReady", grpc_context, work, service_pb2.ModelReadyResponse())

    async def ModelMetadata(self, request, grpc_context):
        async def work():
            d = await self.raw.metadata(request.name, request.version)
            tensor = service_pb2.ModelMetadataResponse.TensorMetadata
            return service_pb2.ModelMetadataResponse(
                name=request.name, versions=d["versions"], platform=d["platform"],
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in d["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in d["outputs"]])  # fmt: skip

        return await self._grpc("ModelMetadata", grpc_context, work, service_pb2.ModelMetadataResponse())

    async def ModelInfer(self, request, grpc_context):
        async def work():
            self._grpc_caller(grpc_context, request, "app", "model inference")
            return await self.raw.grpc(service_pb2, request)

        return await self._grpc("ModelInfer", grpc_context, work, service_pb2.ModelInferResponse())

    # -- gRPC: the study service (the same analysis, checks and audit as REST studies:analyze) ----
    async def Analyze(self, request, grpc_context):
        async def work():
            identity = self._grpc_caller(grpc_context, request, "app", "analysis")
            if request.s3_uri:
                self.callers.stored_study_access(identity, "analysing a stored study (s3_uri)")
            source = await self.requests.from_grpc(request)
            result = await self.analysis.analyze(source, identity, _request_id(), "grpc:Analyze")
            report = result.report
            return study_pb2.AnalyzeResponse(findings_json=result.analysis.findings.model_dump_json(),
                                             report_markdown=report.get("markdown", ""),
                                             report_fhir_json=json.dumps(report["fhir"]) if report else "",
                                             segmentation_nifti_gz=result.mask_nifti_gz, dicom_seg=result.dicom_seg or b"",
                                             request_id=_request_id())  # fmt: skip

        return await self._grpc("Analyze", grpc_context, work, study_pb2.AnalyzeResponse())
