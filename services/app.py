"""Build the Serve application (gateway + one deployment per task) from settings and the deployment
config, and the options Serve's proxies start with. Used by `oncoserve serve up` and the benchmarks."""

from __future__ import annotations

from pathlib import Path

from services import deploy_config
from services.metrics import MULTIPROC_ENV
from services.task_logic import TASKS


# glibc malloc in the replicas: the gateway's thread pool and onnxruntime's threads each get an arena of
# their own (up to 8 per core), and per-request volumes of a few MB left them fragmented, so resident
# memory crept up under load before it plateaued. Two arenas keep it lower and flatter at no measured
# latency cost; a fixed MALLOC_MMAP_THRESHOLD_ flattened it further but cost 3-4% per segmentation.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2"}


def metrics_dir(settings) -> Path:
    return settings.home / "serve" / "metrics"


def proxy_options(settings) -> dict:
    """Keyword arguments for `serve.start`: HTTP on settings.host, gRPC with our services."""
    from services.grpc_servicers import SERVICER

    return {"http_options": {"host": settings.host, "port": settings.serve_http_port, "location": "HeadOnly"},
            "grpc_options": {"port": settings.serve_grpc_port, "grpc_servicer_functions": [SERVICER]}}  # fmt: skip


def prune_metrics(mdir: Path) -> None:
    """Drop the metric files of processes that are gone (prometheus_client names them *_<pid>.db).

    Live replicas keep theirs: an in-place `serve up` must not reset the counters of replicas that
    go on serving, while a replaced replica's live gauges must stop counting."""
    import psutil

    for path in mdir.glob("*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)


def build_app(settings, config: deploy_config.DeploymentConfig):
    """The bound application. Replicas share a Prometheus multiprocess directory under the home."""
    from services.gateway import StudyGateway
    from services.reporting_service import reporting_deployment
    from services.task_service import task_deployment

    mdir = metrics_dir(settings)
    mdir.mkdir(parents=True, exist_ok=True)
    prune_metrics(mdir)
    env = {"env_vars": {MULTIPROC_ENV: str(mdir), **MALLOC_ENV}}
    fields = settings.model_dump(mode="json")

    def options(name: str) -> dict:
        opts = deployment_options(config)[name]
        opts["ray_actor_options"]["runtime_env"] = env
        return opts

    bound = {
        task: task_deployment(task, options(task)).bind(task, fields, config.deployments[task].model_dump(), config.watch_interval_s)
        for task in TASKS
    }
    reporting = reporting_deployment(options("reporting")).bind(fields, config.deployments["reporting"].model_dump(),
                                                                config.watch_interval_s)  # fmt: skip
    return StudyGateway.options(**options("gateway")).bind(fields, *(bound[t] for t in TASKS), reporting, config.watch_interval_s)


def deployment_options(config: deploy_config.DeploymentConfig) -> dict[str, dict]:
    """Per deployment: the Serve options both the embedded stack and the Helm chart apply."""
    return {name: spec.serve_options() for name, spec in config.deployments.items()}


def serve_config(config: deploy_config.DeploymentConfig, http_port: int = 8000, grpc_port: int = 9000) -> dict:
    """The Serve config (the `serve deploy` / KubeRay `serveConfigV2` schema) for a cluster.

    The Helm chart renders the same document from the same deployments.yaml; a test compares them."""
    from services.grpc_servicers import SERVICER

    return {
        "http_options": {"host": "0.0.0.0", "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [SERVICER]},
        "applications": [{
            "name": config.application,
            "route_prefix": "/",
            "import_path": "services.app:app_builder",
            "args": {"config": config.document()},
            "deployments": [{"name": name, **options} for name, options in deployment_options(config).items()],
        }],
    }  # fmt: skip


def app_builder(args: dict):
    """Serve application builder for clusters (`import_path: services.app:app_builder`).

    `args.config` is the deployment config the chart rendered; `args.backend` (optional) switches every
    model deployment's inference backend, e.g. to Triton on the GPU nodes. Settings come from the pod's
    ONCOSERVE_* environment."""
    from oncoserve.settings import Settings

    config = deploy_config.DeploymentConfig.model_validate(args.get("config") or deploy_config.load().document())
    if args.get("backend"):
        for task in TASKS:
            spec = config.deployments[task]
            config.deployments[task] = spec.model_copy(update={"backend": deploy_config.Backend.model_validate(args["backend"])})
    return build_app(Settings(), config)
