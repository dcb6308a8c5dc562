"""Deploy, stop and inspect the Serve application on the embedded stack's Ray (`oncoserve serve ...`).

Serve keeps running after the CLI exits (its controller and proxies are detached actors on the
stack's Ray); `down` removes it. Before deploying, every task must have a compiled `champion`, so a
missing model is a one-line message here instead of replicas failing in a loop.
"""

from __future__ import annotations

import contextlib
import logging

import httpx

from services import deploy_config
from serving.tasks import MODEL_TASKS as TASKS


class ServeError(RuntimeError):
    """Serving cannot be started or inspected (the message says why and what to do)."""


@contextlib.contextmanager
def connected(settings):
    import ray

    from pipelines.stack.process import port_free

    if settings.ray_cluster is None and port_free(settings.host, settings.ray_port):
        raise ServeError(f"no Ray at {settings.ray_address}; start the stack first: oncoserve stack up")
    try:
        ray.init(address=settings.ray_address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:  # a configured cluster (ONCOSERVE_RAY_CLUSTER) that does not answer
        raise ServeError(f"no Ray at {settings.ray_address}: {str(exc).splitlines()[0][:300]}") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # keep Serve's INFO lines out of CLI output
    try:
        yield
    finally:
        ray.shutdown()


def check_champions(settings) -> dict[str, str]:
    from serving.registry import Registry

    registry, versions, problems = Registry(settings.mlflow_url), {}, []
    for task in TASKS:
        try:
            version = registry.alias(task, "champion")
        except Exception as exc:
            raise ServeError(f"registry at {settings.mlflow_url} unreachable ({exc}); is the stack up?") from None
        if version is None:
            problems.append(f"{task} has no champion (oncoserve models promote {task} VERSION --to champion)")
        elif not registry.version(task, version).tags.get("compiled_sha256"):
            problems.append(f"{task} version {version} is not compiled (oncoserve compile {task} {version})")
        else:
            versions[task] = version
    if problems:
        raise ServeError("cannot serve yet: " + "; ".join(problems))
    # Reporting is optional: without a champion the packaged knowledge base answers (and says so).
    from services.reporting.model import DIGEST_TAG

    reporting = registry.alias("reporting", "champion")
    if reporting is not None and not registry.version("reporting", reporting).tags.get(DIGEST_TAG):
        raise ServeError(f"cannot serve yet: reporting version {reporting} has no recorded sha256 (registered by an "
                         "older oncoserve); run `oncoserve reporting register` and promote the new version")  # fmt: skip
    versions["reporting"] = reporting or "packaged knowledge base"
    return versions


def up(settings, config_path=None) -> dict:
    """Deploy (or update in place) the application; returns the endpoints and versions."""
    from ray import serve

    from services.app import build_app, proxy_options

    try:
        config = deploy_config.load(config_path or settings.serve_config)
    except deploy_config.ConfigError as exc:
        raise ServeError(str(exc)) from None
    versions = check_champions(settings)
    with connected(settings):
        import ray

        _check_resources(config, ray.cluster_resources())
        _check_ingress(settings, cluster_ingress())
        serve.start(**proxy_options(settings))
        try:
            serve.run(build_app(settings, config), name=config.application, route_prefix="/", blocking=False)
        except RuntimeError as exc:
            raise ServeError(f"the application failed to deploy: {str(exc)[-1500:]}") from None
    return {"http": settings.serve_url, "grpc": f"{settings.host}:{settings.serve_grpc_port}", "model_versions": versions}


def cluster_ingress() -> str:
    """The serving ingress the connected Ray cluster's processes were started with (services.ingress.ingress_env):
    Ray reads it from their environment, so it is asked of the cluster, not of this process."""
    import ray

    from services.ingress import HAPROXY_FLAG

    @ray.remote(num_cpus=0)
    def flag() -> str | None:
        import os

        return os.environ.get(HAPROXY_FLAG)

    return "haproxy" if ray.get(flag.remote(), timeout=120) == "1" else "proxy"


def _check_ingress(settings, running: str) -> None:
    """Refuse to deploy when the settings name another ingress than the cluster's Ray runs: the app would come
    up behind the one Ray started with, and the setting would be silently ignored."""
    if running != settings.serve_ingress:
        raise ServeError(f"serve_ingress is {settings.serve_ingress} but this Ray cluster was started with the {running} "
                         "ingress; Ray reads it when it starts: `oncoserve stack down` then `oncoserve stack up` with the "
                         "setting you want (on Kubernetes: the chart's serve.ingress)")  # fmt: skip


def _check_resources(config, cluster: dict[str, float]) -> None:
    """Refuse a config whose minimum replicas cannot all be placed on the cluster (`ray.cluster_resources()`),
    by CPUs or custom resources (Serve would wait for them forever)."""
    for name, spec in config.deployments.items():
        for resource, amount in (spec.resources or {}).items():
            if cluster.get(resource, 0.0) * (1 + 1e-9) < amount * spec.autoscaling.min_replicas:
                raise ServeError(f"{name}: its replicas need the Ray resource {resource} ({amount:g} each, "
                                 f"at least {spec.autoscaling.min_replicas} replica{'s' if spec.autoscaling.min_replicas != 1 else ''}) and this cluster has {cluster.get(resource, 0.0):g}"
                                 " (embedded stack: `oncoserve stack up --workers N` adds worker nodes with oncoserve_worker)")  # fmt: skip
    have = cluster.get("CPU", 0.0)
    need = deploy_config.cpu_reservation(config, "min_replicas")
    if need > have + 1e-9:
        raise ServeError(f"the deployment config reserves {need:g} CPUs at its minimum replicas and this Ray cluster "
                         f"has {have:g}; lower min_replicas or backend.threads, or give Ray more CPUs (ray_num_cpus)")
    most = deploy_config.cpu_reservation(config, "max_replicas")
    if most > have + 1e-9:
        logging.getLogger(__name__).warning("the deployment config can reserve %g CPUs at its maximum replicas and "
                                            "this Ray cluster has %g: autoscaling stops short of max_replicas", most, have)


def down(settings) -> None:
    from ray import serve

    import ray

    from services.version_barrier import NAMESPACE, remove_all

    with connected(settings):
        serve.shutdown()
        remove_all(ray.util.list_named_actors(all_namespaces=True), NAMESPACE)  # detached: they outlive the app


def status(settings) -> dict:
    """Application and per-deployment state from Serve, and the versions the gateway reports."""
    from ray import serve

    with connected(settings):
        applications = serve.status().applications
    result = {"http": settings.serve_url, "grpc": f"{settings.host}:{settings.serve_grpc_port}",
              "running": False, "applications": {}}  # fmt: skip
    for name, app in applications.items():
        result["applications"][name] = {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": app.message,
            "deployments": {dname: {"status": str(getattr(d.status, "value", d.status)),
                                    "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
                            for dname, d in app.deployments.items()},  # fmt: skip
        }
    try:
        ready = httpx.get(f"{settings.serve_url}/readyz", timeout=15)
        result["running"] = ready.status_code == 200
        result["model_versions"] = ready.json().get("model_versions", {}) if ready.status_code == 200 else {}
        result["untrusted_aliases"] = ready.json().get("untrusted_aliases", {}) if ready.status_code == 200 else {}
    except httpx.HTTPError:
        result["model_versions"] = {}
    result["auth"] = settings.serve_auth
    return result
