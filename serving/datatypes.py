"""Tensor datatypes, named once: Open Inference Protocol v2 names <-> numpy <-> ONNX <-> Triton config.

The REST/gRPC codec (services/oip.py), the backends and the Triton config writer all read these maps, so
a datatype added here is one every layer accepts.
"""

from __future__ import annotations

import numpy as np

V2_TO_NP = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
            "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}  # fmt: skip
NP_TO_V2 = {np.dtype(v): k for k, v in V2_TO_NP.items()}
# ONNX TensorProto element type names (onnx.TensorProto.DataType.Name) -> v2
ONNX_TO_V2 = {"FLOAT": "FP32", "FLOAT16": "FP16", "DOUBLE": "FP64", "INT64": "INT64", "INT32": "INT32",
              "INT8": "INT8", "UINT8": "UINT8", "BOOL": "BOOL"}  # fmt: skip
# onnxruntime's NodeArg.type strings -> v2
ORT_TO_V2 = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(int64)": "INT64",
             "tensor(int32)": "INT32", "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}  # fmt: skip


def triton_type(v2: str) -> str:
    """The Triton model-config DataType name of a v2 datatype (FP32 -> TYPE_FP32, BOOL -> TYPE_BOOL)."""
    return f"TYPE_{v2}"
