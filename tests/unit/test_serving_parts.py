"""Serving parts without servers: deployment config, the OIP v2 codec, request decoding, DICOM SEG."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from imaging.study import Volume
from services import deploy_config
from services.oip import HEADER_LENGTH, V2_TO_NP, ProtocolError, decode_grpc, decode_rest, encode_grpc, encode_rest
from services.study_input import InputError, from_dicom_zip, from_nifti, from_s3


# -- deployment config ------------------------------------------------------------------------------
def test_packaged_deployment_config_is_valid_and_complete():
    config = deploy_config.load()
    assert set(config.deployments) == {"gateway", "localization", "segmentation", "classification", "survival", "reporting"}
    assert config.deployments["reporting"].generator.kind == "template" and config.deployments["reporting"].retrieval
    options = config.deployments["segmentation"].serve_options()
    assert options["autoscaling_config"]["max_replicas"] >= options["autoscaling_config"]["min_replicas"]
    assert options["ray_actor_options"]["num_cpus"] > 0
    window = config.deployments["segmentation"].sliding_window
    assert window is not None and window.mirror is False and window.overlap is None  # the version's own overlap
    assert "resources" not in options["ray_actor_options"]  # anywhere in the cluster unless a config says otherwise


def test_a_deployment_can_ask_for_custom_ray_resources_and_a_cluster_without_them_is_refused(tmp_path):
    from pipelines.serving import ServeError, _check_resources

    path = tmp_path / "deployments.yaml"
    text = deploy_config.DEFAULT_FILE.read_text().replace(
        "  segmentation:\n", "  segmentation:\n    resources: {oncoserve_worker: 2}\n    max_replicas_per_node: 1\n", 1)
    path.write_text(text)
    config = deploy_config.load(path)
    options = config.deployments["segmentation"].serve_options()
    assert options["ray_actor_options"]["resources"] == {"oncoserve_worker": 2} and options["max_replicas_per_node"] == 1
    assert "max_replicas_per_node" not in config.deployments["survival"].serve_options()  # Serve's default
    assert config.document()["deployments"]["segmentation"]["resources"] == {"oncoserve_worker": 2}  # the chart's too
    # A replica needs two worker nodes' worth, the cluster has one: Serve would wait forever.
    with pytest.raises(ServeError, match="need the Ray resource oncoserve_worker .2 each, at least 1 replica. and this cluster has 1"):
        _check_resources(config, {"CPU": 64.0, "oncoserve_worker": 1.0})
    _check_resources(config, {"CPU": 64.0, "oncoserve_worker": 2.0})
    with pytest.raises(ServeError, match="reserves .* CPUs at its minimum replicas"):
        _check_resources(config, {"CPU": 1.0, "oncoserve_worker": 2.0})


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"segmentation": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}, "min_replicas is larger"),
        ({"survival": {"backend": {"kind": "triton"}}}, "needs triton_url"),
        ({"survival": {"batching": {"max_batch_size": 0}}}, "max_batch_size"),
        ({"classification": {"replicas": 2}}, "Extra inputs"),
        ({"reporting": {"generator": {"kind": "openai"}}}, "needs url and model"),
        ({"segmentation": {"generator": {"kind": "template"}}}, "reporting deployment only"),
        ({"classification": {"sliding_window": {"mirror": True}}}, "segmentation deployment only"),
        ({"segmentation": {"sliding_window": {"overlap": 1.0}}}, "overlap"),
        ({"classification": {"num_cpus": 0.25}}, "num_cpus 0.25 is not backend.threads 1"),
        ({"survival": {"max_ongoing_requests": 2}}, "could never hold a full batch"),
        ({"localization": {"autoscaling": {"target_ongoing_requests": 2.0}}}, "between max_batch_size 4"),
    ],
)
def test_invalid_deployment_configs_name_the_field(tmp_path, patch, message):
    raw = json.loads(json.dumps(__import__("yaml").safe_load(deploy_config.DEFAULT_FILE.read_text())))
    for name, fields in patch.items():
        raw["deployments"][name].update(fields)
    path = tmp_path / "d.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(deploy_config.ConfigError, match=message) as err:
        deploy_config.load(path)
    assert str(path) in str(err.value)


def test_packaged_model_replicas_reserve_their_threads_and_batch_within_the_compiled_limit():
    """What Ray reserves is what a replica's runtime uses; a batch fits the Triton config compile writes;
    the autoscaler's target is a full batch in flight."""
    import yaml

    compiled = yaml.safe_load((Path(deploy_config.__file__).parents[1] / "pipelines" / "pipeline.yaml").read_text())
    config = deploy_config.load()
    for task in ("localization", "segmentation", "classification", "survival"):
        spec = config.deployments[task]
        assert spec.num_cpus == spec.backend.threads
        assert spec.batching.max_batch_size <= compiled["compile"]["max_batch"]
        assert spec.batching.max_batch_size <= spec.autoscaling.target_ongoing_requests <= spec.max_ongoing_requests


def test_omitted_resources_follow_the_threads_and_the_batch(tmp_path):
    from pipelines.stack.components import ray_cpus

    (tmp_path / "d.yaml").write_text("deployments: {gateway: {}, localization: {backend: {threads: 2}, max_ongoing_requests: 8}, "
                                     "segmentation: {}, classification: {}, survival: {}, reporting: {}}")
    config = deploy_config.load(tmp_path / "d.yaml")
    loc = config.deployments["localization"]
    assert loc.num_cpus == 2 and loc.autoscaling.target_ongoing_requests == loc.batching.max_batch_size
    assert config.deployments["gateway"].num_cpus == 0.25 and config.deployments["gateway"].autoscaling.target_ongoing_requests == 2
    assert deploy_config.cpu_reservation(config, "min_replicas") == 0.25 + 2 + 1 + 1 + 1 + 0.25
    packaged = deploy_config.cpu_reservation(deploy_config.load())
    assert ray_cpus(None) >= packaged and ray_cpus(3) == 3


def test_missing_deployment_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("deployments: {gateway: {}}\n")
    with pytest.raises(deploy_config.ConfigError, match="deployments missing: localization"):
        deploy_config.load(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("deployments: [\n")
    with pytest.raises(deploy_config.ConfigError, match="not valid YAML"):
        deploy_config.load(tmp_path / "b.yaml")
    with pytest.raises(deploy_config.ConfigError, match="not found"):
        deploy_config.load(tmp_path / "none.yaml")


# -- Open Inference Protocol v2 ---------------------------------------------------------------------
def _binary_request(arrays: dict[str, np.ndarray], extra: dict | None = None) -> tuple[bytes, str]:
    header = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": v.nbytes}} for k, v in arrays.items()], **(extra or {})}  # fmt: skip
    head = json.dumps(header).encode()
    return head + b"".join(v.tobytes() for v in arrays.values()), str(len(head))


def test_rest_binary_round_trip_matches_tritonclient_layout():
    image = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    body, length = _binary_request({"image": image}, {"parameters": {"binary_data_output": True}, "id": "r1"})
    inputs, header = decode_rest(body, length)
    np.testing.assert_array_equal(inputs["image"], image)
    out, headers = encode_rest("segmentation", "3", {"probabilities": image * 2}, header)
    split = int(headers[HEADER_LENGTH])
    meta = json.loads(out[:split])
    assert meta["model_version"] == "3" and meta["id"] == "r1"
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == image.nbytes
    np.testing.assert_array_equal(np.frombuffer(out[split:], np.float32).reshape(image.shape), image * 2)


@pytest.mark.parametrize("datatype", sorted(V2_TO_NP))
@pytest.mark.parametrize("shape", [(2, 3, 4), (0, 3)])
def test_rest_binary_outputs_decode_back_for_every_datatype(datatype, shape):
    array = (np.arange(int(np.prod(shape))).reshape(shape) % 3).astype(V2_TO_NP[datatype])
    out, headers = encode_rest("m", "1", {"y": array, "big_endian": array.astype(array.dtype.newbyteorder(">"))},
                               {"parameters": {"binary_data_output": True}})  # fmt: skip
    split = int(headers[HEADER_LENGTH])
    described = json.loads(out[:split])["outputs"]
    assert [o["datatype"] for o in described] == [datatype, datatype]
    header = {"inputs": [{**o, "name": f"x{i}"} for i, o in enumerate(described)]}
    head = json.dumps(header).encode()
    inputs, _ = decode_rest(head + out[split:], str(len(head)))
    for name in ("x0", "x1"):
        assert inputs[name].dtype == array.dtype and inputs[name].shape == shape
        np.testing.assert_array_equal(inputs[name], array)


def test_rest_json_tensors_and_requested_outputs():
    body = json.dumps({"inputs": [{"name": "age", "shape": [1, 1], "datatype": "FP32", "data": [61.0]}],
                       "outputs": [{"name": "risk"}]}).encode()  # fmt: skip
    inputs, header = decode_rest(body, None)
    assert inputs["age"].shape == (1, 1) and inputs["age"].dtype == np.float32
    out, headers = encode_rest("survival", "1", {"risk": np.array([[0.5]], np.float32), "other": np.zeros(1, np.float32)}, header)
    meta = json.loads(out)
    assert [o["name"] for o in meta["outputs"]] == ["risk"] and meta["outputs"][0]["data"] == [0.5]
    with pytest.raises(ProtocolError, match="no output nope"):
        encode_rest("survival", "1", {"risk": np.zeros(1, np.float32)}, {"outputs": [{"name": "nope"}]})


@pytest.mark.parametrize(
    "body, length, message",
    [
        (b"{not json", None, "not JSON"),
        (b'{"inputs": []}', None, "non-empty `inputs`"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "STRING", "data": [1, 2]}]}', None, "datatype"),
        (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "shape": [100000, 100000], "datatype": "FP32", "data": []}]}', None, "larger than"),
        (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}', None, "does not match"),
        (b"{}", "x", "must be an integer"),
    ],
)
def test_malformed_rest_requests_are_refused_with_a_reason(body, length, message):
    with pytest.raises(ProtocolError, match=message):
        decode_rest(body, length)


def test_binary_sizes_that_do_not_add_up_are_refused():
    def request(size: int, data: bytes) -> tuple[bytes, str]:
        head = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": size}}]})
        return head.encode() + data, str(len(head))

    with pytest.raises(ProtocolError, match="runs past the body"):
        decode_rest(*request(8, b"abcd"))
    with pytest.raises(ProtocolError, match="4 bytes of data"):
        decode_rest(*request(4, b"abcd"))
    with pytest.raises(ProtocolError, match="after the last binary input"):
        decode_rest(*request(8, b"abcdefgh!"))
    with pytest.raises(ProtocolError, match="does not fit"):
        decode_rest(b"{}", "99")


def test_grpc_raw_contents_round_trip():
    from tritonclient.grpc import service_pb2

    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    request = service_pb2.ModelInferRequest(model_name="localization", id="g1")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "image", "FP32"
    tensor.shape.extend(image.shape)
    request.raw_input_contents.append(image.tobytes())
    np.testing.assert_array_equal(decode_grpc(request)["image"], image)
    response = encode_grpc(service_pb2, "localization", "2", {"heatmap": image[:1]}, request)
    assert response.model_version == "2" and response.id == "g1"
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, 3, 4), image[:1])
    request.raw_input_contents[0] = image.tobytes()[:-4]
    with pytest.raises(ProtocolError, match="bytes of data"):
        decode_grpc(request)


def test_decoded_binary_tensors_are_views_into_the_request_body():
    """Zero-copy decoding: each tensor is a read-only view of the body's bytes, not a copy."""
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.float32)
    body, length = _binary_request({"a": a, "b": b})
    inputs, _ = decode_rest(body, length)
    whole = np.frombuffer(body, np.uint8)
    for name, expected in (("a", a), ("b", b)):
        assert np.shares_memory(inputs[name], whole) and not inputs[name].flags.writeable
        np.testing.assert_array_equal(inputs[name], expected)


@pytest.mark.parametrize("datatype", sorted(V2_TO_NP))
def test_grpc_raw_and_typed_contents_for_every_datatype(datatype):
    """Raw contents (little-endian bytes, also from a big-endian array) and the typed `contents` fields
    decode to the same array, and the response's raw bytes are little-endian."""
    from tritonclient.grpc import service_pb2

    from services.oip import GRPC_CONTENTS

    array = (np.arange(12).reshape(3, 4) % 3).astype(V2_TO_NP[datatype])
    for source in (array, array.astype(array.dtype.newbyteorder(">"))):
        request = service_pb2.ModelInferRequest(model_name="m")
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = "x", datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(source.astype(source.dtype.newbyteorder("<")).tobytes())
        decoded = decode_grpc(request)["x"]
        assert decoded.dtype == array.dtype and decoded.dtype.isnative
        np.testing.assert_array_equal(decoded, array)
        response = encode_grpc(service_pb2, "m", "1", {"y": source}, request)
        assert response.outputs[0].datatype == datatype
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], array.dtype.newbyteorder("<")).reshape(3, 4), array)
    if datatype != "FP16":  # the protocol has no typed field for FP16: raw contents only
        typed = service_pb2.ModelInferRequest(model_name="m")
        tensor = typed.inputs.add()
        tensor.name, tensor.datatype = "x", datatype
        tensor.shape.extend(array.shape)
        getattr(tensor.contents, GRPC_CONTENTS[datatype]).extend(array.ravel().tolist())
        np.testing.assert_array_equal(decode_grpc(typed)["x"], array)


# -- request decoding -------------------------------------------------------------------------------
def _nifti_bytes(data: np.ndarray, affine=None) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine).to_bytes())


def test_nifti_upload_decoding_and_its_errors():
    volume = np.random.default_rng(1).random((20, 24, 20)).astype(np.float32)
    source = from_nifti({"t1": _nifti_bytes(volume), "flair": _nifti_bytes(volume)}, None, 50.0)
    assert source.study.present == ["t1", "flair"] and source.study.age == 50.0
    assert source.study.case_id.startswith("case-")  # content hash when no case id is given
    assert from_nifti({"t1": _nifti_bytes(volume)}, None, None).study.case_id != source.study.case_id
    with pytest.raises(InputError, match="unknown modality pd") as bad:
        from_nifti({"pd": _nifti_bytes(volume)}, None, None)
    assert bad.value.status == 400
    with pytest.raises(InputError, match="t2") as corrupt:
        from_nifti({"t2": b"\x1f\x8bgarbage"}, None, None)
    assert corrupt.value.status == 422
    with pytest.raises(InputError, match="4D|3D|dimension"):
        from_nifti({"t1": _nifti_bytes(np.zeros((4, 4, 4, 3), np.float32))}, None, None)
    with pytest.raises(InputError, match="case_id"):
        from_nifti({"t1": _nifti_bytes(volume)}, "../../etc/passwd", None)


@pytest.mark.parametrize("uri", ["s3://oncoserve-data/../x/", "http://x/y", "s3://Bad_Bucket/x", "s3://oncoserve-data/"])
def test_s3_uris_are_validated_before_any_request(uri):
    with pytest.raises(InputError) as err:
        from_s3(None, uri, ("oncoserve-data",), None, None)
    assert err.value.status == 400


def test_s3_uri_outside_the_allowed_buckets_is_forbidden():
    with pytest.raises(InputError, match="not readable") as err:
        from_s3(None, "s3://oncoserve-models/triton/", ("oncoserve-data",), None, None)
    assert err.value.status == 403


def test_dicom_zip_becomes_a_deidentified_study_and_a_seg(tmp_path):
    import highdicom as hd
    import pydicom

    from services.dicom_seg import build_dicom_seg
    from tests.dicom_factory import PHI_STRINGS, series_datasets, write_zip

    rng = np.random.default_rng(2)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    volume = Volume((rng.random((16, 12, 8)) * 500).astype(np.float32), affine)
    uid = pydicom.uid.generate_uid()
    archive = write_zip(tmp_path / "s.zip", {"t1": series_datasets(volume, "T1 MPRAGE", uid),
                                              "flair": series_datasets(volume, "FLAIR", uid)}, order=list(range(7, -1, -1)))  # fmt: skip
    source = from_dicom_zip(archive.read_bytes(), None, None, salt="s")
    assert source.kind == "dicom" and source.study.present == ["t1", "flair"]
    assert source.study.age == 52.0  # from PatientAge 052Y
    assert not any(p in str(ds) for ds in source.dicom_reference for p in PHI_STRINGS)
    mask = np.zeros(volume.shape, np.uint8)
    mask[4:8, 3:6, 2:5], mask[5:7, 4:5, 3:4] = 2, 4
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(__import__("io").BytesIO(build_dicom_seg(mask, source.dicom_reference, "7"))))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Necrotic tumour core (NCR)", "Peritumoral edema (ED)", "Enhancing tumour (ET)"]
    # Back to a volume: frames in the reference series' order, (rows, columns) = (y, x).
    uids = [ds.SOPInstanceUID for ds in source.dicom_reference]
    ed = seg.get_pixels_by_source_instance(uids, segment_numbers=[2], combine_segments=False)[..., 0]
    np.testing.assert_array_equal(np.transpose(ed, (2, 1, 0)) > 0, mask == 2)
    with pytest.raises(InputError, match="empty"):
        from_dicom_zip(b"", None, None, salt="s")
    with pytest.raises(InputError):
        from_dicom_zip(b"PK\x03\x04 not really a zip", None, None, salt="s")


def test_prune_metrics_keeps_live_processes_files(tmp_path):
    import os

    from services.app import prune_metrics

    live, dead = tmp_path / f"counter_{os.getpid()}.db", tmp_path / "gauge_livesum_999999999.db"
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    prune_metrics(tmp_path)
    assert live.exists() and not dead.exists()


def test_packaged_deployment_config_states_every_setting():
    """The Helm chart reads the file itself, so no setting may come from a Python default."""
    import yaml

    raw = yaml.safe_load(deploy_config.DEFAULT_FILE.read_text())
    assert raw == deploy_config.load().document()


def test_cluster_app_builder_applies_the_config_and_the_backend_switch(tmp_path, monkeypatch):
    """What KubeRay runs (`import_path: services.app:app_builder`) builds the same deployments."""
    from services.app import app_builder, deployment_options

    monkeypatch.setenv("ONCOSERVE_HOME", str(tmp_path))
    config = deploy_config.load()
    app = app_builder({"config": config.document(), "backend": {"kind": "triton", "triton_url": "tr:8001", "fallback_to_embedded": True}})
    gateway = app._bound_deployment
    assert gateway.name == "gateway"
    tasks = {a._bound_deployment.name: a._bound_deployment for a in gateway.init_args[1:5]}
    assert list(tasks) == ["localization", "segmentation", "classification", "survival"]
    assert gateway.init_args[5]._bound_deployment.name == "reporting"
    expected = deployment_options(config)
    for name, deployment in tasks.items():
        assert deployment.init_args[2]["backend"] == {"kind": "triton", "threads": 1, "triton_url": "tr:8001",
                                                       "fallback_to_embedded": True, "timeout_s": 60.0}  # fmt: skip
        assert deployment.init_args[2]["batching"] == config.deployments[name].batching.model_dump()
        assert deployment._deployment_config.max_ongoing_requests == expected[name]["max_ongoing_requests"]
        assert deployment._deployment_config.autoscaling_config.max_replicas == expected[name]["autoscaling_config"]["max_replicas"]
