# alignclip: the image every KFP component runs on: CUDA PyTorch from the lock file, a non-root user, no secrets
# (credentials come from Kubernetes Secrets as environment variables).
#
# CUDA: the locked torch==2.14.1 (cu130) wheel brings its CUDA 13 runtime, cuDNN and NCCL as pinned nvidia-*
# wheels, so the base is a pinned slim Python 3.11 (the lock's interpreter) rather than a pytorch/pytorch image,
# which would ship a second torch. The GPU node needs only the NVIDIA driver (>= 580, CUDA 13) and device plugin.
# Pin the base by digest in your registry mirror: `docker buildx imagetools inspect python:3.11.14-slim-bookworm`.
# Build: docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) --build-arg IMAGE=ghcr.io/<org>/alignclip:0.1.0 \
#          -t ghcr.io/<org>/alignclip:0.1.0 .
FROM python:3.11.14-slim-bookworm

# Provenance tags of every MLflow run made in this image (no .git inside): pass them at build time.
ARG GIT_COMMIT=unknown
ARG IMAGE=ghcr.io/alignclip/alignclip:0.1.0
ENV ALIGNCLIP_GIT_COMMIT=${GIT_COMMIT} \
    ALIGNCLIP_IMAGE=${IMAGE} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    ALIGNCLIP_CACHE=/home/alignclip/.cache/alignclip

WORKDIR /app

# Dependencies first (cached layer): exactly the locked set, no resolver run.
COPY requirements.lock ./
RUN python -m pip install --no-deps -r requirements.lock

# The package, the pipeline definitions (kfp imports components/ and pipelines/ from /app) and params.
COPY pyproject.toml README.md params.yaml data.dvc ./
COPY alignclip ./alignclip
COPY components ./components
COPY pipelines ./pipelines
RUN python -m pip install --no-deps --no-build-isolation . \
    && useradd --create-home --uid 1000 alignclip \
    && mkdir -p /home/alignclip/.cache/alignclip \
    && chown -R alignclip:alignclip /home/alignclip /app

USER 1000:1000
# DVC inside the container works without .git
RUN dvc config --global core.no_scm true

ENTRYPOINT ["alignclip"]
CMD ["--help"]
