#!/usr/bin/env bash
# Build the oncoserve CPU image as an OCI image layout, without Docker or a registry (`make image`).
#
# The same image the Dockerfile describes, from the same inputs (Debian bookworm, python3 3.11, the locked
# wheels, the project), assembled with Debian's own tools:
#   1. base   debootstrap --variant=minbase bookworm + python3, tini, wget (KubeRay's probes), CA
#             certificates; user oncoserve (10001:10001, what the chart runs as); apt caches dropped.
#   2. app    a venv at /opt/oncoserve/venv: torch==2.13.0 (CPU) first, then requirements.lock, then the
#             project as a wheel. Installed by uv inside a chroot of the base; uv and its cache are
#             mounted in for the install only (the Dockerfile's build stage), so no build tool is left.
#   3. OCI    umoci: layer 1 = base, layer 2 = /opt/oncoserve; entrypoint tini -> oncoserve, user 10001,
#             PATH with the venv first (the chart's commands are `oncoserve`, `python`, `mlflow`, `ray`).
# Output: build/image/oci (the layout; `skopeo copy oci:build/image/oci:TAG docker://REGISTRY/...` pushes
# it), build/image/report.json and build/image/REPORT.md (size, layers, packages).
# Needs root (debootstrap, chroot); installs debootstrap and umoci from Debian when missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${IMAGE_DIR:-$ROOT/build/image}
PYTHON=${PYTHON:-python3}
VERSION=$(sed -nE 's/^version = "(.*)"/\1/p' "$ROOT/pyproject.toml" | head -1)
TAG=${IMAGE_TAG:-$VERSION}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,libgomp1,ca-certificates,tini,wget
UV=${UV:-$ROOT/.venv/bin/uv}
UV_CACHE=${UV_CACHE_DIR:-$HOME/.cache/uv}

step() { printf '==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { echo "image: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap and chroot); run it as root or with sudo"
[ -x "$UV" ] || die "$UV not found: run \`make venv\` first (the install uses the project's uv)"
for tool in debootstrap umoci; do
  command -v "$tool" >/dev/null || { step "installing $tool (Debian)"; apt-get install -y -q "$tool" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q "$tool" >/dev/null; }; }
  command -v "$tool" >/dev/null || die "$tool failed to install (apt-get install $tool)"
done
mkdir -p "$OUT"
START=$(date +%s)

# -- 1. base --------------------------------------------------------------------------------------------
BASE="$OUT/base"
BASE_KEY="$SUITE $MIRROR $PACKAGES"
if [ "$(cat "$BASE/.oncoserve-base" 2>/dev/null)" != "$BASE_KEY" ]; then
  step "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
  rm -rf "$BASE" "$BASE.tmp"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$BASE.tmp" "$MIRROR" > "$OUT/debootstrap.log" 2>&1 ||
    { tail -20 "$OUT/debootstrap.log"; die "debootstrap failed (log: $OUT/debootstrap.log)"; }
  chroot "$BASE.tmp" groupadd --gid 10001 oncoserve
  chroot "$BASE.tmp" useradd --uid 10001 --gid 10001 --create-home --home-dir /home/oncoserve --shell /bin/bash oncoserve
  install -d -o 10001 -g 10001 -m 0750 "$BASE.tmp/var/lib/oncoserve"
  rm -rf "$BASE.tmp"/var/cache/apt/archives/*.deb "$BASE.tmp"/var/lib/apt/lists/* "$BASE.tmp"/var/log/*.log
  echo "$BASE_KEY" > "$BASE.tmp/.oncoserve-base"
  mv "$BASE.tmp" "$BASE"
else
  step "base rootfs up to date ($BASE)"
fi

# -- 2. app: the venv, built in a scratch copy of the base ---------------------------------------------
WORK="$OUT/work"
rm -rf "$WORK" && cp -a "$BASE" "$WORK"
rm -f "$WORK/.oncoserve-base"
step "building the project wheel"
rm -rf "$OUT/dist" && "$UV" build --quiet --wheel --out-dir "$OUT/dist" "$ROOT" > "$OUT/wheel.log" 2>&1 ||
  { tail -20 "$OUT/wheel.log"; die "the project wheel failed to build (log: $OUT/wheel.log)"; }
WHEEL=$(basename "$(ls "$OUT"/dist/oncoserve-*.whl)")
# This machine's pip indexes, find-links (the on-disk torch CPU wheel) and constraints, handed to uv.
PIP_ARGS=$("$ROOT/.venv/bin/pip" config list 2>/dev/null |
  sed -nE "s/^[^=]*[.](find-links|extra-index-url|index-url|constraint)='(.*)'$/\1 \2/p" |
  while read -r key values; do for value in $values; do printf -- '--%s %s ' "$key" "$value"; done; done)
MOUNTS=""  # the local folders those name, mounted at the same paths inside the chroot
for path in $(printf '%s\n' $PIP_ARGS | grep '^/\|^file://' | sed 's#^file://##; s#/simple$##' | sort -u); do
  [ -f "$path" ] && path=$(dirname "$path")
  [ -d "$path" ] && MOUNTS="$MOUNTS $path"
done
step "installing torch==2.13.0 (CPU), requirements.lock and $WHEEL into /opt/oncoserve/venv (uv, in a chroot)"
unshare --mount --propagation private bash -euo pipefail -c '
  WORK=$1; UV=$2; CACHE=$3; ROOT=$4; DIST=$5; WHEEL=$6; MOUNTS=$7; PIP_ARGS=$8
  mount -t proc proc "$WORK/proc"
  mount --bind /dev "$WORK/dev"
  cp /etc/resolv.conf "$WORK/etc/resolv.conf"
  mkdir -p "$WORK/build/uv" "$WORK/build/cache" "$WORK/build/src" "$WORK/build/dist"
  mount --bind "$(dirname "$UV")" "$WORK/build/uv"
  mkdir -p "$CACHE" && mount --bind "$CACHE" "$WORK/build/cache"
  mount --bind "$ROOT" "$WORK/build/src" && mount -o remount,bind,ro "$WORK/build/src"
  mount --bind "$DIST" "$WORK/build/dist"
  for path in $MOUNTS; do mkdir -p "$WORK$path" && mount --bind "$path" "$WORK$path"; done
  # The build machine'"'"'s CA bundle (a TLS-inspecting proxy'"'"'s CA lives there), for the install only.
  tls=""
  if [ -n "${SSL_CERT_FILE:-}" ] && [ -f "$SSL_CERT_FILE" ]; then
    touch "$WORK/build/ca.crt" && mount --bind "$SSL_CERT_FILE" "$WORK/build/ca.crt" && tls=SSL_CERT_FILE=/build/ca.crt
  fi
  run() { chroot "$WORK" env -i PATH=/usr/bin:/bin HOME=/root UV_CACHE_DIR=/build/cache UV_LINK_MODE=copy $tls "$@"; }
  run python3 -m venv /opt/oncoserve/venv
  uv="/build/uv/uv pip install -q --python /opt/oncoserve/venv/bin/python --index-strategy unsafe-best-match --compile-bytecode $PIP_ARGS"
  run $uv torch==2.13.0
  run $uv -r /build/src/requirements.lock
  run $uv --no-deps "/build/dist/$WHEEL"
  run /opt/oncoserve/venv/bin/python -c "import torch, ray, mlflow, onnxruntime, pipelines.cli, services.app, services.grpc_servicers"
' _ "$WORK" "$UV" "$UV_CACHE" "$ROOT" "$OUT/dist" "$WHEEL" "$MOUNTS" "$PIP_ARGS"
# Only /opt/oncoserve leaves the scratch copy (what the install mounted or wrote elsewhere is dropped).
APP="$OUT/app"
rm -rf "$APP" && mkdir -p "$APP"
mv "$WORK/opt/oncoserve" "$APP/oncoserve"
rm -rf "$WORK"

# -- 3. OCI image layout -------------------------------------------------------------------------------
LAYOUT="$OUT/oci"
step "assembling the OCI image $LAYOUT:$TAG (umoci)"
rm -rf "$LAYOUT"
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:$TAG"
umoci insert --image "$LAYOUT:$TAG" --history.created_by "debootstrap $SUITE minbase + $PACKAGES; user oncoserve" "$BASE" /
umoci insert --image "$LAYOUT:$TAG" --history.created_by "uv: torch==2.13.0, requirements.lock, $WHEEL" "$APP/oncoserve" /opt/oncoserve
umoci config --image "$LAYOUT:$TAG" \
  --config.user 10001:10001 --config.workingdir /home/oncoserve \
  --config.env PATH=/opt/oncoserve/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env ONCOSERVE_HOME=/var/lib/oncoserve --config.env HOME=/home/oncoserve \
  --config.env PYTHONDONTWRITEBYTECODE=1 --config.env PYTHONUNBUFFERED=1 \
  --config.entrypoint /usr/bin/tini --config.entrypoint -- --config.entrypoint oncoserve --config.cmd --help \
  --config.exposedports 8000/tcp --config.exposedports 8600/tcp --config.exposedports 9000/tcp \
  --config.exposedports 5000/tcp --config.exposedports 11112/tcp \
  --config.label org.opencontainers.image.title=oncoserve --config.label "org.opencontainers.image.version=$VERSION" \
  --config.label org.opencontainers.image.licenses=Apache-2.0 \
  --config.label "org.opencontainers.image.revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
  --history.created_by "entrypoint tini -- oncoserve; user 10001"
umoci gc --layout "$LAYOUT"

# -- report ---------------------------------------------------------------------------------------------
step "reporting size and contents"
"$PYTHON" "$ROOT/infra/image/report.py" --layout "$LAYOUT" --tag "$TAG" --base "$BASE" --app "$APP/oncoserve" \
  --seconds $(( $(date +%s) - START )) --out "$OUT"
rm -rf "$APP"
step "done: $LAYOUT:$TAG (report: $OUT/REPORT.md)"
