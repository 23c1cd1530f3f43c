# syntax=docker/dockerfile:1
# stanceserve image, CPU (default) or CUDA:
#
#   docker build -t stanceserve:cpu .
#   docker build -t stanceserve:cuda --build-arg TARGET=cuda .
#   docker run -p 8000:8000 -v stanceserve-data:/data stanceserve:cpu
#   docker run --gpus all -p 8000:8000 -v stanceserve-data:/data stanceserve:cuda
#
# TARGET=cpu   python:3.11.14-slim-bookworm, torch 2.13.0+cpu from the PyTorch CPU index.
# TARGET=cuda  nvidia/cuda:13.0.2-runtime-ubuntu24.04 (Python 3.12), torch 2.13.0 built for CUDA 13.0 (the
#              cu130 index; the same build PyPI serves as torch==2.13.0). Needs an NVIDIA driver >= 580 on the
#              host and the NVIDIA container toolkit (docker run --gpus all / the compose "gpu" profile).
#
# Every RUN step is a script or make target that CI runs too (.ci/run), so the steps are tested even where no
# Docker daemon is (tests/deploy/test_image.py checks this and runs hadolint on this file).
# The embedded SmolLM2-135M-Instruct is fetched at build time: the container needs no network to serve it.
# /data (a volume) holds the adapter store, seeded with the shipped adapters on first start, and the Hugging
# Face cache (for --model <hf id>). No secret is baked in: pass STANCESERVE_ADMIN_KEY at run time.
ARG TARGET=cpu

FROM python:3.11.14-slim-bookworm AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------- build: venv + model
# (base-cpu / base-cuda are the pinned images above; hadolint cannot see through the build arg)
# hadolint ignore=DL3006
FROM base-${TARGET} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    STANCESERVE_CACHE_DIR=/opt/stanceserve/cache
WORKDIR /src
COPY deploy/docker/system-deps.sh deploy/docker/
RUN deploy/docker/system-deps.sh --clean-apt-lists
COPY pyproject.toml Makefile ./
COPY app ./app
COPY training ./training
COPY adapters ./adapters
# torch first from $TORCH_INDEX_URL, then a regular (non-editable) install of the server alone (no [train],
# [bench] or [dev] extras); the shipped adapters land in /opt/venv/share/stanceserve/adapters.
RUN make venv VENV=/opt/venv INSTALL_SPEC=. "TORCH_INDEX_URL=${TORCH_INDEX_URL}" \
    && make model VENV=/opt/venv

# ---------------------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM base-${TARGET} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/data \
    USER=stanceserve \
    HF_HOME=/data/hf \
    STANCESERVE_CACHE_DIR=/opt/stanceserve/cache \
    STANCESERVE_ADAPTERS_DIR=/data/adapters \
    STANCESERVE_SEED_ADAPTERS=true \
    STANCESERVE_HOST=0.0.0.0 \
    STANCESERVE_PORT=8000
COPY deploy/docker/system-deps.sh /opt/stanceserve/
RUN /opt/stanceserve/system-deps.sh --clean-apt-lists
COPY --from=build /opt/venv /opt/venv
# only the safetensors copy of the embedded model, not the wheel it came from
COPY --from=build /opt/stanceserve/cache/models /opt/stanceserve/cache/models
COPY --chown=1000:1000 deploy/docker/data /data
# non-root (uid 1000; USER above names it for Python's getpass, as there is no passwd entry)
USER 1000:1000
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
CMD ["stanceserve", "serve"]
