"""Sending result objects to a PACS, by C-STORE (pynetdicom) or STOW-RS (dicomweb-client), and naming
where that is: `AE_TITLE@host:port` for C-STORE, an http(s) DICOMweb root for STOW-RS."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

DESTINATION = re.compile(r"^(?P<aet>[A-Za-z0-9 _.\-]{1,16})@(?P<host>[A-Za-z0-9.\-\[\]:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class StowDestination:
    url: str  # the DICOMweb root; STOW-RS posts to <url>/studies

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"


def parse_destination(text: str) -> Destination | StowDestination:
    """`AET@host:port` (C-STORE), e.g. `ORTHANC@pacs.hospital.org:4242`, or a DICOMweb root (STOW-RS), e.g.
    `https://pacs.hospital.org/dicom-web`."""
    if text.strip().lower().startswith(("http://", "https://")):
        return StowDestination(text.strip().rstrip("/"))
    match = DESTINATION.match(text.strip())
    if not match or not 0 < int(match.group("port")) < 65536:
        raise ValueError(f"PACS destination {text!r}: expected AE_TITLE@host:port (AE title at most 16 characters) or an http(s) DICOMweb URL")
    return Destination(match.group("aet").strip(), match.group("host").strip("[]"), int(match.group("port")))


class SendError(RuntimeError):
    """The PACS could not be reached or refused an object; the message says which and how."""


def c_store(destination: Destination, calling_ae: str, datasets: list[Dataset], timeout_s: float = 30.0) -> list[str]:
    """Send every dataset in one association; returns their SOP instance UIDs. Raises SendError naming the
    first failure (nothing is retried here: the job runner decides when to try again)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise SendError(f"no association with {destination} (refused, or nothing listens there)")
    sent = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{destination} did not answer the C-STORE of {ds.SOPInstanceUID} (connection lost or timed out)")
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or success with warnings
                raise SendError(f"{destination} refused {ds.SOPInstanceUID} with DICOM status 0x{code:04X}")
            sent.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return sent


def as_part10(ds: Dataset) -> Dataset:
    """`ds` as a DICOM file (preamble, File Meta with its transfer syntax): STOW-RS sends files, and a PACS
    may keep the bytes as sent, so a bare dataset would come back unreadable (no 'DICM')."""
    from io import BytesIO

    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(BytesIO(buffer.getvalue()))


def stow_rs(destination: StowDestination, datasets: list[Dataset], username: str | None = None,
            password: str | None = None, timeout_s: float = 60.0) -> list[str]:  # fmt: skip
    """Store every dataset with one STOW-RS request; returns their SOP instance UIDs. Raises SendError when
    the server cannot be reached, answers an HTTP error, or lists an instance as failed."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_auth
    from requests.auth import HTTPBasicAuth

    session = create_session_from_auth(HTTPBasicAuth(username, password or "")) if username else None
    client = DICOMwebClient(url=destination.url, session=session, timeout=timeout_s)
    try:
        response = client.store_instances([as_part10(ds) for ds in datasets])
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise SendError(f"{destination} answered HTTP {status} to the STOW-RS request") from None
    except requests.RequestException as exc:
        raise SendError(f"{destination} could not be reached: {type(exc).__name__}") from None
    failed = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in getattr(response, "FailedSOPSequence", [])]
    if failed:
        raise SendError(f"{destination} refused {', '.join(failed[:3])}")
    return [str(ds.SOPInstanceUID) for ds in datasets]


def send(destination: Destination | StowDestination, datasets: list[Dataset], calling_ae: str,
         username: str | None = None, password: str | None = None) -> list[str]:  # fmt: skip
    """The results to where the settings say: C-STORE to an AE, or STOW-RS to a DICOMweb root."""
    if isinstance(destination, StowDestination):
        return stow_rs(destination, datasets, username, password)
    return c_store(destination, calling_ae, datasets)
