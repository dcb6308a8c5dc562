"""The CLI's and the pipeline's client of the platform API: every alias move, gate run and compile
goes through the server, which owns the gates, the roles, the signing key and the audit log."""

from __future__ import annotations

import httpx

from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.gates import GateResult
from pipelines.promotion import PromotionRefused, PromotionResult
from serving.registry import RegistryError, RegistryUnavailable


class PlatformUnavailable(RuntimeError):
    """The platform API did not answer."""


def _gates(items: list[dict]) -> list[GateResult]:
    return [GateResult(**g) for g in items]


class PlatformClient:
    def __init__(self, settings: Settings, token: str | None = None, timeout_s: float = 1800.0):
        self.url = settings.platform_client_url.rstrip("/")
        self.token = token if token is not None else settings.cli_token()
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, json: dict | None = None, what: str = "", files: dict | None = None,
              data: dict | None = None, headers: dict | None = None) -> dict | list:
        if not self.token and path != "/v1/platform":  # the server would say the same; say it without a round trip
            raise AuthError("unauthenticated", "this command needs a token (ONCOSERVE_TOKEN or ONCOSERVE_HOME/token); "
                                               "see `oncoserve auth token create`")  # fmt: skip
        headers = {**(headers or {}), **({"authorization": f"Bearer {self.token}"} if self.token else {})}
        try:
            response = httpx.request(method, self.url + path, json=json, files=files, data=data, headers=headers, timeout=self.timeout_s)
        except httpx.TransportError as exc:
            raise PlatformUnavailable(f"the platform API at {self.url} did not answer ({type(exc).__name__}); "
                                      "is the stack up? (oncoserve stack up)") from None  # fmt: skip
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:300]}
        if response.status_code < 400:
            return body
        message = body.get("error", str(body)) if isinstance(body, dict) else str(body)
        if response.status_code == 401:
            raise AuthError("unauthenticated", f"platform API: {message}")
        if response.status_code == 403:
            raise AuthError("forbidden", f"platform API: {message}")
        if response.status_code == 404:
            raise RegistryError(message)
        if response.status_code == 503:
            raise RegistryUnavailable(message)
        if response.status_code == 409 and isinstance(body, dict) and "gates" in body:
            task, version, to = what.split(":") if what.count(":") == 2 else ("?", "?", "?")
            raise PromotionRefused(task, version, to, _gates(body["gates"]))
        if response.status_code in (400, 409, 413, 415, 422):  # a 409 without gates: a job in another state
            raise ValueError(message)
        raise PlatformUnavailable(f"platform API answered {response.status_code}: {message}")

    def promote(self, task: str, version: str, to: str, reason: str | None = None, force: bool = False,
                eval_data: str | None = None, regression_data: list[str] | None = None) -> PromotionResult:  # fmt: skip
        body = self._call("POST", f"/v1/models/{task}/versions/{version}:promote",
                          {"to": to, "reason": reason, "force": force, "eval_data": eval_data,
                           "regression_data": regression_data or []}, f"{task}:{version}:{to}")  # fmt: skip
        return PromotionResult(task, version, to, body["previous_holder"], body["forced"], _gates(body["gates"]),
                               body["action_id"], body.get("gates_sha256", ""))  # fmt: skip

    def rollback(self, task: str, reason: str | None = None) -> tuple[str, str]:
        body = self._call("POST", f"/v1/models/{task}:rollback", {"reason": reason})
        return body["from"], body["to"]

    def gate(self, task: str, version: str, eval_data: str | None = None, regression_data: list[str] | None = None) -> list[GateResult]:
        return _gates(self._call("POST", f"/v1/models/{task}/versions/{version}:gate",
                                 {"eval_data": eval_data, "regression_data": regression_data or []})["gates"])  # fmt: skip

    def compile(self, task: str, version: str, gpu: bool = False, max_batch: int = 4, force: bool = False,
                reason: str | None = None, triton_backend: str = "onnxruntime") -> dict:  # fmt: skip
        return self._call("POST", f"/v1/models/{task}/versions/{version}:compile",
                          {"gpu": gpu, "max_batch": max_batch, "force": force, "reason": reason, "triton_backend": triton_backend},
                          f"{task}:{version}:compile")  # fmt: skip

    def history(self, task: str) -> list[dict]:
        return self._call("GET", f"/v1/models/{task}/history")

    def rollout(self, task: str) -> dict:
        return self._call("GET", f"/v1/rollouts/{task}")

    def set_rollout(self, task: str, mode: str, version: str | None = None, share: float = 0.0, reason: str | None = None,
                    limits: dict | None = None) -> dict:  # fmt: skip
        return self._call("POST", f"/v1/rollouts/{task}", {"mode": mode, "version": version, "share": share, "reason": reason,
                                                           "limits": limits or {}})  # fmt: skip

    def rollout_report(self, task: str, seq: int | None = None) -> dict:
        return self._call("GET", f"/v1/rollouts/{task}/report" + (f"?seq={seq}" if seq is not None else ""))

    def drift(self, task: str, days: float = 7.0) -> dict:
        return self._call("GET", f"/v1/monitoring/drift?task={task}&days={days}")

    def info(self) -> dict:
        return self._call("GET", "/v1/platform")

    # -- analysis jobs (/v1/jobs) -----------------------------------------------------------------
    def submit_job(self, files: dict, form: dict, idempotency_key: str | None = None) -> dict:
        headers = {"idempotency-key": idempotency_key} if idempotency_key else None
        return self._call("POST", "/v1/jobs", files=files, data=form, headers=headers)

    def submit_pull(self, study_uid: str, export: bool = True) -> dict:
        return self._call("POST", "/v1/jobs", json={"pacs": {"study_uid": study_uid}, "export": export})

    def jobs(self, state: str | None = None, limit: int = 100) -> list[dict]:
        return self._call("GET", f"/v1/jobs?limit={limit}" + (f"&state={state}" if state else ""))

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def review_job(self, job_id: str, decision: str, reason: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}:review", json={"decision": decision, "reason": reason})

    def retry_job(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{job_id}:retry")
