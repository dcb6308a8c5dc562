"""The study gateway as a Ray Serve deployment (FastAPI ingress).

(No `from __future__ import annotations` here: FastAPI must see real types on the ingress methods.)

First cut of the serving layer: one deployment that holds a StudyAnalyzer (the four champions in
onnxruntime) and answers `POST /v1/studies:analyze` with multipart NIfTI uploads, one file per
modality (form fields t1, t1ce, t2, flair; optional age). The per-task microservices, gRPC, OIP v2,
hot-swap and autoscaling build on this (issue 6).
"""


import base64
import gzip
import tempfile
import time
import uuid
from pathlib import Path

import nibabel as nib
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from imaging import nifti
from imaging.errors import StudyError
from imaging.study import MODALITIES, Study

api = FastAPI(title="oncoserve study gateway", version="0.1")
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


def _mask_bytes(mask) -> bytes:
    img = nib.Nifti1Image(mask.data.astype("uint8"), mask.affine)
    return gzip.compress(img.to_bytes(), mtime=0)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class StudyGateway:
    def __init__(self, settings_fields: dict):
        from oncoserve.object_store import object_store
        from oncoserve.settings import Settings
        from serving.registry import Registry
        from services.analyzer import StudyAnalyzer

        settings = Settings(**settings_fields)
        self.analyzer = StudyAnalyzer.from_registry(Registry(settings.mlflow_url), object_store(settings),
                                                    settings.bucket_models, settings.triton_repo_prefix)  # fmt: skip

    @api.get("/healthz")
    def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"model_versions": self.analyzer.versions}

    @api.post("/v1/studies:analyze")
    async def analyze(self, request: Request):
        # Ray Serve assigns every request an id and returns it as `x-request-id`; reuse it in our body.
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id or uuid.uuid4().hex
        headers: dict = {}
        length = int(request.headers.get("content-length", "0") or 0)
        if length > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"upload of {length} bytes exceeds {MAX_UPLOAD_BYTES}"}, 413, headers)
        form = await request.form()
        images = {}
        with tempfile.TemporaryDirectory() as tmp:
            for modality in MODALITIES:
                upload = form.get(modality)
                if upload is None or not hasattr(upload, "read"):
                    continue
                path = Path(tmp) / f"upload_{modality}.nii.gz"
                path.write_bytes(await upload.read())
                try:
                    images[modality] = nifti.load(path)
                except StudyError as exc:
                    return JSONResponse({"error": str(exc).replace("upload_", "")}, 422, headers)
        if not images:
            return JSONResponse({"error": f"no modality uploaded; send form files named {', '.join(MODALITIES)}"}, 400, headers)
        try:
            age = float(form["age"]) if form.get("age") else None
            study = Study(case_id=str(form.get("case_id") or request_id.replace("-", "")[:12]), images=images, age=age)
            t0 = time.perf_counter()
            result = self.analyzer.analyze(study)
        except (StudyError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, 422, headers)
        body = {"findings": result.findings.model_dump(), "mask_nifti_gz_b64": base64.b64encode(_mask_bytes(result.mask)).decode(),
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1), "request_id": request_id}  # fmt: skip
        return JSONResponse(body, 200, headers)


def deploy(settings, http_port: int | None = None) -> str:
    """Run the gateway on the stack's Ray, HTTP on settings.host; returns the base URL."""
    import ray

    if not ray.is_initialized():
        ray.init(address=settings.ray_address, logging_level="ERROR", log_to_driver=False)
    port = http_port or 8000
    serve.start(http_options={"host": settings.host, "port": port})
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.model_dump().items()}
    serve.run(StudyGateway.bind(fields), name="oncoserve", route_prefix="/")
    return f"http://{settings.host}:{port}"
