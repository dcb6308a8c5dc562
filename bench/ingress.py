"""P1-ingress: the same served stack behind Serve's Python proxy and behind its direct ingress (HAProxy in
front of the gateway replicas' own HTTP servers; settings.serve_ingress, docs/SCALING.md).

Per ingress, in interleaved rounds with the served runtime called in-process on the same window (so each
ratio is measured against compute timed in the same minutes): raw OIP v2 over HTTP (binary tensors) and
gRPC on the segmentation network's window, and a whole segmentation request (compressed NIfTI in, findings
and mask out) against the model's own compute over the study. Between phases (proxy, haproxy, proxy again)
the stack's Ray head is restarted with the other ingress and the bench config deployed again (the only way
Ray takes the switch).
"""

from __future__ import annotations

import httpx
import numpy as np

from bench.peers import _check, _oip_grpc, _oip_http_binary
from bench.serving import _compiled_segmentation, _deploy, _files, _in_process_segmentation, _model_input, served_stack
from bench.timing import figure, interleaved_p50_ms

RUNS = 15


def _restart_ray(settings, ingress: str):
    from pipelines.stack import EmbeddedStack
    from pipelines.stack.process import stop

    settings = settings.model_copy(update={"serve_ingress": ingress})
    stack = EmbeddedStack(settings)
    stop(stack.records()["ray"], grace_s=20.0)
    stack.up()
    return settings


def _measure(settings, registry, store, files: dict, window: np.ndarray, runtime) -> dict[str, float]:
    url = settings.serve_url
    _, compute = _in_process_segmentation(settings, registry, store, files)
    calls = {"runtime_in_process": lambda: runtime.run({"image": window})["probabilities"],
             "oip_http_binary": _oip_http_binary(url, "segmentation", window),
             "oip_grpc": _oip_grpc(f"{settings.host}:{settings.serve_grpc_port}", "segmentation", window),
             "segmentation_request": lambda: httpx.post(f"{url}/v1/segmentation:predict", files=files, timeout=300).raise_for_status(),
             "segmentation_compute_in_process": compute}  # fmt: skip
    reference = calls["runtime_in_process"]()
    for name in ("oip_http_binary", "oip_grpc"):
        _check(f"platform {name}", calls[name](), reference)
    return interleaved_p50_ms(calls, RUNS, warmup_rounds=2)


def bench_ingress() -> list[dict]:
    from imaging.dataset import read_case
    from imaging.preprocess import preprocess
    from serving.artifacts import compiled_runtime
    from serving.runtimes import open_session

    figures = []
    with served_stack("osb-in-") as (settings, data, registry, store):
        case = sorted(p for p in data.iterdir() if p.is_dir())[0]
        files = _files(case)
        onnx_path = _compiled_segmentation(settings, registry, store, settings.home / "ingress" / "model.onnx")
        window = _model_input(onnx_path, preprocess(read_case(data, case.name)).image[None])
        version = registry.alias("segmentation", "champion")
        served = compiled_runtime(registry, store, settings.bucket_models, settings.triton_repo_prefix, "segmentation", version)
        runtime = open_session(served, onnx_path, 2)  # the bench config's replica: this runtime, 2 threads
        # proxy, haproxy, proxy again: drift over the ~10 minutes shows as a difference between the two proxy phases.
        for phase, ingress in (("proxy", "proxy"), ("haproxy", "haproxy"), ("proxy_again", "proxy")):
            if ingress != settings.serve_ingress:
                settings = _restart_ray(settings, ingress)
                _deploy(settings, settings.home, batch=8)
            t = _measure(settings, registry, store, files, window, runtime)
            base = t["runtime_in_process"]
            figures += [figure(f"P1ingress_{phase}_runtime_in_process_p50 ({served}, 2 threads)", base, "ms")]
            for name in ("oip_http_binary", "oip_grpc"):
                figures += [figure(f"P1ingress_{phase}_{name}_p50", t[name], "ms"),
                            figure(f"P1ingress_{phase}_{name}_over_served_runtime", t[name] / base, "ratio", "<= 1.10",
                                   t[name] / base <= 1.10)]  # fmt: skip
            ratio = t["segmentation_request"] / t["segmentation_compute_in_process"]
            figures += [figure(f"P1ingress_{phase}_segmentation_request_p50", t["segmentation_request"], "ms"),
                        figure(f"P1ingress_{phase}_segmentation_compute_p50", t["segmentation_compute_in_process"], "ms"),
                        figure(f"P1ingress_{phase}_segmentation_request_over_compute", ratio, "ratio", "<= 1.5", ratio <= 1.5)]  # fmt: skip
    return figures
