# syntax=docker/dockerfile:1
# Two images from one Dockerfile; their command selects the role (deploy/docker/entrypoint.sh):
#
#   full (the default, the last stage):  every role
#     docker build -t modelloop:0.1.0 .
#     docker run modelloop serve | monitor | retrain --name M | batch score IN OUT | batch-shard IN OUT | bootstrap NAME
#   serving:  serving only, without torch and Evidently (`.[serving]`)
#     docker build --target serving -t modelloop:0.1.0-serving .
#     docker run modelloop:0.1.0-serving serve | batch score IN OUT | batch-shard IN OUT
#
# The base is NVIDIA's CUDA runtime with cuDNN for both, so onnxruntime-gpu runs on the CUDA
# provider on a GPU node; on a CPU node the same image falls back to ONNX Runtime's CPU provider.
# Size trade-off (docs/deploy.md, scripts/image_sizes.py): full also carries the CPU build of
# PyTorch, because retraining jobs run from it; serving does not.

ARG PYTHON=python3.12

# ---- sources: what pip installs, in one place for both build stages ---------------------------
FROM scratch AS sources
COPY pyproject.toml README.md /src/
COPY modelloop /src/modelloop
COPY training /src/training
COPY serving /src/serving
COPY monitoring /src/monitoring

# ---- build-base: Python and an empty virtual environment ---------------------------------------
FROM ubuntu:24.04 AS build-base
ARG PYTHON
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}" "${PYTHON}-venv" \
 && rm -rf /var/lib/apt/lists/* \
 && "${PYTHON}" -m venv /opt/modelloop
WORKDIR /src

# ---- build-serving: modelloop[serving], no torch, no Evidently ---------------------------------
FROM build-base AS build-serving
COPY --from=sources /src /src
RUN /opt/modelloop/bin/pip install ".[serving]" \
 && /opt/modelloop/bin/modelloop --version

# ---- build-full: the CPU build of torch, then modelloop[all] ----------------------------------
FROM build-base AS build-full
# The CPU wheel of torch: training runs on CPU in retraining jobs; inference runs on ONNX Runtime.
# Installed before the sources are copied, so a code change does not reinstall it.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
RUN /opt/modelloop/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY --from=sources /src /src
RUN /opt/modelloop/bin/pip install ".[all]" \
 && /opt/modelloop/bin/modelloop --version

# ---- runtime: what both images share (everything but /opt/modelloop) --------------------------
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS runtime
ARG PYTHON
LABEL org.opencontainers.image.title="modelloop" \
      org.opencontainers.image.licenses="Apache-2.0"
# tini reaps the retraining processes the sidecar starts and forwards signals for a clean drain.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "${PYTHON}" tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 modelloop \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/modelloop --create-home --shell /usr/sbin/nologin modelloop \
 && install -d -o 10001 -g 10001 /run/modelloop
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
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["modelloop-entrypoint", "healthcheck"]
ENTRYPOINT ["tini", "--", "modelloop-entrypoint"]
CMD ["serve"]

# ---- serving: `docker build --target serving` ------------------------------------------------
FROM runtime AS serving
LABEL org.opencontainers.image.description="modelloop serving and batch scoring (no training, no monitoring)"
# the entrypoint refuses the roles this image cannot run (monitor, retrain, bootstrap), naming
# the full image
ENV MODELLOOP_IMAGE_TARGET=serving
COPY --from=build-serving /opt/modelloop /opt/modelloop
EXPOSE 3000 8081

# ---- full: every role; the last stage, so `docker build .` builds it -------------------------
FROM runtime AS full
LABEL org.opencontainers.image.description="modelloop serving, monitoring sidecar, retraining and batch scoring"
ENV MODELLOOP_IMAGE_TARGET=full
COPY --from=build-full /opt/modelloop /opt/modelloop
EXPOSE 3000 8001 8081
