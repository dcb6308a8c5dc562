"""Sending result objects to a PACS by C-STORE (pynetdicom), and naming where that is."""

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


def parse_destination(text: str) -> Destination:
    """`AET@host:port`, e.g. `ORTHANC@pacs.hospital.org:4242`."""
    match = DESTINATION.match(text.strip())
    if not match or not 0 < int(match.group("port")) < 65536:
        raise ValueError(f"PACS destination {text!r}: expected AE_TITLE@host:port (AE title at most 16 characters)")
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
