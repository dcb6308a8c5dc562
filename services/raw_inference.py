"""Open Inference Protocol v2 on every task's model, for the REST and gRPC front ends alike.

The gateway's v2 routes and gRPC `inference.GRPCInferenceService` methods only parse and answer; the
checks (model known, the requested version loaded) and the replica call are here, once. Tensors are
decoded as views into the request body (services.oip) and go to the task replica, whose batcher runs
them with any other requests already waiting.
"""

from __future__ import annotations

from services import remote_errors
from services.oip import ProtocolError, decode_grpc, decode_rest, encode_grpc, encode_rest
from services.study_input import InputError
from services.task_logic import TASKS


def _protocol(fn, *args):
    try:
        return fn(*args)
    except ProtocolError as exc:
        raise InputError(str(exc), 400) from None


class RawInference:
    def __init__(self, tasks: dict):
        self.tasks = tasks

    def known(self, model: str) -> None:
        if model not in self.tasks:
            raise InputError(f"unknown model {model!r}; models: {', '.join(TASKS)}", 404)

    async def model(self, model: str, version: str | None) -> dict:
        """The loaded model's description (`describe` of its replica); 404 for another version."""
        self.known(model)
        described = await remote_errors.call(model, self.tasks[model].describe.remote())
        if version not in (None, "", described["version"]):
            raise InputError(f"{model} version {version} is not loaded; serving version {described['version']}", 404)
        return described

    async def metadata(self, model: str, version: str | None) -> dict:
        d = await self.model(model, version)
        return {"name": model, "versions": [d["version"]], "platform": d.get("platform", "onnxruntime_onnx"),
                "inputs": d["inputs"], "outputs": d["outputs"]}  # fmt: skip

    async def check(self, model: str, version: str | None) -> None:
        """Before an inference: the model exists, and a requested version is the one loaded. Without a
        version there is nothing to ask the replica (the answer names the version that ran)."""
        if version:
            await self.model(model, version)
        else:
            self.known(model)

    async def _call(self, model: str, inputs: dict) -> dict:
        return await remote_errors.call(model, self.tasks[model].infer_raw.remote(inputs), bad_input_is_400=True)

    async def rest(self, model: str, version: str | None, body: bytes, header_length: str | None) -> tuple[bytes, dict]:
        """A binary-tensor (or JSON) REST infer body -> (response body, headers incl. content-type)."""
        inputs, header = _protocol(decode_rest, body, header_length)
        result = await self._call(model, inputs)
        return _protocol(encode_rest, model, result["version"], result["outputs"], header)

    async def grpc(self, pb, request):
        """A ModelInferRequest -> ModelInferResponse (raw contents)."""
        await self.check(request.model_name, request.model_version)
        inputs = _protocol(decode_grpc, request)
        result = await self._call(request.model_name, inputs)
        return _protocol(encode_grpc, pb, request.model_name, result["version"], result["outputs"], request)
