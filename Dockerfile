# oncoserve container image — the same image `make image` assembles without Docker (infra/image/build.sh):
# Debian bookworm, python3 3.11, the locked wheels, the project; user 10001 (what the Helm chart runs as).
#
#   docker build -t oncoserve:0.1.0 .                      # CPU image (the default)
#   docker build --build-arg VARIANT=gpu -t oncoserve:0.1.0-gpu .
#
# GPU variant (VARIANT=gpu), same base (debian:bookworm-slim; the NVIDIA driver comes from the node through
# the NVIDIA container toolkit, CUDA and cuDNN come as wheels): torch==2.13.0 from PyPI's default CUDA
# build (about 3 GB of nvidia-* wheels) instead of the CPU wheel, onnxruntime-gpu instead of onnxruntime,
# and tensorrt-cu12 for `oncoserve compile --tensorrt` on GPU nodes. Triton itself is NVIDIA's own image
# (values.yaml triton.image); this image feeds it the verified model repository. GPU-verified-only: this
# variant has never been built on the project's CPU machines.

ARG VARIANT=cpu

# -- build stage: a venv with everything, built where compilers and caches may live -----------------------
FROM debian:bookworm-slim AS build
ARG VARIANT
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# uv in a venv of its own: the build stage's tool, never copied into the runtime stage.
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9 && python3 -m venv /opt/oncoserve/venv
ENV UV_LINK_MODE=copy PATH=/opt/uv/bin:/opt/oncoserve/venv/bin:$PATH
COPY requirements.lock /src/requirements.lock
# torch first, from the variant's index: the CPU build, or PyPI's CUDA build.
RUN if [ "$VARIANT" = gpu ]; then uv pip install --python /opt/oncoserve/venv/bin/python torch==2.13.0; \
    else uv pip install --python /opt/oncoserve/venv/bin/python --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; fi
RUN uv pip install --python /opt/oncoserve/venv/bin/python --compile-bytecode -r /src/requirements.lock \
    && if [ "$VARIANT" = gpu ]; then uv pip uninstall --python /opt/oncoserve/venv/bin/python onnxruntime \
       && uv pip install --python /opt/oncoserve/venv/bin/python onnxruntime-gpu tensorrt-cu12; fi
COPY . /src
RUN cd /src && /opt/oncoserve/venv/bin/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. services/proto/study.proto \
    && uv build --wheel --out-dir /dist /src \
    && uv pip install --python /opt/oncoserve/venv/bin/python --no-deps --compile-bytecode /dist/oncoserve-*.whl

# -- runtime stage: Debian, python3, tini, wget (KubeRay's probes), and the venv; no build tools ---------
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates tini wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 oncoserve \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/oncoserve --shell /bin/bash oncoserve \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/oncoserve
COPY --from=build /opt/oncoserve /opt/oncoserve
ENV PATH=/opt/oncoserve/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ONCOSERVE_HOME=/var/lib/oncoserve HOME=/home/oncoserve PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/oncoserve
EXPOSE 8000 8600 9000 5000 11112
ENTRYPOINT ["/usr/bin/tini", "--", "oncoserve"]
CMD ["--help"]
