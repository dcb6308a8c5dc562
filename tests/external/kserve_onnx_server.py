"""A KServe ModelServer (Open Inference Protocol v2) serving ONNX files from a Triton-layout repository.

It stands in for Triton in tests (Triton cannot run here). Its own process: kserve and
tritonclient.grpc cannot be imported together. Usage:
    python kserve_onnx_server.py REPO_DIR --http-port P --grpc-port Q
Serves every <REPO_DIR>/<model>/<n>/model.onnx (highest n) on 127.0.0.1 only.
"""

import argparse
import sys
import uuid
from pathlib import Path

import grpc
import onnxruntime as ort
import uvicorn

# KServe binds every interface; keep this test server on loopback.
_aio_server = grpc.aio.server


def _loopback_aio_server(*args, **kwargs):
    server = _aio_server(*args, **kwargs)
    add = server.add_insecure_port
    server.add_insecure_port = lambda address: add(address.replace("[::]", "127.0.0.1"))
    return server


grpc.aio.server = _loopback_aio_server
_uvicorn_config = uvicorn.Config.__init__


def _loopback_config(self, *args, **kwargs):
    kwargs["host"] = "127.0.0.1"
    _uvicorn_config(self, *args, **kwargs)


uvicorn.Config.__init__ = _loopback_config
# A preprocessed study is a 16.5 MB tensor; gRPC's default limit is 8 MB. KServe reads these at import.
sys.argv += ["--grpc_max_send_message_length", str(64 << 20), "--grpc_max_receive_message_length", str(64 << 20)]

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402


class OnnxModel(Model):
    def __init__(self, name: str, path: Path):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        names = [o.name for o in self.session.get_outputs()]
        outputs = []
        for name, array in zip(names, self.session.run(names, feeds)):
            out = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            out.set_data_from_numpy(array, binary_data=True)
            outputs.append(out)
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name, infer_outputs=outputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo", type=Path)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    args, _ = parser.parse_known_args()  # KServe's own flags are in argv too
    models = []
    for folder in sorted(p for p in args.repo.iterdir() if p.is_dir()):
        versions = sorted((int(v.name) for v in folder.iterdir() if v.name.isdigit() and (v / "model.onnx").exists()))
        if versions:
            models.append(OnnxModel(folder.name, folder / str(versions[-1]) / "model.onnx"))
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=1, enable_docs_url=False).start(models)


if __name__ == "__main__":
    main()
