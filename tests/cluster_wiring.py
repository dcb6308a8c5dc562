"""Run the Helm chart's workloads as processes, the way their pods would run them.

`workload(...)` turns a rendered container into a process description: its command and args, its
environment with every Secret reference resolved from a test dictionary, and its volumes. A step with a
`pod` runs as that pod would: in a network namespace of its own (an address on a bridge, as pods get from
the cluster network), with its volumes mounted where the manifest says — emptyDirs private to the pod,
Secrets and ConfigMaps as read-only files, a PersistentVolumeClaim one folder shared by every pod that
claims it. `run_in_cluster_namespace(spec)` runs a list of steps (start a workload and wait for its probe,
run a job to completion, stop a pod, make an HTTP request) inside a private network and mount namespace
(`unshare`) over an overlay of the host's root: every Service name in /etc/hosts pointing at its pod,
writes (to /etc, /data, /var/lib) landing in the overlay, never on the host. So the names, ports, probes,
arguments, environment and mount paths are exactly the rendered manifests', and nothing on the host (the
test stack's own ports, its files) is seen or touched. Steps without a `pod` share the namespace's own
loopback (the first wiring tests, one server per port).

Run as a script (`python tests/cluster_wiring.py SPEC.json REPORT.json`) it is the part inside the
namespace; `python tests/cluster_wiring.py --container MOUNTS.json ARGV...` mounts a container's volumes
in its own mount namespace and execs it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent)
POD_NET = "10.77.0"  # the pods' network: a bridge in the namespace at .1, pods from .11
PODS_DIR = "/var/lib/wiring-pods"  # per pod, per volume: its emptyDirs, Secrets and ConfigMaps
CLAIMS_DIR = "/var/lib/wiring-claims"  # per PersistentVolumeClaim: one folder every pod claiming it shares


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


def config_maps(docs: list[dict]) -> dict[str, dict[str, str]]:
    """The rendered ConfigMaps' data by name (what a configMap volume shows as files)."""
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def _volume_mounts(pod_name: str, pod: dict, container: dict, secrets: dict[str, dict[str, str]],
                   maps: dict[str, dict[str, str]]) -> list[dict]:
    """Each of the container's volumeMounts as {source folder, path, read-only, files to write first}."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        files = {}
        if "persistentVolumeClaim" in volume:
            source = f"{CLAIMS_DIR}/{volume['persistentVolumeClaim']['claimName']}"
        else:
            source = f"{PODS_DIR}/{pod_name}/{mount['name']}"
            if "secret" in volume:
                files = secrets[volume["secret"]["secretName"]]
            elif "configMap" in volume:
                files = maps[volume["configMap"]["name"]]
            elif "emptyDir" not in volume:
                raise ValueError(f"{pod_name}: volume {mount['name']} of a kind the wiring test does not make: {volume}")
        if mount.get("subPath"):
            source = f"{source}/{mount['subPath']}"
        mounts.append({"source": source, "path": mount["mountPath"], "read_only": bool(mount.get("readOnly")), "files": files})
    return mounts


def workload(name: str, pod: dict, container: dict, secrets: dict[str, dict[str, str]], probe_host: str,
             pod_name: str | None = None, maps: dict[str, dict[str, str]] | None = None) -> dict:
    """A step that starts `container` of `pod`. With `pod_name` it runs as that pod (its own network and
    volumes, probed at the pod's address); without, on the namespace's loopback with its volumes as
    folders (Secrets as files; claims and ConfigMaps are not made)."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    probe = container.get("readinessProbe", {})
    host = pod_name or probe_host
    ready = None
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        ready = {"http": f"http://{host}:{ports.get(port, port)}{probe['httpGet']['path']}"}
    elif "tcpSocket" in probe:
        port = probe["tcpSocket"]["port"]
        ready = {"tcp": [host, ports.get(port, port)]}
    step = {"name": name, "argv": [*container.get("command", []), *container.get("args", [])],
            "env": resolve_env(container, secrets), "ready": ready}  # fmt: skip
    if pod_name is not None:
        return {"start": {**step, "pod": pod_name, "mounts": _volume_mounts(pod_name, pod, container, secrets, maps or {})}}
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
    return {"start": {**step, "files": files, "dirs": dirs}}


_QUANTITY = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("4", "500m", "12Gi") as a number."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text).groups()
    return float(number) * _QUANTITY[unit]


def kuberay_argv(group: dict, head_address: str | None = None, overrides: dict[str, str] | None = None,
                 autoscaling: bool = False) -> list[str]:
    """The `ray start` command KubeRay's operator generates for a head or worker group from its
    rayStartParams: `--head` (or `--address=<head Service>:<port>` for workers), every param as `--k=v`,
    the dashboard on all interfaces and the agent on 52365 unless given, the Ray container's CPU and
    memory limits (requests when no limit) as `--num-cpus` / `--memory` unless given, `--no-monitor` on
    the head when the in-tree autoscaler runs beside it, and `--block`. `overrides` changes per-node
    settings where this machine differs from a pod (ports when nodes share one network namespace)."""
    resources = group["template"]["spec"]["containers"][0].get("resources", {})
    derived = {}
    for name, param in (("cpu", "num-cpus"), ("memory", "memory")):
        quantity = resources.get("limits", {}).get(name, resources.get("requests", {}).get(name))
        if quantity is not None:
            derived[param] = str(int(_quantity(quantity))) if name == "memory" else f"{_quantity(quantity):g}"
    params = {"dashboard-agent-listen-port": "52365", **derived, **group["rayStartParams"], **(overrides or {})}
    if head_address is None:
        params = {"dashboard-host": "0.0.0.0", **params}
    argv = ["ray", "start", "--head"] if head_address is None else ["ray", "start", f"--address={head_address}"]
    flags = ["--no-monitor"] if autoscaling and head_address is None else []
    return [*argv, *(f"--{k}={v}" for k, v in params.items()), *flags, "--block", "--disable-usage-stats"]


def ray_node(name: str, group: dict, secrets: dict[str, dict[str, str]], ready_url: str | None,
             head_address: str | None = None, overrides: dict[str, str] | None = None, pod_name: str | None = None,
             maps: dict[str, dict[str, str]] | None = None, autoscaling: bool = False) -> dict:
    """A Ray head or worker pod of a RayService / RayJob group, as KubeRay starts it."""
    pod = group["template"]["spec"]
    step = workload(name, pod, pod["containers"][0], secrets, "127.0.0.1", pod_name, maps)
    if pod_name is None:
        # On the shared loopback only the namespace's own /var/lib is made: the data claim and ConfigMaps
        # (at /data, /etc/...) are left out (a driver that only joins the cluster reads none of them).
        step["start"]["dirs"] = [d for d in step["start"]["dirs"] if d.startswith("/var/lib/")]
        step["start"]["files"] = {f: c for f, c in step["start"]["files"].items() if f.startswith("/var/lib/")}
    step["start"]["argv"] = kuberay_argv(group, head_address, overrides, autoscaling)
    step["start"]["ready"] = {"http": ready_url} if ready_url else None
    return step


def job(name: str, container: dict, secrets: dict[str, dict[str, str]]) -> dict:
    return {"run": {"name": name, "argv": [*container.get("command", []), *container.get("args", [])],
                    "env": resolve_env(container, secrets)}}  # fmt: skip


def run_in_cluster_namespace(spec: dict, workdir: Path, timeout_s: float = 600) -> dict:
    """Run the spec's steps in a fresh network + mount namespace; returns the report."""
    spec_file, report_file = workdir / "spec.json", workdir / "report.json"
    spec_file.write_text(json.dumps(spec))
    # A PID namespace too: when the run ends or is killed, the kernel ends every process it started.
    run = subprocess.run(["unshare", "--net", "--mount", "--pid", "--mount-proc", "--fork", "--kill-child", sys.executable, __file__,
                          str(spec_file), str(report_file)], capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    if not report_file.exists():
        raise AssertionError(f"the namespace run wrote no report (rc {run.returncode}): {run.stderr[-3000:]}")
    return json.loads(report_file.read_text())


# -- inside the namespace ---------------------------------------------------------------------------
REPO = str(Path(__file__).resolve().parents[1])
REPO_STAGE = "/var/lib/wiring-repo"  # the checkout (and its venv), re-mounted where a pod's /tmp covers it


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _setup(spec: dict, scratch: Path) -> dict[str, str]:
    """The namespace's filesystem and network; returns each pod's address."""
    # An overlay of the host's root, entered with chroot: what the pods write (/etc/oncoserve, /data,
    # /var/lib) lands in a tmpfs and goes with the namespace. The scratch folder (spec, report, logs) is
    # the host's own.
    _sh("mount", "--make-rprivate", "/")
    layers = scratch / "overlay"
    layers.mkdir(exist_ok=True)
    _sh("mount", "-t", "tmpfs", "tmpfs", str(layers))  # the upper layer may not lie inside the lower one
    for part in ("upper", "work", "root"):
        (layers / part).mkdir()
    root = layers / "root"
    _sh("mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={layers}/upper,workdir={layers}/work", str(root))
    for special in ("proc", "sys", "dev"):
        _sh("mount", "--rbind", f"/{special}", f"{root}/{special}")
    _sh("mount", "--bind", str(scratch), f"{root}{scratch}")
    os.chroot(root)
    os.chdir("/")
    _sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/var/lib")
    _sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")  # `ip netns` keeps its handles here
    Path(REPO_STAGE).mkdir()
    _sh("mount", "--bind", REPO, REPO_STAGE)
    _sh("ip", "link", "set", "lo", "up")
    addresses = {}
    if spec.get("pods"):
        _sh("ip", "link", "add", "pods0", "type", "bridge")
        _sh("ip", "addr", "add", f"{POD_NET}.1/24", "dev", "pods0")
        _sh("ip", "link", "set", "pods0", "up")
    for index, pod in enumerate(spec.get("pods", {}), start=11):
        address = addresses[pod] = f"{POD_NET}.{index}"
        _sh("ip", "netns", "add", pod)
        _sh("ip", "link", "add", f"veth{index}", "type", "veth", "peer", "name", "eth0", "netns", pod)
        _sh("ip", "link", "set", f"veth{index}", "master", "pods0", "up")
        _sh("ip", "-n", pod, "addr", "add", f"{address}/24", "dev", "eth0")
        for link in ("eth0", "lo"):
            _sh("ip", "-n", pod, "link", "set", link, "up")
        _sh("ip", "-n", pod, "route", "add", "default", "via", f"{POD_NET}.1")
    lines = ["127.0.0.1 localhost", "::1 localhost", *(f"127.0.0.1 {h}" for h in spec.get("hosts", []))]
    for pod, names in spec.get("pods", {}).items():
        lines += [f"{addresses[pod]} {n}" for n in (pod, *names)]
    Path("/etc/hosts").write_text("\n".join(lines) + "\n")
    # No DNS server here: a query must fail at once (the host's resolver would be unreachable from a pod's
    # route and time out, and gRPC's resolver waits for it before it uses /etc/hosts' answer).
    Path("/etc/resolv.conf").unlink(missing_ok=True)
    Path("/etc/resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    return addresses


def _container(mounts_file: str, argv: list[str]) -> None:
    """In a container's own mount namespace: its volumes where the manifest mounts them, then exec."""
    _sh("mount", "--make-rprivate", "/")
    for mount in json.loads(Path(mounts_file).read_text()):
        source, path = Path(mount["source"]), mount["path"]
        source.mkdir(parents=True, exist_ok=True)
        for key, content in mount["files"].items():
            (source / key).write_text(content)
        Path(path).mkdir(parents=True, exist_ok=True)
        _sh("mount", "--bind", str(source), path)
        if mount["read_only"]:
            _sh("mount", "-o", "remount,bind,ro", path)
    if not Path(REPO).exists():  # a pod's /tmp covered the checkout (a clone under /tmp)
        Path(REPO).mkdir(parents=True)
        _sh("mount", "--bind", REPO_STAGE, REPO)
    os.execvp(argv[0], argv)


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


def _environ(env: dict[str, str], pod: str | None) -> dict[str, str]:
    base = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    if pod is not None:  # the image's user home; Ray's temp dir is the pod's own /tmp, as in a pod
        return {**base, "HOME": "/home/oncoserve", **env}
    # RAY_TMPDIR: Ray's default temp dir (/tmp/ray in a pod) inside the namespace's own /var/lib tmpfs, since
    # the host's /tmp stands in for the pods' here.
    return {**base, "HOME": "/var/lib/wiring-home", "RAY_TMPDIR": "/var/lib/wiring-ray", **env}


def _argv(step: dict, scratch: Path) -> list[str]:
    """The command line of a step: as is on the shared loopback, else inside its pod."""
    if step.get("pod") is None:
        return step["argv"]
    mounts = scratch / f"{step['name']}.mounts.json"
    mounts.write_text(json.dumps(step.get("mounts", [])))
    return ["nsenter", f"--net=/run/netns/{step['pod']}", "unshare", "--mount", "--propagation", "private",
            sys.executable, __file__, "--container", str(mounts), *step["argv"]]  # fmt: skip


def _http(s: dict) -> dict:
    """One HTTP request (or the same one repeated until it answers as `until` says, within its time)."""
    import httpx

    method = s.get("method", "GET")
    until = s.get("until")
    deadline = time.monotonic() + (until or {}).get("within_s", 0)
    files = {field: (name, Path(path).read_bytes()) for field, (name, path) in s.get("files", {}).items()} or None
    while True:
        try:
            answer = httpx.request(method, s["url"], headers=s.get("headers", {}), json=s.get("json"), files=files,
                                   auth=tuple(s["auth"]) if s.get("auth") else None, timeout=s.get("timeout_s", 60))  # fmt: skip
            result = {"status": answer.status_code, "body": answer.text,
                      "headers": {k.lower(): v for k, v in answer.headers.items()}}  # fmt: skip
        except httpx.HTTPError as exc:
            result = {"status": None, "body": f"{type(exc).__name__}: {exc}"}
        if until is None or time.monotonic() > deadline or _answers(result, until):
            return {"step": f"{method.lower()} {s['name']}", **result, "body": result["body"][: s.get("body_chars", 20000)]}
        time.sleep(1)  # polling, as a client waiting for a rollout does


def _answers(result: dict, until: dict) -> bool:
    if result["status"] != until.get("status", 200):
        return False
    if "json" not in until:
        return True
    path, expected = until["json"]
    try:
        value = json.loads(result["body"])
        for key in path:
            value = value[key]
    except (ValueError, KeyError, IndexError, TypeError):
        return False
    return value == expected


def _stop(procs: list[tuple[str | None, subprocess.Popen]]) -> None:
    for _, proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for _, proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(spec_path: str, report_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    scratch = Path(spec_path).parent
    _setup(spec, scratch)
    Path("/var/lib/wiring-home").mkdir(parents=True)
    Path("/var/lib/wiring-ray").mkdir(parents=True)
    for path, content in spec.get("claims", {}).items():  # what an operator put on a claim beforehand
        (Path(CLAIMS_DIR) / path).parent.mkdir(parents=True, exist_ok=True)
        (Path(CLAIMS_DIR) / path).write_text(content)
    procs: list[tuple[str | None, subprocess.Popen]] = []
    results = []
    try:
        for step in spec["steps"]:
            if "start" in step:
                s = step["start"]
                for folder in s.get("dirs", []):
                    Path(folder).mkdir(parents=True, exist_ok=True)
                for path, content in s.get("files", {}).items():
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                    Path(path).write_text(content)
                log = scratch / f"{s['name']}.log"
                proc = subprocess.Popen(_argv(s, scratch), env=_environ(s["env"], s.get("pod")), stdout=log.open("wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True, cwd="/var/lib/wiring-home")  # fmt: skip
                procs.append((s.get("pod"), proc))
                ok = _ready(s["ready"], time.monotonic() + spec.get("start_timeout_s", 180), proc)
                results.append({"step": f"start {s['name']}", "ok": ok, "log": "" if ok else log.read_text()[-3000:]})
            elif "run" in step:
                s = step["run"]
                try:
                    done = subprocess.run(_argv(s, scratch), env=_environ(s["env"], s.get("pod")), capture_output=True,
                                          text=True, timeout=s.get("timeout_s", 300), cwd="/var/lib/wiring-home")  # fmt: skip
                    results.append({"step": f"run {s['name']}", "ok": done.returncode == 0, "rc": done.returncode,
                                    "log": (done.stdout + done.stderr)[-s.get("log_chars", 3000):]})  # fmt: skip
                except subprocess.TimeoutExpired as exc:
                    output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
                    results.append({"step": f"run {s['name']}", "ok": False, "rc": None, "log": "timed out\n" + output[-3000:]})
            elif "stop" in step:  # the pod deleted (a RayJob's cluster once its job has finished)
                pod = step["stop"]["pod"]
                _stop([p for p in procs if p[0] == pod])
                procs = [p for p in procs if p[0] != pod]
                results.append({"step": f"stop {pod}", "ok": True})
            elif "get" in step:
                results.append(_http(step["get"]))
            elif "http" in step:
                results.append(_http(step["http"]))
    finally:
        _stop(procs)
        Path(report_path).write_text(json.dumps({"steps": results}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--container":
        _container(sys.argv[2], sys.argv[3:])
    else:
        main(*sys.argv[1:3])
