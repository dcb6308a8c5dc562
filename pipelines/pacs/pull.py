"""DICOMweb pull: a study fetched from the configured DICOMweb server (QIDO-RS to find it, WADO-RS to
retrieve it, dicomweb-client), with the credentials from settings. The job runner calls it in a job's
preprocessing step, then de-identifies the instances as the receiver does."""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from oncoserve.settings import Settings

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_INSTANCES = 5000


class PullError(RuntimeError):
    """The study cannot be fetched: not configured, not found, or the server failed (the message says which;
    `retryable` when the server failed rather than the request)."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def check_uid(study_uid: str) -> str:
    if not isinstance(study_uid, str) or len(study_uid) > 64 or not UID.match(study_uid):
        raise ValueError(f"study_uid {str(study_uid)[:80]!r}: expected a DICOM UID (digits and dots, at most 64)")
    return study_uid


def client(settings: Settings):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_auth
    from requests.auth import HTTPBasicAuth

    if not settings.dicomweb_url:
        raise PullError("no DICOMweb server is configured (ONCOSERVE_DICOMWEB_URL)")
    session = None
    if settings.dicomweb_username:
        session = create_session_from_auth(HTTPBasicAuth(settings.dicomweb_username, settings.dicomweb_password or ""))
    return DICOMwebClient(url=settings.dicomweb_url, session=session, timeout=60)


def pull_study(settings: Settings, study_uid: str) -> list[Dataset]:
    import requests

    web = client(settings)
    try:
        found = web.search_for_studies(search_filters={"StudyInstanceUID": check_uid(study_uid)}, fields=["NumberOfStudyRelatedInstances"])
        if not found:
            raise PullError(f"the DICOMweb server has no study {study_uid}")
        count = int((found[0].get("00201208") or {}).get("Value", [0])[0] or 0)
        if count > MAX_INSTANCES:
            raise PullError(f"study {study_uid} has {count} instances, more than the {MAX_INSTANCES} a job takes")
        return web.retrieve_study(study_uid)
    except requests.RequestException as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise PullError(f"the DICOMweb server at {settings.dicomweb_url} failed ({status or type(exc).__name__})",
                        retryable=status is None or status >= 500) from None
