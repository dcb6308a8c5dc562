"""A REST or gRPC analysis request -> a StudyInput, with the same checks on both protocols.

REST: multipart/form-data (NIfTI files per modality, or `dicom` = a zip; `case_id`, `age`, `site`, `mapping`
fields) or application/json `{"s3_uri", "case_id"?, "age"?}`. gRPC: `AnalyzeRequest` (nifti map,
dicom_zip or s3_uri; case_id, age, mapping_json). Either way the age is validated, the series mapping
parsed, and the heavy decoding runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

from imaging.study import MODALITIES
from services.study_input import InputError, StudyInput, from_dicom_zip, from_nifti, from_s3, parse_mapping


def validate_age(raw) -> float | None:
    """An age in years (0-130) from a form field, JSON value or gRPC float; None when absent."""
    if raw in (None, ""):
        return None
    try:
        age = float(raw)
    except (TypeError, ValueError):
        raise InputError(f"age {str(raw)[:20]!r} is not a number", 400) from None
    if not math.isfinite(age) or not 0 <= age <= 130:
        raise InputError(f"age {age} is outside 0-130 years", 400)
    return age


def reads_stored_study(content_type: str) -> bool:
    """A REST body naming a study in the data bucket (which needs a role that may read it)."""
    return content_type.lower().startswith("application/json")


SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")


def validate_site(raw) -> str | None:
    """The acquiring site or scanner a study came from (drift is measured per site); None when absent."""
    if raw in (None, ""):
        return None
    if not isinstance(raw, str) or not SITE.match(raw):
        raise InputError(f"site {str(raw)[:40]!r}: use 1-64 letters, digits, spaces, '.', '_' or '-'", 400)
    return raw


def _with_site(source: StudyInput, site: str | None) -> StudyInput:
    if site is not None:  # the caller's word wins over what the DICOM header says
        source.study.site = site
    return source


class StudyRequests:
    """Decodes analysis requests for one gateway (its object store, data bucket and de-id salt)."""

    def __init__(self, store_factory, data_bucket: str, salt: str):
        self._store_factory, self._bucket, self._salt = store_factory, data_bucket, salt

    async def from_rest(self, request, body: bytes) -> StudyInput:
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            request._body = body  # let Starlette parse the (decoded, size-checked) body we already read
            form = await request.form(max_files=8, max_fields=16)
            try:
                case_id, age = form.get("case_id") or None, validate_age(form.get("age"))
                site = validate_site(form.get("site"))
                mapping = parse_mapping(form.get("mapping") if isinstance(form.get("mapping"), str) else None)
                dicom = form.get("dicom")
                if dicom is not None and hasattr(dicom, "read"):
                    return _with_site(await self._dicom(await dicom.read(), case_id, age, mapping), site)
                files = {}
                for key, value in form.multi_items():
                    if hasattr(value, "read"):
                        if key in files:
                            raise InputError(f"{key} uploaded twice", 400)
                        files[key] = await value.read()
                return _with_site(await asyncio.to_thread(from_nifti, files, case_id, age), site)
            finally:
                await form.close()
        if reads_stored_study(ctype):
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"body is not JSON ({exc})", 400) from None
            if not isinstance(payload, dict) or not isinstance(payload.get("s3_uri"), str):
                raise InputError('JSON body must be {"s3_uri": "s3://bucket/case/", "case_id"?: ..., "age"?: ..., "site"?: ...}', 400)
            site = validate_site(payload.get("site"))
            return _with_site(await self._s3(payload["s3_uri"], payload.get("case_id"), validate_age(payload.get("age"))), site)
        raise InputError(
            f"content-type {ctype or 'none'!r} is not supported: send multipart/form-data (files "
            f"{', '.join(MODALITIES)} or dicom) or application/json with an s3_uri", 415
        )  # fmt: skip

    async def from_grpc(self, request) -> StudyInput:
        """An `oncoserve.v1.AnalyzeRequest`: exactly one of nifti, dicom_zip, s3_uri."""
        given = [name for name, present in (("nifti", bool(request.nifti)), ("dicom_zip", bool(request.dicom_zip)),
                                            ("s3_uri", bool(request.s3_uri))) if present]  # fmt: skip
        if len(given) != 1:
            raise InputError(f"send exactly one of nifti, dicom_zip or s3_uri (got {', '.join(given) or 'none'})", 400)
        case_id = request.case_id or None
        age = validate_age(request.age if request.HasField("age") else None)
        site = validate_site(request.site or None)
        if request.dicom_zip:
            return _with_site(await self._dicom(request.dicom_zip, case_id, age, parse_mapping(request.mapping_json or None)), site)
        if request.s3_uri:
            return _with_site(await self._s3(request.s3_uri, case_id, age), site)
        return _with_site(await asyncio.to_thread(from_nifti, dict(request.nifti), case_id, age), site)

    async def _dicom(self, data: bytes, case_id, age, mapping) -> StudyInput:
        return await asyncio.to_thread(from_dicom_zip, data, case_id, age, self._salt, mapping)

    async def _s3(self, uri: str, case_id, age) -> StudyInput:
        return await asyncio.to_thread(from_s3, self._store_factory(), uri, (self._bucket,), case_id, age)
