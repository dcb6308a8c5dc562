"""The servers of the embedded stack: how each starts, which ports it needs, how its health is checked."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from oncoserve import credentials
from oncoserve.credentials import S3Credentials
from oncoserve.object_store import mlflow_env, object_store
from oncoserve.settings import Settings
from pipelines.stack.ports import RAY_WORKER_PORTS

HEALTH_PROBE_KEY = ".oncoserve/health-probe"  # the S3 health check's own object, rewritten on each check


class StackError(RuntimeError):
    """A component of the embedded stack could not be started, checked or stopped."""


@dataclass
class Health:
    ok: bool
    detail: str


def _bin(name: str) -> str:
    """A console script of this environment (the venv's bin dir), else one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name}: binary not found (looked in {local.parent} and PATH); run `make venv`")
    return found


class Component:
    name: str = ""
    stop_signal: int = signal.SIGTERM
    stop_grace_s: float = 20.0  # after the stop signal, how long before SIGKILL
    # A component others need before they can start (the database before MLflow).
    blocking: bool = False

    def __init__(self, settings: Settings, creds: S3Credentials):
        self.settings = settings
        self.creds = creds

    @property
    def log(self) -> Path:
        return self.settings.logs_dir / f"{self.name}.log"

    @property
    def data_dir(self) -> Path:
        return self.settings.home / self.name

    def ports(self) -> list[int]:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def health(self) -> Health:
        raise NotImplementedError

    def url(self) -> str:
        return f"{self.settings.host}:{self.ports()[0]}"


class S3Server(Component):
    """SeaweedFS in one process (`weed mini`), S3 API on settings.s3_port."""

    name = "s3"
    # Offsets from the S3 port for weed's internal servers; gRPC ports are each + 10000.
    _OFFSETS = {"s3": 0, "master": 1, "volume": 2, "filer": 3, "webdav": 4, "admin": 5}

    def _port(self, role: str) -> int:
        return self.settings.s3_port + self._OFFSETS[role]

    def ports(self) -> list[int]:
        http = [self._port(role) for role in self._OFFSETS]
        grpc = [self._port(role) + 10000 for role in ("s3", "master", "volume", "filer", "admin")]
        return http + grpc

    def buckets(self) -> list[str]:
        s = self.settings
        return [s.bucket_artifacts, s.bucket_models, s.bucket_data]

    def command(self) -> list[str]:
        return [
            _bin("weed"), "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.settings.host}", f"-ip.bind={self.settings.host}",
            f"-s3.port={self._port('s3')}", f"-master.port={self._port('master')}",
            f"-volume.port={self._port('volume')}", f"-filer.port={self._port('filer')}",
            f"-webdav.port={self._port('webdav')}", f"-admin.port={self._port('admin')}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            # No admin UI: its password could only be given on the command line (visible in `ps`).
            "-admin.ui=false",
            f"-bucket={','.join(self.buckets())}",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.creds.access_key, "AWS_SECRET_ACCESS_KEY": self.creds.secret_key}

    def health(self) -> Health:
        try:
            client = object_store(self.settings, timeout_s=3, retries=0)
            names = {b.name for b in client.list_buckets()}
        except Exception as exc:  # any failure to answer is "down"; the detail says why
            return Health(False, f"list-buckets failed: {type(exc).__name__}: {exc}"[:300])
        missing = [b for b in self.buckets() if b not in names]
        if missing:
            return Health(False, f"buckets missing: {', '.join(missing)}")
        # Buckets answer from the filer before a volume server has joined; objects need both (a GET then
        # fails with InternalError). A write and a read back prove the data path.
        try:
            probe = f"up {time.time()}".encode()
            client.put_object(self.settings.bucket_artifacts, HEALTH_PROBE_KEY, io.BytesIO(probe), len(probe))
            response = client.get_object(self.settings.bucket_artifacts, HEALTH_PROBE_KEY)
            try:
                ok = response.read() == probe
            finally:
                response.close()
        except Exception as exc:
            return Health(False, f"object write/read failed: {type(exc).__name__}: {exc}"[:300])
        return Health(ok, f"{len(names)} buckets, objects readable" if ok else "object read back differs")


class MlflowServer(Component):
    """`mlflow server`: tracking + registry; sqlite (or PostgreSQL) backend, artifacts proxied to S3."""

    name = "mlflow"

    def ports(self) -> list[int]:
        return [self.settings.mlflow_port]

    def backend_uri(self) -> str:
        if self.settings.db == "postgresql":
            return f"postgresql+psycopg2://oncoserve@{self.settings.host}:{self.settings.postgres_port}/mlflow"
        return f"sqlite:///{self.data_dir / 'mlflow.db'}"

    @property
    def auth_config(self) -> Path:
        return self.data_dir / "basic_auth.ini"

    def prepare(self) -> None:
        super().prepare()
        # MLflow's basic-auth app: every API call and the UI need an account; unknown callers get 401.
        # Its user store is a sqlite file of its own beside the tracking store.
        accounts = credentials.mlflow_accounts(self.settings.mlflow_accounts_file)
        text = ("[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{self.data_dir / 'basic_auth.db'}\n"
                f"admin_username = {accounts['platform']['username']}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                # Checking a password is a PBKDF2 hash (about a second per request on 2 busy cores); a
                # verified (user, password) is trusted for 5 minutes. Accounts here never change password.
                "auth_cache_ttl_seconds = 300\n")  # fmt: skip
        fd = os.open(self.auth_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)

    def command(self) -> list[str]:
        return [
            _bin("mlflow"), "server",
            "--app-name", "basic-auth",
            "--host", self.settings.host, "--port", str(self.settings.mlflow_port),
            "--backend-store-uri", self.backend_uri(),
            "--artifacts-destination", f"s3://{self.settings.bucket_artifacts}/mlflow",
            "--workers", "1",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        # Job execution spawns extra worker processes we do not use (halves the server's memory).
        env = {**mlflow_env(self.settings), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.settings.db == "postgresql":  # the database password through libpq's password file
            env["PGPASSFILE"] = str(self.settings.home / "auth" / "pgpass")
        accounts = credentials.mlflow_accounts(self.settings.mlflow_accounts_file)
        # Secrets through the environment (never the command line): the admin's first password, CSRF key.
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
                "MLFLOW_AUTH_ADMIN_PASSWORD": accounts["platform"]["password"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": accounts["flask_secret"]}  # fmt: skip
        return env

    def health(self) -> Health:
        try:
            with urllib.request.urlopen(f"{self.settings.mlflow_url}/health", timeout=3) as resp:
                body = resp.read().decode(errors="replace").strip()
                if resp.status != 200:
                    return Health(False, f"/health {resp.status} {body[:40]}")
        except (urllib.error.URLError, OSError) as exc:
            return Health(False, f"/health unreachable: {exc}")
        try:
            self._ensure_accounts()
        except Exception as exc:  # the auth app is still starting, or the admin password is wrong
            return Health(False, f"accounts not ready: {type(exc).__name__}: {str(exc)[:200]}")
        return Health(True, "/health 200 OK; basic-auth accounts platform, training, reader")

    def _ensure_accounts(self) -> None:
        """The training and read-only accounts, created by the platform account (MLflow's admin)."""
        from pipelines.mlflow_accounts import ensure_users

        accounts = credentials.mlflow_accounts(self.settings.mlflow_accounts_file)
        ensure_users(self.settings.mlflow_url, (accounts["platform"]["username"], accounts["platform"]["password"]),
                     [(accounts[n]["username"], accounts[n]["password"]) for n in ("training", "reader")])  # fmt: skip

    def url(self) -> str:
        return self.settings.mlflow_url


def ray_cpus(configured: int | None) -> int:
    """The CPUs the embedded Ray head declares: `ray_num_cpus` when set, else the larger of the machine's
    cores and what the packaged Serve application reserves at its maximum replicas.

    A model replica reserves the cores its runtime uses (services/deploy_config.py), so on Kubernetes a
    4-core worker holds four single-thread replicas. One small machine still has to host every task at
    once: there Ray's CPUs are a reservation count, not cores, and the replicas share the real ones
    (what `make bench` measures with the packaged config)."""
    if configured is not None:
        return configured
    from services import deploy_config

    needed = deploy_config.cpu_reservation(deploy_config.load(), "max_replicas")
    return max(os.cpu_count() or 1, math.ceil(needed))


# The embedded cluster's Ray processes, whatever the user's environment holds. Ray 2.60 turns token auth on
# for `ray start` whenever ~/.ray/auth_token exists (any local `ray.init()` writes one), while `ray
# health-check` and our drivers then connect without it: the head never becomes healthy. The mode is named
# here instead (README, "Known limits" of the embedded stack).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def ray_env(settings: Settings) -> dict[str, str]:
    """The environment of the stack's Ray nodes: RAY_ENV and the serving ingress the settings name."""
    from services.ingress import ingress_env

    return {**RAY_ENV, **ingress_env(settings)}


class RayHead(Component):
    """A local Ray head node (`ray start --head --block`), temp dir under ONCOSERVE_HOME."""

    name = "ray"

    def ports(self) -> list[int]:
        s = self.settings
        return [s.ray_port, s.ray_dashboard_port, s.ray_client_port, s.ray_dashboard_agent_port]

    def temp_dir(self) -> Path:
        """Ray's temp dir, reached through a short symlink when the real path is long.

        Ray puts unix sockets under it, and a socket path may not exceed 107 bytes.
        """
        real = self.data_dir
        if len(str(real)) <= 40:
            return real
        digest = hashlib.sha1(str(real).encode()).hexdigest()[:10]
        link = Path("/tmp") / f"oncoserve-ray-{digest}"
        if not link.is_symlink() or link.resolve() != real.resolve():
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(real)
        return link

    def command(self) -> list[str]:
        s = self.settings
        cmd = [
            _bin("ray"), "start", "--head", "--block",
            f"--node-ip-address={s.host}", f"--port={s.ray_port}",
            f"--temp-dir={self.temp_dir()}",
            "--include-dashboard=true", f"--dashboard-host={s.host}", f"--dashboard-port={s.ray_dashboard_port}",
            f"--dashboard-agent-listen-port={s.ray_dashboard_agent_port}",
            f"--ray-client-server-port={s.ray_client_port}",
            "--disable-usage-stats",
        ]  # fmt: skip
        cmd.append(f"--num-cpus={ray_cpus(s.ray_num_cpus)}")
        return cmd

    def env(self) -> dict[str, str]:
        return ray_env(self.settings)

    @property
    def address(self) -> str:
        """This head's GCS (settings.ray_address may name another cluster: ONCOSERVE_RAY_CLUSTER)."""
        return f"{self.settings.host}:{self.settings.ray_port}"

    def health(self) -> Health:
        # `ray health-check` asks the GCS over gRPC; a live PID alone proves nothing.
        try:
            result = subprocess.run(
                [_bin("ray"), "health-check", "--address", self.address],
                capture_output=True, text=True, timeout=30, env={**os.environ, **RAY_ENV},
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return Health(False, "GCS health-check timed out")
        if result.returncode == 0:
            return Health(True, f"GCS at {self.address} answers")
        return Health(False, f"GCS health-check failed: {(result.stderr or result.stdout).strip()[-200:]}")

    def url(self) -> str:
        return self.address


WORKER_PREFIX = "ray-worker-"


class RayWorker(Component):
    """An extra Ray node joining the head (`ray start --address ... --block`): with `stack up --workers N` the
    embedded stack is a multi-node cluster on one machine, as under KubeRay, so placement, spreading and a
    lost node are exercised for real. Worker i declares `ray_worker_cpus` CPUs and the custom resources
    `oncoserve_worker` and `oncoserve_worker_<i>` (a job can ask for a worker node, or for one of them)."""

    # One node at a time, after the head: nodes starting together pick the same socket names in the
    # shared temp dir (seen here: the second raylet never registers).
    blocking = True
    # A worker node keeps nothing durable (its objects die with it), and `ray start --block` was seen to
    # outwait a 20 s grace on SIGTERM: it is not waited for as long as a store.
    stop_grace_s = 5.0

    def __init__(self, settings: Settings, creds: S3Credentials, index: int):
        super().__init__(settings, creds)
        self.index = index
        self.name = f"{WORKER_PREFIX}{index}"

    @property
    def resource(self) -> str:
        return f"oncoserve_worker_{self.index}"

    def ports(self) -> list[int]:
        base = self.settings.ray_worker_port_base + RAY_WORKER_PORTS * (self.index - 1)
        return list(range(base, base + RAY_WORKER_PORTS))

    @property
    def data_dir(self) -> Path:
        return RayHead(self.settings, self.creds).data_dir

    def prepare(self) -> None:
        pass  # the head's temp dir, which the head made

    def command(self) -> list[str]:
        s = self.settings
        manager, objects, listen, grpc, runtime_env, metrics = self.ports()
        head = RayHead(s, self.creds)
        return [
            _bin("ray"), "start", "--block", f"--address={head.address}",
            f"--node-ip-address={s.host}", f"--temp-dir={head.temp_dir()}",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            # Worker processes take ports from Ray's shared range, which Ray hands out without clashes.
            f"--num-cpus={s.ray_worker_cpus}", f"--object-store-memory={s.ray_worker_object_store_mb * 1024 * 1024}",
            f"--resources={json.dumps({'oncoserve_worker': 1, self.resource: 1})}",
            "--disable-usage-stats",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return ray_env(self.settings)

    def health(self) -> Health:
        # The GCS's view (through the head's dashboard): a live `ray start` process proves nothing.
        url = f"http://{self.settings.host}:{self.settings.ray_dashboard_port}/api/v0/nodes?limit=1000"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                nodes = json.loads(resp.read())["data"]["result"]["result"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            return Health(False, f"the head's node list is unavailable: {exc}"[:300])
        alive = [n for n in nodes if n.get("state") == "ALIVE" and self.resource in (n.get("resources_total") or {})]
        if not alive:
            return Health(False, "not registered with the head yet")
        return Health(True, f"node {alive[0]['node_id'][:12]} alive, {self.settings.ray_worker_cpus} CPU")

    def url(self) -> str:
        return f"{self.settings.host}:{self.ports()[0]}"


class PostgresServer(Component):
    """PostgreSQL from the machine's binaries, for `--db postgresql` (MLflow's backend store)."""

    name = "postgres"
    blocking = True
    stop_signal = signal.SIGINT  # "fast" shutdown: rolls back open transactions, exits cleanly

    def ports(self) -> list[int]:
        return [self.settings.postgres_port]

    def _pg_bin(self, name: str) -> str:
        for base in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (base / name).exists():
                return str(base / name)
        found = shutil.which(name)
        if not found:
            raise StackError(f"postgres: {name} not found (install PostgreSQL server binaries)")
        return found

    def _as_owner(self) -> list[str]:
        # PostgreSQL refuses to run as root; run it as the `postgres` system user then.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--"]
        return []

    def prepare(self) -> None:
        pgdata = self.data_dir / "data"
        if (pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, "postgres", "postgres")
            # The postgres user must be able to pass through ONCOSERVE_HOME (execute bit only, no listing).
            home = self.settings.home
            home.chmod(home.stat().st_mode | 0o001)
            blocked = [str(p) for p in home.parents if not p.stat().st_mode & 0o001]
            if blocked:
                raise StackError(f"postgres: the postgres user cannot reach {home} (no o+x on {blocked[0]})")
        # Password (SCRAM) authentication for every connection, local socket included; the password is
        # generated per home and reaches clients through a 0600 libpq password file, never a command line.
        password = self._password()
        pwfile = self.data_dir / "initdb.pw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            result = subprocess.run(
                [*self._as_owner(), self._pg_bin("initdb"), "-D", str(pgdata), "-U", "oncoserve",
                 "--auth=scram-sha-256", f"--pwfile={pwfile}"],
                capture_output=True, text=True,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"postgres: initdb failed: {result.stderr.strip()[-300:]}")

    @property
    def passfile(self) -> Path:
        return self.settings.home / "auth" / "pgpass"

    def _password(self) -> str:
        """The database password of this home (created once), also written as a libpq password file."""
        import secrets

        secret_file = self.settings.home / "auth" / "postgres.password"
        secret_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not secret_file.exists():
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        password = secret_file.read_text().strip()
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{self.settings.host}:{self.settings.postgres_port}:*:oncoserve:{password}\n")
        return password

    def client_env(self) -> dict[str, str]:
        self._password()  # (re)write the password file for this host and port
        return {**os.environ, "PGPASSFILE": str(self.passfile)}

    def command(self) -> list[str]:
        return [
            *self._as_owner(), self._pg_bin("postgres"),
            "-D", str(self.data_dir / "data"),
            "-h", self.settings.host, "-p", str(self.settings.postgres_port),
            "-k", str(self.data_dir),
        ]  # fmt: skip

    def health(self) -> Health:
        result = subprocess.run(
            [self._pg_bin("psql"), "-h", self.settings.host, "-p", str(self.settings.postgres_port),
             "-U", "oncoserve", "-d", "postgres", "-w", "-tAc", "SELECT datname FROM pg_database"],
            capture_output=True, text=True, timeout=10, env=self.client_env(),
        )  # fmt: skip
        if result.returncode != 0:
            return Health(False, f"psql failed: {result.stderr.strip()[-200:]}")
        if "mlflow" not in result.stdout.split():
            created = subprocess.run(
                [self._pg_bin("createdb"), "-h", self.settings.host, "-p", str(self.settings.postgres_port),
                 "-U", "oncoserve", "-w", "mlflow"],
                capture_output=True, text=True, timeout=10, env=self.client_env(),
            )  # fmt: skip
            if created.returncode != 0:
                return Health(False, f"createdb mlflow failed: {created.stderr.strip()[-200:]}")
        return Health(True, "accepting connections; database mlflow present")


def _stack_settings_env(settings: Settings) -> dict[str, str]:
    """A platform server reads the same settings as the stack that starts it, whatever their source (never
    the CLI's token)."""
    out = settings.as_env()
    out.pop("ONCOSERVE_TOKEN", None)
    return out


class PlatformApi(Component):
    """The platform API (registry, promotion with gates, rollback, audit) that the web console calls."""

    name = "platform"

    def ports(self) -> list[int]:
        return [self.settings.platform_port]

    def command(self) -> list[str]:
        return [_bin("oncoserve"), "platform", "serve", "--port", str(self.settings.platform_port)]

    def env(self) -> dict[str, str]:
        return _stack_settings_env(self.settings)

    def health(self) -> Health:
        try:
            with urllib.request.urlopen(f"http://{self.settings.host}:{self.settings.platform_port}/healthz", timeout=3) as resp:
                return Health(resp.status == 200, f"/healthz {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            return Health(False, f"/healthz unreachable: {exc}")

    def url(self) -> str:
        return self.settings.platform_url


class DicomReceiverComponent(Component):
    """The DICOM receiver (pipelines.pacs.receiver): started when an allow-list of calling AE titles is set."""

    name = "dicom"

    def ports(self) -> list[int]:
        return [self.settings.dicom_port]

    def command(self) -> list[str]:
        return [_bin("oncoserve"), "pacs", "receive"]

    def env(self) -> dict[str, str]:
        return _stack_settings_env(self.settings)

    def health(self) -> Health:
        # A TCP connect only: an association would be refused unless this probe's AE title were allowed.
        try:
            with socket.create_connection((self.settings.host, self.settings.dicom_port), timeout=3):
                return Health(True, f"accepting associations as {self.settings.dicom_ae_title} from {', '.join(self.settings.dicom_allowed_aes)}")
        except OSError as exc:
            return Health(False, f"port {self.settings.dicom_port} closed: {exc}")

    def url(self) -> str:
        return f"dicom://{self.settings.dicom_ae_title}@{self.settings.host}:{self.settings.dicom_port}"


def components(settings: Settings, creds: S3Credentials) -> list[Component]:
    """The stack's components in start order (a blocking one is healthy before the next starts)."""
    parts: list[Component] = []
    if settings.db == "postgresql":
        parts.append(PostgresServer(settings, creds))
    head = RayHead(settings, creds)
    head.blocking = settings.ray_workers > 0  # worker nodes join a head that answers
    parts += [S3Server(settings, creds), head]
    parts += [RayWorker(settings, creds, i) for i in range(1, settings.ray_workers + 1)]
    parts += [MlflowServer(settings, creds), PlatformApi(settings, creds)]
    if settings.dicom_allowed_aes:
        parts.append(DicomReceiverComponent(settings, creds))
    return parts
