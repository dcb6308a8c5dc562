"""Open Inference Protocol v2 (the KServe / Triton protocol): tensors <-> REST and gRPC messages.

REST follows the binary-tensor extension that tritonclient.http uses: a JSON header whose length is in
`Inference-Header-Content-Length`, then raw little-endian tensor bytes in input order. gRPC uses the
`inference.GRPCInferenceService` messages (tritonclient's generated code) with `raw_input_contents`.
"""

from __future__ import annotations

import json

import numpy as np

from serving.datatypes import NP_TO_V2, V2_TO_NP

GRPC_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents",
                 "INT8": "int_contents", "UINT8": "uint_contents", "BOOL": "bool_contents"}  # fmt: skip
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_ELEMENTS = 64 * 1024 * 1024  # per tensor: refuses absurd shapes before allocating


class ProtocolError(ValueError):
    """A malformed inference request (the API answers 400 with this message)."""


def _shape(raw, name: str) -> tuple[int, ...]:
    if not isinstance(raw, (list, tuple)) or not all(isinstance(d, int) and d >= 0 for d in raw):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers")
    shape = tuple(int(d) for d in raw)
    if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
        raise ProtocolError(f"input {name!r}: shape {list(shape)} is larger than {MAX_ELEMENTS} elements")
    return shape


def _dtype(datatype, name: str) -> np.dtype:
    if datatype not in V2_TO_NP:
        raise ProtocolError(f"input {name!r}: datatype {datatype!r} is not one of {sorted(V2_TO_NP)}")
    return np.dtype(V2_TO_NP[datatype])


def _from_bytes(data: bytes, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(f"input {name!r}: {len(data)} bytes of data for shape {list(shape)} ({expected} expected)")
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype, copy=False)


def _little_endian(array: np.ndarray) -> np.ndarray:
    """Contiguous and little-endian, as the protocol's raw bytes are (no copy when already so)."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def decode_rest(body: bytes, header_length: str | None) -> tuple[dict[str, np.ndarray], dict]:
    """An HTTP infer request body -> ({input name: array}, the JSON header)."""
    try:
        split = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer") from None
    if not 0 < split <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {split} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:split])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"request header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise ProtocolError("request must be a JSON object with a non-empty `inputs` list")
    offset, inputs, view = split, {}, memoryview(body)  # slices of a view: the tensors are not copied
    for item in header["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("every input needs a `name`")
        name = item["name"]
        shape, dtype = _shape(item.get("shape"), name), _dtype(item.get("datatype"), name)
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(body):
                raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the body")
            inputs[name] = _from_bytes(view[offset : offset + size], dtype, shape, name)
            offset += size
        else:
            try:
                array = np.asarray(item.get("data"), dtype=dtype)
                inputs[name] = array.reshape(shape)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(f"input {name!r}: data does not match shape {list(shape)} ({exc})") from None
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes after the last binary input")
    return inputs, header


def encode_rest(model: str, version: str, outputs: dict[str, np.ndarray], header: dict) -> tuple[bytes, dict]:
    """Outputs -> (body, extra headers). Binary unless the request asked for JSON outputs."""
    params = header.get("parameters") or {}
    wanted = {o.get("name"): o for o in header.get("outputs") or [] if isinstance(o, dict)}
    names = [n for n in outputs if not wanted or n in wanted]
    missing = sorted(set(wanted) - set(outputs))
    if missing:
        raise ProtocolError(f"model {model} has no output {', '.join(missing)} (it has {', '.join(outputs)})")
    described, blobs = [], []
    for name in names:
        array = _little_endian(outputs[name])
        entry = {"name": name, "datatype": NP_TO_V2[array.dtype], "shape": list(array.shape)}
        binary = (wanted.get(name, {}).get("parameters") or {}).get("binary_data", params.get("binary_data_output", False))
        if binary:
            data = memoryview(array.reshape(-1).view(np.uint8))
            entry["parameters"] = {"binary_data_size": data.nbytes}
            blobs.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    response = {"model_name": model, "model_version": version, "outputs": described}
    if header.get("id"):
        response["id"] = header["id"]
    head = json.dumps(response).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    # One copy of each output into the body (joined views), not three (tobytes, join, +).
    return b"".join([head, *blobs]), {HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"}


def decode_grpc(request) -> dict[str, np.ndarray]:
    """A ModelInferRequest -> {input name: array} (raw_input_contents or typed contents)."""
    inputs = {}
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    for i, item in enumerate(request.inputs):
        shape, dtype = _shape(list(item.shape), item.name), _dtype(item.datatype, item.name)
        if raw:
            inputs[item.name] = _from_bytes(raw[i], dtype, shape, item.name)
        else:
            values = getattr(item.contents, GRPC_CONTENTS.get(item.datatype, "fp32_contents"))
            try:
                inputs[item.name] = np.asarray(values, dtype=dtype).reshape(shape)
            except ValueError as exc:
                raise ProtocolError(f"input {item.name!r}: contents do not match shape {list(shape)} ({exc})") from None
    if not inputs:
        raise ProtocolError("the request has no inputs")
    return inputs


def encode_grpc(pb, model: str, version: str, outputs: dict[str, np.ndarray], request) -> object:
    """Outputs -> ModelInferResponse (raw_output_contents), limited to the requested outputs."""
    wanted = [o.name for o in request.outputs]
    missing = sorted(set(wanted) - set(outputs))
    if missing:
        raise ProtocolError(f"model {model} has no output {', '.join(missing)} (it has {', '.join(outputs)})")
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
    for name in wanted or list(outputs):
        array = _little_endian(outputs[name])
        tensor = response.outputs.add()
        tensor.name, tensor.datatype = name, NP_TO_V2[array.dtype]
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response
