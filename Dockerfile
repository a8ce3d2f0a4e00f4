# alignclip: the image every KFP component runs on: CUDA PyTorch from the lock file, a non-root user, no secrets
# (credentials come from Kubernetes Secrets as environment variables).
#
# CUDA: the locked torch==2.14.1 (cu130) wheel brings its CUDA 13 runtime, cuDNN and NCCL as pinned nvidia-*
# wheels, so the base is a pinned slim Python 3.11 (the lock's interpreter) rather than a pytorch/pytorch image,
# which would ship a second torch. The GPU node needs only the NVIDIA driver (>= 580, CUDA 13) and device plugin.
# Pin the base by digest in your registry mirror: `docker buildx imagetools inspect python:3.11.14-slim-bookworm`.
# Any Debian/Ubuntu base with python3 (3.11) and python3-venv works (the tests use one made with debootstrap).
#
# Build with `make image` (BuildKit; the git commit as provenance). The package index is
# reached with the builder's pip settings passed as BuildKit secrets, which never land in a layer:
#   --secret id=pip.conf,src=<pip config: index URLs, tokens>  --secret id=ca.crt,src=<CA bundle for the index>
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/alignclip \
    PATH=/opt/alignclip/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    HOME=/home/alignclip \
    XDG_CACHE_HOME=/home/alignclip/.cache \
    MPLCONFIGDIR=/home/alignclip/.cache/matplotlib \
    ALIGNCLIP_CACHE=/home/alignclip/.cache/alignclip

# Dependencies first: exactly the locked set (--no-deps: no resolver run). This is the big layer (torch + CUDA
# wheels); it depends on the lock file alone, so code changes rebuild only the small layer below.
RUN --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    --mount=type=secret,id=pip.conf \
    --mount=type=secret,id=ca.crt \
    if [ -f /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi \
    && if [ -f /run/secrets/ca.crt ]; then export PIP_CERT=/run/secrets/ca.crt; fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-deps -r /tmp/requirements.lock

# The package itself, installed (not editable) from a bind mount of the build context: no source tree, tests
# or build directory stays in the image; KFP components import the installed package.
# KFP's launcher writes artifacts under /gcs, /minio and /s3 (backends mount emptyDirs there for non-root images,
# kubeflow/pipelines#10538); they belong to the user so that a plain `docker run` (kfp's DockerRunner) writes too.
RUN --mount=type=bind,source=.,target=/tmp/src,rw \
    pip install --no-deps --no-build-isolation /tmp/src \
    && useradd --uid 1000 --user-group --home-dir /home/alignclip --create-home --shell /bin/sh alignclip \
    && mkdir -p /gcs /minio /s3 /home/alignclip/.cache/alignclip \
    && chown -R 1000:1000 /gcs /minio /s3 /home/alignclip

# The tiny preset's default weights (`alignclip pretrain`, portable kernels: the bytes the README states), built
# once here: every task pod's cache starts empty, and without them each task of the demo pipeline pre-trained its
# own copy for a minute. ALIGNCLIP_WEIGHTS_PATH is searched before the cache (a CPU of another kernel level, or a
# change of the code or libraries that the weights' name digests, still builds its own).
ENV ALIGNCLIP_WEIGHTS_PATH=/opt/alignclip/weights
# (matplotlib's config folder in /tmp: as root it would leave a root-owned one in the user's home)
RUN ALIGNCLIP_CACHE=/tmp/build-cache MPLCONFIGDIR=/tmp/build-mpl alignclip pretrain /tmp/pretrained \
    && mkdir -p /opt/alignclip/weights && mv /tmp/build-cache/pretrained/* /opt/alignclip/weights/ \
    && rm -rf /tmp/build-cache /tmp/build-mpl /tmp/pretrained

USER 1000:1000
WORKDIR /home/alignclip
# DVC inside the container works without .git
RUN dvc config --global core.no_scm true

# Provenance of every MLflow run made in this image (no .git inside): the last layer, so a new commit rebuilds
# only metadata. Runs are tagged git_commit / image from these. No data version: the image holds no data, and a run
# tags the data it read (alignclip.tracking.data_tags: the manifest's digest unless DVC tracks its folder).
ARG GIT_COMMIT=unknown
ARG IMAGE=ghcr.io/alignclip/alignclip:0.1.0
LABEL org.opencontainers.image.revision=${GIT_COMMIT} \
      org.opencontainers.image.title=alignclip
ENV ALIGNCLIP_GIT_COMMIT=${GIT_COMMIT} \
    ALIGNCLIP_IMAGE=${IMAGE}

# `docker run IMAGE train ...`; KFP tasks set their own command (Kubernetes `command` replaces the entrypoint).
ENTRYPOINT ["alignclip"]
CMD ["--help"]
