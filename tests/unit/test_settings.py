from pathlib import Path

import os

import pytest
from pydantic import ValidationError

from oncoserve import credentials
from oncoserve.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """These tests read configuration sources themselves: no ONCOSERVE_* from the session's test stack."""
    for key in [k for k in os.environ if k.startswith("ONCOSERVE_")]:
        monkeypatch.delenv(key)


def test_defaults_bind_loopback_and_home_is_dot_oncoserve(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ONCOSERVE_HOME", raising=False)
    monkeypatch.delenv("ONCOSERVE_CONFIG", raising=False)
    s = Settings()
    assert s.host == "127.0.0.1"
    assert s.home == (tmp_path / ".oncoserve").resolve()
    assert s.mlflow_url == f"http://127.0.0.1:{s.mlflow_port}"


def test_env_prefix_overrides_toml_which_overrides_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "oncoserve.toml").write_text('mlflow_port = 5123\nray_port = 6999\nhome = "data"\n')
    monkeypatch.setenv("ONCOSERVE_RAY_PORT", "7001")
    s = Settings()
    assert s.mlflow_port == 5123  # from the file
    assert s.ray_port == 7001  # env beats the file
    assert s.home == (tmp_path / "data").resolve()


def test_config_file_named_by_env(monkeypatch, tmp_path):
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text("s3_port = 9000\n")
    monkeypatch.setenv("ONCOSERVE_CONFIG", str(cfg))
    assert Settings().s3_port == 9000


def test_bad_value_is_a_validation_error(monkeypatch):
    monkeypatch.setenv("ONCOSERVE_DB", "oracle")
    with pytest.raises(ValidationError, match="db"):
        Settings()


def test_credentials_created_once_with_mode_600(tmp_path):
    path = tmp_path / "home" / "credentials.json"
    first = credentials.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert credentials.load_or_create(path) == first
    assert len(first.secret_key) >= 30


def test_missing_credentials_say_how_to_create_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="stack up"):
        credentials.load(Path(tmp_path / "nope.json"))


def test_clients_call_the_platform_api_in_cluster_else_public_else_embedded(monkeypatch, tmp_path):
    """Defect (found running the pipeline RayJob from its manifests): the pipeline's gates, compile and
    promotion called http://HOST:PLATFORM_PORT, the embedded address, from a pod (0.0.0.0 or 127.0.0.1)."""
    from pipelines.platform_client import PlatformClient

    monkeypatch.chdir(tmp_path)
    assert PlatformClient(Settings(), token="t").url == "http://127.0.0.1:8600"
    monkeypatch.setenv("ONCOSERVE_PLATFORM_PUBLIC_URL", "https://oncoserve.example.org/")
    assert PlatformClient(Settings(), token="t").url == "https://oncoserve.example.org"  # a laptop, through the ingress
    monkeypatch.setenv("ONCOSERVE_PLATFORM_API_URL", "http://demo-oncoserve-platform:8600")
    assert PlatformClient(Settings(), token="t").url == "http://demo-oncoserve-platform:8600"  # a pod, by Service name
