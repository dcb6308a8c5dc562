"""The S3 client every layer uses (the `minio` client against the stack's object store)."""

from __future__ import annotations

import urllib3
from minio import Minio

from oncoserve.credentials import load
from oncoserve.settings import Settings


def object_store(settings: Settings, timeout_s: float = 10.0, retries: int = 2) -> Minio:
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
        retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[502, 503, 504]),
    )
    if settings.s3_external_endpoint:
        # A cluster's S3: keys from a Secret, or else the pod's IAM role (IRSA web identity).
        if settings.s3_access_key and settings.s3_secret_key:
            return Minio(settings.s3_endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                         secure=settings.s3_secure, http_client=http)  # fmt: skip
        from minio.credentials import IamAwsProvider

        return Minio(settings.s3_endpoint, credentials=IamAwsProvider(), secure=settings.s3_secure, http_client=http)
    creds = load(settings.credentials_file)
    return Minio(settings.s3_endpoint, access_key=creds.access_key, secret_key=creds.secret_key, secure=False, http_client=http)


def mlflow_env(settings: Settings) -> dict[str, str]:
    """Environment an MLflow client or server needs to reach artifacts in the stack's S3."""
    creds = load(settings.credentials_file)
    return {
        "MLFLOW_S3_ENDPOINT_URL": settings.s3_url,
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
