"""The gateway's parts outside Serve: request decoding shared by REST and gRPC, caller checks, replica
errors, and raw inference's model/version checks (fake handles stand in for Serve's)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from starlette.requests import Request

from oncoserve.auth import Identity, TokenStore
from oncoserve.settings import Settings
from serving.backends import BackendUnavailable
from services import remote_errors
from services.callers import CallerGate
from services.grpc_servicers import study_pb2
from services.raw_inference import RawInference
from services.study_input import InputError
from services.study_requests import StudyRequests, validate_age


def _no_store():
    raise AssertionError("the object store must not be read for a request that is refused")


def _requests() -> StudyRequests:
    return StudyRequests(_no_store, "oncoserve-data", "salt")


def _json_request(payload: dict) -> tuple[Request, bytes]:
    headers = [(b"content-type", b"application/json")]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}), json.dumps(payload).encode()


@pytest.mark.parametrize("raw, expected", [(None, None), ("", None), ("61", 61.0), (0, 0.0), (130.0, 130.0)])
def test_ages_that_are_accepted(raw, expected):
    assert validate_age(raw) == expected


@pytest.mark.parametrize("raw, message", [("old", "not a number"), (-1, "outside 0-130"), (131, "outside 0-130"),
                                          (float("nan"), "outside 0-130"), (float("inf"), "outside 0-130")])  # fmt: skip
def test_ages_that_are_refused(raw, message):
    with pytest.raises(InputError, match=message) as refused:
        validate_age(raw)
    assert refused.value.status == 400


@pytest.mark.parametrize("request_fields", [{"dicom_zip": b"PK\x03\x04junk"}, {"s3_uri": "s3://oncoserve-data/case/"},
                                            {"nifti": {"t1": b"junk"}}])  # fmt: skip
def test_grpc_and_rest_refuse_the_same_bad_age_on_every_input_kind(request_fields):
    """gRPC once validated the age only for NIfTI input; both protocols now decode through one path."""
    grpc_request = study_pb2.AnalyzeRequest(age=200.0, **request_fields)
    with pytest.raises(InputError, match="outside 0-130") as grpc_refused:
        asyncio.run(_requests().from_grpc(grpc_request))
    rest_request, body = _json_request({"s3_uri": "s3://oncoserve-data/case/", "age": 200})
    with pytest.raises(InputError, match="outside 0-130") as rest_refused:
        asyncio.run(_requests().from_rest(rest_request, body))
    assert grpc_refused.value.status == rest_refused.value.status == 400


@pytest.mark.parametrize("fields, given", [({}, "none"), ({"dicom_zip": b"PK", "s3_uri": "s3://oncoserve-data/c/"}, "dicom_zip, s3_uri")])
def test_grpc_needs_exactly_one_input(fields, given):
    with pytest.raises(InputError, match=f"exactly one of nifti, dicom_zip or s3_uri \\(got {given}\\)"):
        asyncio.run(_requests().from_grpc(study_pb2.AnalyzeRequest(**fields)))


def test_grpc_series_mapping_is_parsed_like_the_rest_field():
    with pytest.raises(InputError, match="mapping: not JSON"):
        asyncio.run(_requests().from_grpc(study_pb2.AnalyzeRequest(dicom_zip=b"PK", mapping_json="{t1ce")))


def test_rest_content_types_and_json_bodies():
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"text/plain")]})
    with pytest.raises(InputError, match="not supported") as refused:
        asyncio.run(_requests().from_rest(request, b"x"))
    assert refused.value.status == 415
    request, _ = _json_request({})
    with pytest.raises(InputError, match="s3_uri"):
        asyncio.run(_requests().from_rest(request, b'{"case_id": "x"}'))
    with pytest.raises(InputError, match="not JSON"):
        asyncio.run(_requests().from_rest(request, b"{"))


def test_caller_checks(tmp_path):
    settings = Settings(home=tmp_path)
    store = TokenStore(settings.tokens_file)
    admin = store.create("root", "admin", None)
    app = store.create("app1", "app", Identity("root", "admin"))
    gate = CallerGate(settings)
    assert gate.authenticate(f"Bearer {app}", "app", "analysis") == Identity("app1", "app")
    cases = [("", 401, "needs a token"), ("Basic abc", 401, "Bearer"), ("Bearer osv_unknown", 401, "not valid"),
             (f"Bearer {app}", 403, "needs role platform")]  # fmt: skip
    for header, status, message in cases:
        with pytest.raises(InputError, match=message) as refused:
            gate.authenticate(header, "platform", "promotion")
        assert refused.value.status == status, header
    with pytest.raises(InputError, match="clinician") as refused:
        gate.stored_study_access(Identity("app1", "app"), "analysing a stored study")
    assert refused.value.status == 403
    gate.stored_study_access(gate.authenticate(f"Bearer {admin}", "app", "x"), "analysing a stored study")
    # Auth off (local development only): no token is no identity, and stored studies are open.
    off = CallerGate(Settings(home=tmp_path, serve_auth=False))
    assert off.authenticate("", "app", "analysis") is None
    off.stored_study_access(None, "analysing a stored study")


def test_rate_limit_is_per_token_else_per_peer(tmp_path):
    gate = CallerGate(Settings(home=tmp_path, serve_rate_limit_per_min=60, serve_rate_limit_burst=1))
    gate.limit("Bearer a", "10.0.0.1")
    with pytest.raises(InputError, match="rate limit") as refused:
        gate.limit("Bearer a", "10.0.0.2")  # the same token from another address is the same caller
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    gate.limit("Bearer b", "10.0.0.1")
    gate.limit("", "10.0.0.1")
    with pytest.raises(InputError):
        gate.limit("", "10.0.0.1")


async def _raises(exc):
    raise exc


def test_replica_failures_become_clear_answers():
    with pytest.raises(InputError, match="takes inputs") as refused:
        asyncio.run(remote_errors.call("survival", _raises(ValueError("takes inputs ['x']")), bad_input_is_400=True))
    assert refused.value.status == 400
    with pytest.raises(InputError, match="segmentation: inference backend triton unavailable") as refused:
        asyncio.run(remote_errors.call("segmentation", _raises(BackendUnavailable("triton", "down"))))
    assert refused.value.status == 503
    with pytest.raises(ValueError):  # a ValueError from a study analysis is a bug (500), not the caller's fault
        asyncio.run(remote_errors.call("survival", _raises(ValueError("bug"))))
    with pytest.raises(KeyError):
        asyncio.run(remote_errors.call("survival", _raises(KeyError("bug"))))


def test_a_failure_of_the_version_is_recorded_against_its_pinned_version_and_an_outage_is_not():
    """What the champion guard counts (pipelines.champion_guard): model errors, not a backend down."""
    from types import SimpleNamespace

    from services.study_analysis import StudyAnalysis

    class Monitor:
        def __init__(self):
            self.failures = []

        def failed(self, source, task, version, error, case_ref):
            self.failures.append((task, version, type(error).__name__))

    monitor = Monitor()
    analysis = StudyAnalysis({}, None, None, None, "salt", monitor)
    source = SimpleNamespace(study=SimpleNamespace(case_id="c1", site=None), kind="nifti")
    with pytest.raises(RuntimeError):
        asyncio.run(analysis._recorded(source, "segmentation", _raises(RuntimeError("invalid dimensions")), "7"))
    with pytest.raises(BackendUnavailable):
        asyncio.run(analysis._recorded(source, "segmentation", _raises(BackendUnavailable("triton", "down")), "7"))
    assert monitor.failures == [("segmentation", "7", "RuntimeError")]


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def run():
            return self.fn(*args)

        return run()


class _FakeHandle:
    """A task deployment's handle: `describe` and `infer_raw`, as the replica answers them."""

    def __init__(self, version: str):
        self.calls = []
        self.describe = _Method(lambda: {"version": version, "ready": True, "platform": "openvino",
                                         "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
                                         "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]})  # fmt: skip
        self.infer_raw = _Method(self._infer)

    def _infer(self, inputs):
        self.calls.append(inputs)
        if set(inputs) != {"x"}:
            raise ValueError(f"model takes inputs ['x'], got {sorted(inputs)}")
        return {"version": "7", "outputs": {"y": inputs["x"] * 2}}


def test_raw_inference_checks_model_and_version_then_calls_the_replica():
    from services.oip import HEADER_LENGTH

    handle = _FakeHandle("7")
    raw = RawInference({"survival": handle})
    assert asyncio.run(raw.metadata("survival", None))["platform"] == "openvino"
    with pytest.raises(InputError, match="unknown model 'tumour'") as refused:
        asyncio.run(raw.check("tumour", None))
    assert refused.value.status == 404
    with pytest.raises(InputError, match="version 3 is not loaded; serving version 7") as refused:
        asyncio.run(raw.check("survival", "3"))
    assert refused.value.status == 404
    x = np.array([[1.0, 2.0]], np.float32)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}],
                       "parameters": {"binary_data_output": True}}).encode()  # fmt: skip
    body, headers = asyncio.run(raw.rest("survival", None, head + x.tobytes(), str(len(head))))
    split = int(headers[HEADER_LENGTH])
    np.testing.assert_array_equal(np.frombuffer(body[split:], np.float32), [2.0, 4.0])
    wrong = json.dumps({"inputs": [{"name": "z", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode()
    with pytest.raises(InputError, match="takes inputs") as refused:  # the replica knows its inputs: 400
        asyncio.run(raw.rest("survival", None, wrong, None))
    assert refused.value.status == 400 and len(handle.calls) == 2
    with pytest.raises(InputError, match="not JSON") as refused:
        asyncio.run(raw.rest("survival", None, b"{", None))
    assert refused.value.status == 400 and len(handle.calls) == 2  # a malformed request never reaches the replica
