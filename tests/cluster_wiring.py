"""Run the Helm chart's workloads as processes, the way their pods would run them.

`workload(...)` turns a rendered container into a process description: its command and args, its
environment with every Secret reference resolved from a test dictionary, and its volumes as folders.
`run_in_cluster_namespace(spec)` runs a list of steps (start a workload and wait for its probe, run a job
to completion, make an HTTP request) inside a private network and mount namespace (`unshare`): loopback
only, every Service name in /etc/hosts pointing at it, /var/lib a fresh tmpfs for the pods' mount paths. So
the names, ports, probes, arguments and environment are exactly the rendered manifests', and nothing on
the host (the test stack's own ports, /var/lib) is seen or touched.

Run as a script (`python tests/cluster_wiring.py SPEC.json REPORT.json`) it is the part inside the
namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent)


def resolve_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The container's environment as the kubelet would give it (a missing Secret key is an error, as there)."""
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]["secretKeyRef"]  # the chart takes nothing else from references
        env[item["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def workload(name: str, pod: dict, container: dict, secrets: dict[str, dict[str, str]], probe_host: str) -> dict:
    """A step that starts `container` of `pod` with its volumes as folders (Secrets as files)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files, dirs = {}, []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        path = mount["mountPath"]
        if "secret" in volume:
            for key, value in secrets[volume["secret"]["secretName"]].items():
                files[f"{path}/{key}"] = value
        elif path != "/tmp":  # emptyDir and claims: a folder (the host's /tmp stands in for the pod's)
            dirs.append(path)
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    probe = container.get("readinessProbe", {})
    ready = None
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        ready = {"http": f"http://{probe_host}:{ports.get(port, port)}{probe['httpGet']['path']}"}
    elif "tcpSocket" in probe:
        port = probe["tcpSocket"]["port"]
        ready = {"tcp": [probe_host, ports.get(port, port)]}
    return {"start": {"name": name, "argv": [*container.get("command", []), *container.get("args", [])],
                      "env": resolve_env(container, secrets), "files": files, "dirs": dirs, "ready": ready}}  # fmt: skip


def kuberay_argv(group: dict, head_address: str | None = None, overrides: dict[str, str] | None = None) -> list[str]:
    """The `ray start` command KubeRay's operator generates for a head or worker group from its
    rayStartParams: `--head` (or `--address=<head Service>:<port>` for workers), every param as `--k=v`,
    the dashboard on all interfaces and the agent on 52365 unless given, and `--block`. `overrides`
    changes per-node ports where several nodes share one network namespace here (pods each have an IP)."""
    params = {"dashboard-agent-listen-port": "52365", **group["rayStartParams"], **(overrides or {})}
    if head_address is None:
        params = {"dashboard-host": "0.0.0.0", **params}
    argv = ["ray", "start", "--head"] if head_address is None else ["ray", "start", f"--address={head_address}"]
    return [*argv, *(f"--{k}={v}" for k, v in params.items()), "--block", "--disable-usage-stats"]


def ray_node(name: str, group: dict, secrets: dict[str, dict[str, str]], ready_url: str | None,
             head_address: str | None = None, overrides: dict[str, str] | None = None) -> dict:
    """A Ray head or worker pod of a RayService / RayJob group, as KubeRay starts it."""
    pod = group["template"]["spec"]
    step = workload(name, pod, pod["containers"][0], secrets, "127.0.0.1")
    # Only the namespace's own /var/lib is writable here: the data claim and ConfigMaps (at /data, /etc/...)
    # are not made on the host (a driver that only joins the cluster reads none of them).
    step["start"]["dirs"] = [d for d in step["start"]["dirs"] if d.startswith("/var/lib/")]
    step["start"]["files"] = {f: c for f, c in step["start"]["files"].items() if f.startswith("/var/lib/")}
    step["start"]["argv"] = kuberay_argv(group, head_address, overrides)
    step["start"]["ready"] = {"http": ready_url} if ready_url else None
    return step


def job(name: str, container: dict, secrets: dict[str, dict[str, str]]) -> dict:
    return {"run": {"name": name, "argv": [*container.get("command", []), *container.get("args", [])],
                    "env": resolve_env(container, secrets)}}  # fmt: skip


def run_in_cluster_namespace(spec: dict, workdir: Path, timeout_s: float = 600) -> dict:
    """Run the spec's steps in a fresh network + mount namespace; returns the report."""
    spec_file, report_file = workdir / "spec.json", workdir / "report.json"
    spec_file.write_text(json.dumps(spec))
    run = subprocess.run(["unshare", "--net", "--mount", "--fork", "--kill-child", sys.executable, __file__,
                          str(spec_file), str(report_file)], capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    if not report_file.exists():
        raise AssertionError(f"the namespace run wrote no report (rc {run.returncode}): {run.stderr[-3000:]}")
    return json.loads(report_file.read_text())


# -- inside the namespace ---------------------------------------------------------------------------
def _setup(spec: dict, scratch: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    hosts = scratch / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n" + "".join(f"127.0.0.1 {h}\n" for h in spec["hosts"]))
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/var/lib"], check=True)


def _ready(check: dict | None, deadline: float, proc: subprocess.Popen) -> bool:
    import socket

    import httpx

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if check is None:
            return True
        try:
            if "http" in check and httpx.get(check["http"], timeout=2).status_code == 200:
                return True
            if "tcp" in check:
                with socket.create_connection(tuple(check["tcp"]), timeout=2):
                    return True
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.3)  # polling a starting server's probe, as the kubelet does
    return False


def _environ(env: dict[str, str]) -> dict[str, str]:
    # RAY_TMPDIR: Ray's default temp dir (/tmp/ray in a pod) inside the namespace's own /var/lib tmpfs, since
    # the host's /tmp stands in for the pods' here.
    return {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": "/var/lib/wiring-home", "LANG": "C.UTF-8",
            "RAY_TMPDIR": "/var/lib/wiring-ray", **env}  # fmt: skip


def main(spec_path: str, report_path: str) -> None:
    import httpx

    spec = json.loads(Path(spec_path).read_text())
    scratch = Path(spec_path).parent
    _setup(spec, scratch)
    Path("/var/lib/wiring-home").mkdir(parents=True)
    Path("/var/lib/wiring-ray").mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    results = []
    try:
        for step in spec["steps"]:
            if "start" in step:
                s = step["start"]
                for folder in s["dirs"]:
                    Path(folder).mkdir(parents=True, exist_ok=True)
                for path, content in s["files"].items():
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    Path(path).write_text(content)
                log = scratch / f"{s['name']}.log"
                proc = subprocess.Popen(s["argv"], env=_environ(s["env"]), stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd="/var/lib/wiring-home")  # fmt: skip
                procs.append(proc)
                ok = _ready(s["ready"], time.monotonic() + spec.get("start_timeout_s", 180), proc)
                results.append({"step": f"start {s['name']}", "ok": ok, "log": "" if ok else log.read_text()[-3000:]})
            elif "run" in step:
                s = step["run"]
                done = subprocess.run(s["argv"], env=_environ(s["env"]), capture_output=True, text=True, timeout=300,
                                      cwd="/var/lib/wiring-home")  # fmt: skip
                results.append({"step": f"run {s['name']}", "ok": done.returncode == 0, "rc": done.returncode,
                                "log": (done.stdout + done.stderr)[-3000:]})  # fmt: skip
            elif "get" in step:
                s = step["get"]
                try:
                    answer = httpx.get(s["url"], headers=s.get("headers", {}), auth=tuple(s["auth"]) if s.get("auth") else None, timeout=60)
                    results.append({"step": f"get {s['name']}", "status": answer.status_code, "body": answer.text[:2000],
                                    "headers": {k.lower(): v for k, v in answer.headers.items()}})  # fmt: skip
                except httpx.HTTPError as exc:
                    results.append({"step": f"get {s['name']}", "status": None, "body": f"{type(exc).__name__}: {exc}"})
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        Path(report_path).write_text(json.dumps({"steps": results}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
