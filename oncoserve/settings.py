"""The one typed settings object of the platform.

Values come, highest priority first, from: explicit constructor arguments, environment variables
with the ``ONCOSERVE_`` prefix, an ``oncoserve.toml`` file (``ONCOSERVE_CONFIG`` names another path),
and the defaults below. No other module reads environment variables for configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

CONFIG_ENV = "ONCOSERVE_CONFIG"
DEFAULT_CONFIG_FILE = "oncoserve.toml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONCOSERVE_", extra="ignore", frozen=True)

    home: Path = Field(Path(".oncoserve"), description="Data directory: state, logs, credentials, stores.")
    host: str = Field("127.0.0.1", description="Address every embedded server binds to.")

    # Object store (SeaweedFS `weed mini`). It also needs the next 7 ports and each of those + 10000
    # for its internal master/volume/filer/webdav/admin servers and their gRPC ports.
    s3_port: int = 8333
    bucket_artifacts: str = "oncoserve-artifacts"
    bucket_models: str = "oncoserve-models"
    bucket_data: str = "oncoserve-data"

    # Registry / tracking server.
    mlflow_port: int = 5000
    db: Literal["sqlite", "postgresql"] = "sqlite"
    postgres_port: int = 5433

    # Local Ray head.
    ray_port: int = 6380
    ray_dashboard_port: int = 8265
    ray_client_port: int = 10001
    ray_dashboard_agent_port: int = 52365
    ray_num_cpus: int | None = Field(None, description="CPUs the embedded Ray declares; default: the larger of the cores and what the packaged Serve config reserves at its maximum replicas (pipelines/stack/components.py ray_cpus).")
    ray_workers: int = Field(0, ge=0, le=8, description="Extra Ray worker nodes the embedded stack starts beside its head "
                                                       "(`stack up --workers N`): a multi-node cluster on one machine.")
    ray_worker_cpus: int = Field(1, ge=1, description="CPUs each embedded Ray worker node declares.")
    ray_worker_object_store_mb: int = Field(512, ge=78, description="Object store of each embedded Ray worker node (MB).")
    ray_worker_port_base: int = Field(6400, description="First port of the embedded Ray worker nodes; worker i takes the "
                                                        "6 ports from base + 6 * (i - 1) (node manager, object manager, agents, metrics).")

    # Registry, promotion, compile.
    token: str | None = Field(None, description="API token for the CLI (else read from ONCOSERVE_HOME/token).")
    gates_file: Path | None = Field(None, description="Promotion gates (TOML) the platform API loads at start; default: the "
                                                       "packaged pipelines/gates.toml. Read by the server only: a client's has no effect.")
    signing_public_key: Path | None = Field(None, description="The platform's Ed25519 public key (PEM) serving replicas verify "
                                                              "promotions with; default: HOME/platform/signing.pub.")
    audit_dir: Path | None = Field(None, description="Where the audit log lives; default HOME/audit. On Kubernetes a "
                                                     "persistent volume (never an emptyDir).")
    serve_auth: bool = Field(True, description="Serving API requires a token (REST and gRPC); `off` for local development only.")
    monitoring_records: bool = Field(True, description="Record each analysed study's input statistics and model outputs "
                                                       "(no image, no identifier) for drift monitoring.")
    payload_logging: bool = Field(False, description="Opt-in: also keep each study's de-identified input volumes and "
                                                     "its findings in the artifacts bucket, for later review and labelling.")
    payload_retention_days: float = Field(30.0, gt=0, description="Stored payloads older than this are deleted by the "
                                                                  "platform API (monitoring records are kept).")
    rollback_max_error_rate: float | None = Field(0.2, ge=0, le=1, description="A champion promoted less than "
                                                  "`rollback_window_s` ago that fails more than this share of its studies "
                                                  "is rolled back to `previous` by the platform (audited); unset: off.")
    rollback_min_studies: int = Field(5, ge=1, description="Studies a new champion must have answered (or failed) "
                                                           "before its error rate is judged.")
    rollback_window_s: float = Field(3600.0, gt=0, description="How long after a promotion the champion's error rate "
                                                               "is watched.")
    platform_port: int = Field(8600, description="Port of the platform API (a stack component; `oncoserve platform serve`).")
    platform_public_url: str | None = Field(None, description="URL browsers reach the platform API at; default: http://HOST:PLATFORM_PORT.")
    platform_api_url: str | None = Field(None, description="URL the CLI and jobs (the pipeline's gates, compile and promotion) "
                                         "call the platform API at; default: PLATFORM_PUBLIC_URL, else http://HOST:PLATFORM_PORT. "
                                         "A cluster names its Service.")
    cors_origins: list[str] | None = Field(None, description="Origins allowed to call the platform API from a browser; "
                                                              "default: only the serving API's (where the web UI is served).")
    ui_demo_cases: Path | None = Field(None, description="Dataset folder whose cases the web UI offers as demo studies.")
    triton_repo_prefix: str = Field("triton", description="Folder of the Triton model repository in the models bucket.")

    # Serving (Ray Serve on the stack's Ray).
    serve_http_port: int = Field(8000, description="Port of the serving REST API (Ray Serve HTTP proxy).")
    serve_grpc_port: int = Field(9000, description="Port of the serving gRPC API (study service + OIP v2).")
    serve_ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="How requests reach the gateway: proxy (Serve's Python proxy, the default) or haproxy "
        "(Serve's direct ingress: HAProxy on the serving ports passes each request straight to a gateway replica's "
        "own server; README, Serving). Read when the stack's Ray starts: change it, then `stack down` and `stack up`.")
    serve_config: Path | None = Field(None, description="Deployment config (YAML); default: the packaged services/deployments.yaml.")
    serve_max_request_mb: float = Field(256.0, description="Largest request body (after gzip decoding) the APIs accept.")
    serve_rate_limit_per_min: float = Field(600.0, description="Analysis/inference requests per minute per caller (token, "
                                                                "else client address) per gateway replica; 0: no limit.")
    serve_rate_limit_burst: int = Field(60, description="Requests a caller may send at once before the rate applies.")

    # Preprocessing of raw scanner studies (imaging.preprocess; training and serving alike).
    skull_strip: Literal["deepbet", "hd-bet"] = Field("deepbet", description="Brain extraction for studies that still have a "
                                                      "skull: deepbet (weights in its wheel) or hd-bet (needs hdbet_weights).")
    hdbet_weights: Path | None = Field(None, description="Folder holding HD-BET's 0.model..4.model; HD-BET never downloads.")
    quality_mode: Literal["refuse", "flag"] = Field("refuse", description="A study failing quality control: refuse it "
                                                    "(HTTP 422 naming the check) or analyse it with quality.flags set.")

    # Hospital integration: the DICOM receiver (a stack component when an allow-list is set), analysis jobs
    # and results back to a PACS (README "Connecting a PACS").
    dicom_ae_title: str = Field("ONCOSERVE", max_length=16, description="The receiver's AE title (also the calling AE when results are sent).")
    dicom_port: int = Field(11112, description="Port of the DICOM receiver (C-STORE/C-ECHO SCP).")
    dicom_allowed_aes: list[str] = Field(default_factory=list, description="Calling AE titles the receiver accepts "
                                         "(JSON list); empty: no receiver is started.")
    dicom_max_associations: int = Field(4, ge=1, description="Associations the receiver holds at once; more are rejected (A-ASSOCIATE-RJ).")
    dicom_min_free_mb: float = Field(1024.0, description="Free disk the receiver keeps; below it a C-STORE answers 0xA700 (out of resources).")
    dicom_study_idle_s: float = Field(10.0, gt=0, description="A study is closed, and its analysis job queued, this long after its last instance.")
    jobs_retry_for_s: float = Field(600.0, gt=0, description="How long after its submission a job keeps retrying a serving API "
                                    "that is down or overloaded before it fails.")
    dicomweb_url: str | None = Field(None, description="DICOMweb root of the PACS studies are pulled from (QIDO-RS, WADO-RS), "
                                     "e.g. https://pacs.example.org/dicom-web.")
    dicomweb_username: str | None = Field(None, description="Basic-auth user for the DICOMweb server.")
    dicomweb_password: str | None = Field(None, description="Basic-auth password (from a secret).", repr=False)
    pacs_destination: str | None = Field(None, description="Where accepted results go: AE_TITLE@host:port (C-STORE) or the "
                                         "PACS's DICOMweb root, http(s)://... (STOW-RS, with the DICOMweb credentials); unset: they stay here.")
    pacs_auto_export: bool = Field(False, description="Send results without a clinician's review (research use; the objects say so).")
    pacs_retry_s: float = Field(30.0, gt=0, description="Seconds between delivery attempts to the PACS.")
    pacs_max_attempts: int = Field(10, ge=1, description="Delivery attempts before an export is failed.")

    # Clusters (Kubernetes): external services instead of the embedded ones. Unset on one machine.
    mlflow_uri: str | None = Field(None, description="URL of an external MLflow server; default: the embedded one.")
    s3_external_endpoint: str | None = Field(None, description="host[:port] of an external S3 (cloud S3, MinIO).")
    s3_secure: bool = Field(False, description="Use HTTPS to the external S3.")
    s3_access_key: str | None = Field(None, description="External S3 key; unset: the pod's IAM role (IRSA).")
    s3_secret_key: str | None = Field(None, description="External S3 secret (from a Kubernetes Secret).", repr=False)
    gateway_url: str | None = Field(None, description="URL of the serving API (the study gateway) the platform's jobs and "
                                    "the CLI call; default: http://HOST:SERVE_HTTP_PORT. A cluster names its Service.")
    ray_cluster: str | None = Field(None, description="Ray cluster the CLI's training, pipeline and serve commands join instead "
                                    "of the embedded head: its GCS host:port, or `auto` on a Ray node or in a Ray job (a "
                                    "KubeRay RayJob's driver); the chart sets it.")
    ray_storage: str | None = Field(None, description="Where Ray Train keeps a run's checkpoints; every Ray node must read and "
                                    "write it: `s3` (the object store's artifacts bucket, under ray-results/) or a folder all "
                                    "nodes mount. Default: HOME/ray_results (one machine's nodes share it). The chart sets `s3`.")
    deid_salt: str | None = Field(None, repr=False, description="The de-identification secret every component that "
                                  "de-identifies DICOM shares (gateway replicas, receiver, jobs); a cluster sets it from a "
                                  "Secret, since pods do not share a home. Default: HOME/serve/.deid-salt, made once.")

    startup_timeout_s: float = Field(180.0, description="How long `stack up` waits for a component's health.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG_FILE))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_path))

    @field_validator("rollback_max_error_rate", mode="before")
    @classmethod
    def _off_is_none(cls, value):
        # ONCOSERVE_ROLLBACK_MAX_ERROR_RATE= (empty) or "off" turns the champion guard off.
        return None if isinstance(value, str) and value.strip().lower() in ("", "off", "none") else value

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        # Children (servers, Ray workers) run with other working directories.
        return value.expanduser().resolve()

    @property
    def serve_url(self) -> str:
        return self.gateway_url or f"http://{self.host}:{self.serve_http_port}"

    def as_env(self) -> dict[str, str]:
        """These settings as ONCOSERVE_* variables, for a child process that must see the same ones."""
        import json

        return {f"ONCOSERVE_{key.upper()}": json.dumps(value) if isinstance(value, list | dict) else str(value)
                for key, value in self.model_dump(mode="json", exclude_none=True).items()}  # fmt: skip

    @property
    def platform_url(self) -> str:
        return self.platform_public_url or f"http://{self.host}:{self.platform_port}"

    @property
    def platform_client_url(self) -> str:
        """Where this process calls the platform API (in a cluster its Service; on a laptop the public URL)."""
        return self.platform_api_url or self.platform_public_url or f"http://{self.host}:{self.platform_port}"

    @property
    def allowed_origins(self) -> list[str]:
        return self.cors_origins if self.cors_origins is not None else [self.serve_url]

    @property
    def s3_endpoint(self) -> str:
        return self.s3_external_endpoint or f"{self.host}:{self.s3_port}"

    @property
    def s3_url(self) -> str:
        return f"{'https' if self.s3_secure else 'http'}://{self.s3_endpoint}"

    @property
    def mlflow_url(self) -> str:
        return self.mlflow_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return self.ray_cluster or f"{self.host}:{self.ray_port}"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def credentials_file(self) -> Path:
        return self.home / "credentials.json"

    @property
    def mlflow_accounts_file(self) -> Path:
        return self.home / "auth" / "mlflow.json"

    @property
    def audit_file(self) -> Path:
        return (self.audit_dir or self.home / "audit") / "audit.jsonl"

    @property
    def signing_key_file(self) -> Path:
        return self.home / "platform" / "signing.key"

    @property
    def signing_public_key_file(self) -> Path:
        return self.signing_public_key or self.home / "platform" / "signing.pub"

    @property
    def tokens_file(self) -> Path:
        return self.home / "auth" / "tokens.json"

    def cli_token(self) -> str | None:
        """The CLI's token: ONCOSERVE_TOKEN, else the file ONCOSERVE_HOME/token (ONCOSERVE_TOKEN= means none)."""
        if self.token is not None:
            return self.token or None
        path = self.home / "token"
        return path.read_text().strip() if path.exists() else None


def load_settings(**overrides: object) -> Settings:
    return Settings(**overrides)
