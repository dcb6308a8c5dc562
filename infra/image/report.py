"""Size and contents of the built image (infra/image/build.sh): report.json and REPORT.md beside the layout.

Standard library only: it runs with the build machine's python3, before or without the project's venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path


def tree_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def blob(layout: Path, digest: str) -> Path:
    algorithm, value = digest.split(":", 1)
    return layout / "blobs" / algorithm / value


def manifest(layout: Path, tag: str) -> dict:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads(blob(layout, entry["digest"]).read_text()) | {"digest": entry["digest"]}
    raise SystemExit(f"tag {tag} not in {layout}/index.json")


def debian_packages(base: Path) -> list[str]:
    out = subprocess.run(["dpkg-query", f"--admindir={base}/var/lib/dpkg", "-W", "-f=${Package}=${Version}\n"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return sorted(line for line in out.splitlines() if line)


def python_packages(app: Path) -> list[dict]:
    """Each installed distribution with its version and the bytes of the files its RECORD lists."""
    site = next(app.glob("venv/lib/python3*/site-packages"))
    found = []
    for info in sorted(site.glob("*.dist-info")):
        name, version = info.name.removesuffix(".dist-info").rsplit("-", 1)
        size = 0
        record = info / "RECORD"
        for line in record.read_text().splitlines() if record.exists() else []:
            path = site / line.split(",", 1)[0]
            if path.is_file():
                size += path.stat().st_size
        found.append({"name": name, "version": version, "bytes": size})
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag in ("--layout", "--tag", "--base", "--app", "--out"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--seconds", type=int, required=True)
    args = ap.parse_args()
    layout, base, app, out = Path(args.layout), Path(args.base), Path(args.app), Path(args.out)
    image = manifest(layout, args.tag)
    config = json.loads(blob(layout, image["config"]["digest"]).read_text())
    history = [h.get("created_by", "") for h in config.get("history", []) if not h.get("empty_layer")]
    layers = [{"digest": layer["digest"], "compressed_bytes": layer["size"], "created_by": made}
              for layer, made in zip(image["layers"], history)]  # fmt: skip
    python = python_packages(app)
    report = {
        "image": f"oci:{layout}:{args.tag}", "manifest_digest": image["digest"], "build_seconds": args.seconds,
        "compressed_bytes": sum(layer["compressed_bytes"] for layer in layers),
        "uncompressed_bytes": {"base": tree_bytes(base), "app": tree_bytes(app)},
        "layers": layers, "config": config["config"],
        "debian_packages": debian_packages(base), "python_packages": python,
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=1))
    mb = 1024 * 1024
    lines = [f"# oncoserve image {args.tag}", "",
             f"`{report['image']}` (manifest `{image['digest']}`), built in {args.seconds} s.", "",
             f"- compressed (what a registry stores and a node pulls): {report['compressed_bytes'] / mb:,.0f} MB",
             f"- unpacked: base {report['uncompressed_bytes']['base'] / mb:,.0f} MB + app {report['uncompressed_bytes']['app'] / mb:,.0f} MB",
             f"- entrypoint `{' '.join(config['config'].get('Entrypoint', []))}`, user {config['config'].get('User')}",
             f"- {len(report['debian_packages'])} Debian packages, {len(python)} Python distributions", "",
             "| layer | compressed MB | made by |", "|---|---:|---|"]  # fmt: skip
    lines += [f"| `{layer['digest'][7:19]}` | {layer['compressed_bytes'] / mb:,.0f} | {layer['created_by']} |" for layer in layers]
    lines += ["", "Largest Python distributions:", "", "| distribution | version | MB |", "|---|---|---:|"]
    lines += [f"| {p['name']} | {p['version']} | {p['bytes'] / mb:,.0f} |" for p in sorted(python, key=lambda p: -p["bytes"])[:15]]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
