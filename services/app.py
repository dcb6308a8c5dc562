"""Build the Serve application (gateway + one deployment per task) from settings and the deployment
config, and the options Serve's proxies start with. Used by `oncoserve serve up` and the benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path

from services import deploy_config
from services.metrics import MULTIPROC_ENV
from services.task_logic import TASKS


def metrics_dir(settings) -> Path:
    return settings.home / "serve" / "metrics"


def proxy_options(settings) -> dict:
    """Keyword arguments for `serve.start`: HTTP on settings.host, gRPC with our services."""
    from services.grpc_servicers import SERVICER

    return {"http_options": {"host": settings.host, "port": settings.serve_http_port, "location": "HeadOnly"},
            "grpc_options": {"port": settings.serve_grpc_port, "grpc_servicer_functions": [SERVICER]}}  # fmt: skip


def build_app(settings, config: deploy_config.DeploymentConfig, fresh_metrics: bool = True):
    """The bound application. Replicas share a Prometheus multiprocess directory under the home."""
    from services.gateway import StudyGateway
    from services.task_service import task_deployment

    mdir = metrics_dir(settings)
    if fresh_metrics:
        shutil.rmtree(mdir, ignore_errors=True)
    mdir.mkdir(parents=True, exist_ok=True)
    env = {"env_vars": {MULTIPROC_ENV: str(mdir)}}
    fields = settings.model_dump(mode="json")

    def options(name: str) -> dict:
        opts = config.deployments[name].serve_options()
        opts["ray_actor_options"]["runtime_env"] = env
        return opts

    bound = {
        task: task_deployment(task, options(task)).bind(task, fields, config.deployments[task].model_dump(), config.watch_interval_s)
        for task in TASKS
    }
    return StudyGateway.options(**options("gateway")).bind(fields, *(bound[t] for t in TASKS))
