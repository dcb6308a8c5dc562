"""P1-peers: raw segmentation inference on the same compiled ONNX and the same input tensor through the
platform's OIP v2 endpoint and through peer servers, each as a ratio to onnxruntime called in-process.

Peers, each in its own process on 127.0.0.1, each with its own recommended client and binary encoding:
- KServe ModelServer (tests/external/kserve_onnx_server.py): OIP v2 over gRPC (tritonclient) and over
  HTTP with binary tensor data;
- BentoML (bench/peer_servers/bento_service.py), with its client, the binary way a BentoML user would
  take: an .npy file each way (np.ndarray arguments travel as JSON from outside, which took over 300 s
  for this tensor; the pickle media type is refused by a main server);
- `mlflow models serve` (the ONNX flavour, `--env-manager local`): JSON `{"inputs": ...}`, the only
  tensor encoding its scoring server takes.
Every server runs onnxruntime on the CPU with the same model; the machine is shared with the embedded
stack (idle while these run). The platform, KServe, BentoML and in-process onnxruntime are timed in
interleaved rounds (one call each per round), so that the machine's drift hits all of them alike.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = 15


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(ready, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peer server exited: {log.read_text()[-2000:]}")
        try:
            if ready():
                return
        except httpx.HTTPError:  # not listening yet
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"peer server not ready after {timeout_s} s: {log.read_text()[-2000:]}")


def _start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _oip_http_binary(url: str, model: str, image: np.ndarray):
    """OIP v2 HTTP with binary tensors (the layout tritonclient.http writes), output as binary too."""
    header = json.dumps({"id": "bench", "inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32",
                                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    body = header + image.tobytes()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    client = httpx.Client(timeout=300)

    def call():
        r = client.post(f"{url}/v2/models/{model}/infer", content=body, headers=headers)
        r.raise_for_status()
        size = r.headers.get("inference-header-content-length")
        if size is None:  # answered in JSON despite the binary request (KServe's HTTP path does this)
            return np.asarray(r.json()["outputs"][0]["data"], np.float32)
        return np.frombuffer(r.content[int(size):], np.float32)

    return call


def _oip_grpc(address: str, model: str, image: np.ndarray):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address, channel_args=[("grpc.max_receive_message_length", 64 << 20),
                                                                     ("grpc.max_send_message_length", 64 << 20)])  # fmt: skip
    tensor = grpcclient.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    wanted = [grpcclient.InferRequestedOutput("probabilities")]
    return lambda: client.infer(model, [tensor], outputs=wanted, client_timeout=300).as_numpy("probabilities")


def _check(name: str, out, reference: np.ndarray) -> None:
    """Within the compile-time parity tolerance: the platform may serve OpenVINO (its measured runtime)."""
    from serving.runtimes import DEFAULT_TOLERANCE

    if not np.allclose(np.asarray(out).reshape(reference.shape), reference, atol=DEFAULT_TOLERANCE):
        raise RuntimeError(f"{name} answered differently from onnxruntime in-process")


def bench_peers(onnx_path: Path, image: np.ndarray, platform_http: str, platform_grpc: str, work: Path,
                served_runtime: str = "onnxruntime", threads: int = 2) -> list[dict]:
    """Figures for P1-peers. `image` is the preprocessed study, shape (1, 4, D, H, W), float32.

    The platform, KServe and BentoML (idle between calls) run side by side and are timed interleaved with
    in-process onnxruntime; `mlflow models serve` (seconds per call, JSON) is timed on its own after."""
    import onnxruntime as ort

    from bench.timing import figure, interleaved_p50_ms, p50_ms

    image = np.ascontiguousarray(image, dtype=np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    reference = session.run(None, {"image": image})[0]
    from serving.runtimes import open_session

    served = open_session(served_runtime, onnx_path, threads)  # what the replica runs, called in-process
    # The platform: the gateway's OIP v2 routes (Ray Serve -> the segmentation replica's runtime).
    calls = {"raw_onnxruntime": lambda: session.run(None, {"image": image}),
             "served_runtime_in_process": lambda: served.run({"image": image})["probabilities"],
             "platform_oip_http_binary": _oip_http_binary(platform_http, "segmentation", image),
             "platform_oip_grpc": _oip_grpc(platform_grpc, "segmentation", image)}  # fmt: skip
    repo = work / "repo" / "segmentation" / "1"
    repo.mkdir(parents=True)
    shutil.copy(onnx_path, repo / "model.onnx")
    servers: list[subprocess.Popen] = []
    try:
        # KServe ModelServer.
        http_port, grpc_port = _free_port(), _free_port()
        log = work / "kserve.log"
        servers.append(_start([sys.executable, str(ROOT / "tests/external/kserve_onnx_server.py"), str(work / "repo"),
                               "--http-port", str(http_port), "--grpc-port", str(grpc_port)], log))  # fmt: skip
        _wait(lambda: httpx.get(f"http://127.0.0.1:{http_port}/v2/models/segmentation/ready", timeout=2).status_code == 200,
              servers[-1], log)  # fmt: skip
        calls["kserve_grpc"] = _oip_grpc(f"127.0.0.1:{grpc_port}", "segmentation", image)
        kserve_http = _oip_http_binary(f"http://127.0.0.1:{http_port}", "segmentation", image)
        # BentoML.
        port, log = _free_port(), work / "bentoml.log"
        servers.append(_start([str(Path(sys.executable).parent / "bentoml"), "serve", "bench.peer_servers.bento_service:OnnxPeer",
                               "--host", "127.0.0.1", "--port", str(port)], log,
                              {"ONCOSERVE_BENCH_ONNX": str(onnx_path), "BENTOML_DO_NOT_TRACK": "True", "PYTHONPATH": str(ROOT)}))  # fmt: skip
        import bentoml

        _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200, servers[-1], log)
        npy = work / "image.npy"
        with bentoml.SyncHTTPClient(f"http://127.0.0.1:{port}", timeout=300) as bento:

            def as_file():  # writing the .npy and reading the answer's are part of the call
                np.save(npy, image)
                return np.load(bento.infer_npy(tensor=npy))

            # (Arrays as JSON, `bento.infer(image=...)`, are not timed: one such request took over 300 s here.)
            calls["bentoml_npy_file"] = as_file
            for name, call in calls.items():
                _check(name, call(), reference)
            timings = interleaved_p50_ms(calls, RUNS)
        # KServe's HTTP path answers in JSON (about 5 s a call): timed alone, not to stretch the rounds.
        _check("kserve_http_binary", kserve_http(), reference)
        timings["kserve_http_binary"] = p50_ms(kserve_http, n=3)
    finally:
        for proc in servers:
            _stop(proc)
    # mlflow models serve (ONNX flavour, JSON only).
    import mlflow.onnx
    import onnx

    model_dir = work / "mlflow-model"
    mlflow.onnx.save_model(onnx.load(str(onnx_path)), str(model_dir))
    port, log = _free_port(), work / "mlflow.log"
    proc = _start([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                   "-h", "127.0.0.1", "-p", str(port), "-w", "1"], log,
                  {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})  # it execs `uvicorn`  # fmt: skip
    try:
        _wait(lambda: httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200, proc, log)
        client = httpx.Client(timeout=600)

        def call():  # the JSON encoding is part of the call: it is what a client of this server must do
            payload = json.dumps({"inputs": {"image": image.tolist()}})
            r = client.post(f"http://127.0.0.1:{port}/invocations", content=payload, headers={"Content-Type": "application/json"})
            r.raise_for_status()
            return np.asarray(r.json()["predictions"]["probabilities"], np.float32)

        _check("mlflow", call(), reference)
        timings["mlflow_models_serve_json"] = p50_ms(call, n=3)
    finally:
        _stop(proc)
    ort_ms = timings.pop("raw_onnxruntime")
    runtime_ms = timings.pop("served_runtime_in_process")
    figures = [figure("P1peers_raw_onnxruntime_p50", ort_ms, "ms"),
               figure(f"P1peers_served_runtime_in_process_p50 ({served_runtime}, {threads} threads)", runtime_ms, "ms")]
    for name, ms in timings.items():
        figures += [figure(f"P1peers_{name}_p50", ms, "ms"), figure(f"P1peers_{name}_over_ort", ms / ort_ms, "ratio")]
        if name.startswith("platform"):  # the target: the served runtime's own compute plus <= 10 %
            figures.append(figure(f"P1peers_{name}_over_served_runtime", ms / runtime_ms, "ratio", "<= 1.10",
                                  ms / runtime_ms <= 1.10))  # fmt: skip
    best_platform = min(v for k, v in timings.items() if k.startswith("platform"))
    best_peer = min(v for k, v in timings.items() if not k.startswith("platform"))
    figures.append(figure("P1peers_platform_best_over_best_peer", best_platform / best_peer, "ratio",
                          "< 1 (platform lowest)", best_platform < best_peer))  # fmt: skip
    return figures
