"""Where Ray Train keeps a run's checkpoints. Every Ray node writes its checkpoints there and the driver
reads the last one back, so it must be one place all nodes reach: on one machine the home folder (the
embedded stack's nodes share its disk); on a cluster each node is a pod with a disk of its own, so the
platform's object store (`ONCOSERVE_RAY_STORAGE=s3`, what the chart sets) or a folder every pod mounts.
Ray Train refuses a local path that other nodes cannot see ("Unable to set up cluster storage")."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from oncoserve.credentials import load
from oncoserve.settings import Settings

S3_PREFIX = "ray-results"


@dataclass(frozen=True)
class CheckpointStorage:
    path: str  # a folder, or bucket/prefix in the S3 filesystem
    s3: dict | None = field(default=None, repr=False)  # S3FileSystem arguments (keys included: never printed)

    def filesystem(self):
        """The pyarrow filesystem Ray Train writes through (None: the local one)."""
        if self.s3 is None:
            return None
        from pyarrow import fs

        return fs.S3FileSystem(**self.s3)

    def describe(self) -> str:
        return f"s3://{self.path}" if self.s3 is not None else self.path


def from_settings(settings: Settings) -> CheckpointStorage:
    choice = settings.ray_storage
    if not choice:
        return CheckpointStorage(str(settings.home / "ray_results"))
    if choice != "s3":
        return CheckpointStorage(choice)  # a folder every node mounts (NFS, EFS)
    s3 = {"endpoint_override": settings.s3_endpoint, "scheme": "https" if settings.s3_secure else "http",
          "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}  # fmt: skip
    if settings.s3_external_endpoint is None:  # the embedded stack's S3
        creds = load(settings.credentials_file)
        s3 |= {"access_key": creds.access_key, "secret_key": creds.secret_key}
    elif settings.s3_access_key and settings.s3_secret_key:
        s3 |= {"access_key": settings.s3_access_key, "secret_key": settings.s3_secret_key}
    # else: the AWS SDK's own chain (the pod's IAM role through IRSA's web identity)
    return CheckpointStorage(f"{settings.bucket_artifacts}/{S3_PREFIX}", s3)
