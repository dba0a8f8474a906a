# syntax=docker/dockerfile:1
# One image for every modelloop process; its command selects the role:
#   docker run modelloop serve | monitor | retrain --name M | batch score IN OUT | batch-shard IN OUT
# (deploy/docker/entrypoint.sh). Build: docker build -t modelloop:0.1.0 .
#
# The base is NVIDIA's CUDA runtime with cuDNN, so onnxruntime-gpu runs on the CUDA provider on
# a GPU node; on a CPU node the same image falls back to ONNX Runtime's CPU provider.
# Size trade-off (docs/deploy.md): the image also carries the CPU build of PyTorch, because
# retraining jobs run from it; a serving-only image would drop it.

ARG PYTHON=python3.12

# ---- build: a virtual environment with modelloop and its dependencies -------------------------
FROM ubuntu:24.04 AS build
ARG PYTHON
# The CPU wheel of torch: training runs on CPU in retraining jobs; inference runs on ONNX Runtime.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}" "${PYTHON}-venv" \
 && rm -rf /var/lib/apt/lists/*
RUN "${PYTHON}" -m venv /opt/modelloop \
 && /opt/modelloop/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelloop ./modelloop
COPY training ./training
COPY serving ./serving
COPY monitoring ./monitoring
RUN /opt/modelloop/bin/pip install ".[all]" \
 && /opt/modelloop/bin/modelloop --version

# ---- runtime --------------------------------------------------------------------------------
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS runtime
ARG PYTHON
LABEL org.opencontainers.image.title="modelloop" \
      org.opencontainers.image.description="modelloop serving, monitoring sidecar, retraining and batch scoring" \
      org.opencontainers.image.licenses="Apache-2.0"
# tini reaps the retraining processes the sidecar starts and forwards signals for a clean drain.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}" tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 modelloop \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/modelloop --create-home --shell /usr/sbin/nologin modelloop \
 && install -d -o 10001 -g 10001 /run/modelloop
COPY --from=build /opt/modelloop /opt/modelloop
COPY deploy/docker/entrypoint.sh /usr/local/bin/modelloop-entrypoint
# Everything a process writes goes to MODELLOOP_HOME (a volume) or /tmp, so the root file system
# can be mounted read-only (the Helm chart does).
ENV PATH="/opt/modelloop/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    TINI_SUBREAPER=1 \
    MODELLOOP_HOME=/var/lib/modelloop \
    MODELLOOP_RUN_DIR=/run/modelloop \
    MODELLOOP_SERVING_HOST=0.0.0.0 \
    MODELLOOP_SERVING_PORT=3000 \
    MODELLOOP_MONITOR_HOST=0.0.0.0 \
    MODELLOOP_MONITOR_PORT=8001 \
    BENTOML_HOME=/tmp/bentoml \
    BENTOML_DO_NOT_TRACK=True \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache
USER 10001:10001
WORKDIR /var/lib/modelloop
VOLUME ["/var/lib/modelloop"]
EXPOSE 3000 8001 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["modelloop-entrypoint", "healthcheck"]
ENTRYPOINT ["tini", "--", "modelloop-entrypoint"]
CMD ["serve"]
