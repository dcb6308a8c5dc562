"""A corpus of hostile inputs for the serving API: each entry is a request an attacker or a broken client
could send, and the 4xx it must get. Built in code so that every byte is reviewable here.

Entry: (name, method-and-route, request kwargs for httpx, expected status).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zipfile

import nibabel as nib
import numpy as np

ANALYZE = "/v1/studies:analyze"
INFER = "/v2/models/localization/infer"


def nifti(data: np.ndarray, affine=None, compress: bool = True) -> bytes:
    raw = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine).to_bytes()
    return gzip.compress(raw) if compress else raw


def singular_affine_nifti() -> bytes:
    """nibabel will not build an image from a singular affine: write a good one, then in the NIfTI-1
    header set qform_code 0 (offset 252), sform_code 1 (254) and zero the sform rows (280-327)."""
    raw = bytearray(nib.Nifti1Image(brain_like(), np.diag([2.0, 2.0, 2.0, 1.0])).to_bytes())
    raw[252:256] = np.array([0, 1], dtype="<i2").tobytes()
    raw[280:328] = bytes(48)
    return gzip.compress(bytes(raw))


def brain_like(shape=(48, 56, 48)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 100).astype(np.float32)


def _files(**named: bytes) -> dict:
    return {"files": {k: (f"{k}.nii.gz", v, "application/octet-stream") for k, v in named.items()}}


def _zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _oip(header: dict, tail: bytes = b"") -> dict:
    head = json.dumps(header).encode()
    return {"content": head + tail, "headers": {"Inference-Header-Content-Length": str(len(head))}}


def corpus(max_request_mb: int) -> list[tuple[str, str, dict, int]]:
    good = nifti(brain_like())
    header_only = nifti(brain_like())[:200]
    huge_header = bytearray(nifti(brain_like(), compress=False))
    huge_header[42:48] = np.array([2000, 2000, 2000], dtype="<i2").tobytes()  # dim[1..3] claim 8e9 voxels
    fourd = nifti(np.zeros((20, 20, 20, 3), np.float32))
    nan = brain_like()
    nan[5, 5, 5] = np.nan
    inf = brain_like()
    inf[1, 2, 3] = np.inf
    big = os.urandom((max_request_mb + 1) << 20)
    bomb = gzip.compress(b"\0" * ((max_request_mb + 8) << 20))
    zip_bomb = _zip({"a.dcm": b"\0" * (64 << 20)})  # compresses ~1000:1
    oip_ok = {"name": "image", "shape": [1, 4, 96, 112, 96], "datatype": "FP32"}
    return [
        # -- NIfTI payloads --
        ("truncated gzip NIfTI", ANALYZE, _files(t1=good[: len(good) // 2]), 422),
        ("header-only NIfTI", ANALYZE, _files(t1=header_only), 422),
        ("random bytes as NIfTI", ANALYZE, _files(t1=os.urandom(4096)), 422),
        ("empty file", ANALYZE, _files(t1=b""), 422),
        ("2D image", ANALYZE, _files(t1=nifti(np.ones((64, 64), np.float32))), 422),
        ("4D image", ANALYZE, _files(t1=fourd), 422),
        ("complex voxels", ANALYZE, _files(t1=nifti(np.ones((40, 40, 40), np.complex64))), 422),
        ("NaN voxels", ANALYZE, _files(t1=nifti(nan)), 422),
        ("infinite voxels", ANALYZE, _files(t1=nifti(inf)), 422),
        ("absurd dimensions in the header", ANALYZE, _files(t1=bytes(huge_header)), 422),
        ("singular affine", ANALYZE, _files(t1=singular_affine_nifti()), 422),
        ("blank volume (not a brain)", ANALYZE, _files(t1=nifti(np.zeros((48, 56, 48), np.float32))), 422),
        ("tiny field of view (not a head)", ANALYZE, _files(t1=nifti(brain_like((8, 8, 8)), np.diag([1.0, 1, 1, 1]))), 422),
        ("metre-sized voxels (wrong units)", ANALYZE, _files(t1=nifti(brain_like(), np.diag([1000.0, 1000, 1000, 1]))), 422),
        ("sequences that do not overlap", ANALYZE,
         _files(t1=good, flair=nifti(brain_like(), np.array([[2.0, 0, 0, 5000], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]))), 422),
        ("unknown modality field", ANALYZE, _files(pd=good), 400),
        ("no file at all", ANALYZE, {"files": {"age": (None, "50")}}, 400),
        ("age not a number", ANALYZE, {**_files(t1=good), "data": {"age": "old"}}, 400),
        ("age out of range", ANALYZE, {**_files(t1=good), "data": {"age": "-4"}}, 400),
        ("path traversal in case_id", ANALYZE, {**_files(t1=good), "data": {"case_id": "../../etc/passwd"}}, 400),
        ("too many parts", ANALYZE, {"files": {f"f{i}": (f"{i}.nii", b"x", "application/octet-stream") for i in range(20)}}, 400),
        # -- transport --
        ("wrong content type", ANALYZE, {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ("url-encoded form", ANALYZE, {"data": {"t1": "x"}}, 415),
        ("oversize body", ANALYZE, {"files": {"t1": ("t1.nii", big, "application/octet-stream")}}, 413),
        ("gzip bomb body", ANALYZE, {"content": bomb, "headers": {"content-type": "multipart/form-data; boundary=x",
                                                                    "content-encoding": "gzip"}}, 413),  # fmt: skip
        ("corrupt gzip body", ANALYZE, {"content": b"\x1f\x8b\x08garbage", "headers": {"content-type": "application/json",
                                                                                        "content-encoding": "gzip"}}, 400),  # fmt: skip
        ("unsupported content encoding", ANALYZE, {"content": b"{}", "headers": {"content-type": "application/json",
                                                                                  "content-encoding": "br"}}, 415),  # fmt: skip
        ("malformed multipart", ANALYZE, {"content": b"--x\r\nContent-Disposition: form-data\r\n", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400),  # fmt: skip
        # -- DICOM zips --
        ("zip bomb", ANALYZE, {"files": {"dicom": ("s.zip", zip_bomb, "application/zip")}}, 422),
        ("path traversal in zip", ANALYZE, {"files": {"dicom": ("s.zip", _zip({"../../evil.dcm": b"x" * 200}), "application/zip")}}, 422),
        ("zip without DICOM", ANALYZE, {"files": {"dicom": ("s.zip", _zip({"notes.txt": b"hello"}), "application/zip")}}, 422),
        ("not a zip", ANALYZE, {"files": {"dicom": ("s.zip", b"PK\x03\x04 nope", "application/zip")}}, 422),
        # -- JSON / s3 --
        ("JSON that is not JSON", ANALYZE, {"content": b"{nope", "headers": {"content-type": "application/json"}}, 400),
        ("JSON without s3_uri", ANALYZE, {"json": {"uri": "x"}}, 400),
        ("s3 path traversal", ANALYZE, {"json": {"s3_uri": "s3://oncoserve-data/../oncoserve-models/"}}, 400),
        ("s3 other bucket", ANALYZE, {"json": {"s3_uri": "s3://oncoserve-models/triton/"}}, 403),
        ("not a findings document", "/v1/reports", {"json": {"case_id": 3}}, 422),
        ("unknown task", "/v1/tumour:predict", _files(t1=good), 404),
        # -- Open Inference Protocol v2 --
        ("OIP malformed JSON", INFER, {"content": b'{"inputs": [', "headers": {}}, 400),
        ("OIP empty inputs", INFER, _oip({"inputs": []}), 400),
        ("OIP unknown datatype", INFER, _oip({"inputs": [{**oip_ok, "datatype": "STRING", "data": []}]}), 400),
        ("OIP absurd shape", INFER, _oip({"inputs": [{**oip_ok, "shape": [100000, 100000, 100]}]}), 400),
        ("OIP byte count mismatch", INFER, _oip({"inputs": [{**oip_ok, "parameters": {"binary_data_size": 16}}]}, b"\0" * 16), 400),
        ("OIP wrong input name", INFER, _oip({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}), 400),
        ("OIP unknown model", "/v2/models/nope/infer", _oip({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}), 404),
        ("OIP unloaded version", "/v2/models/localization/versions/999/infer", _oip({"inputs": [oip_ok]}), 404),
    ]
