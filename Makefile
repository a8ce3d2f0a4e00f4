# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv from the lock file if missing.
SHELL := /bin/bash
, := ,
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# extra package indexes of this workplace (local wheel mirrors); empty elsewhere
UV_INDEXES ?= $(foreach i,$(wildcard /opt/pypi-more/simple /opt/pypi/simple),--extra-index-url file://$(i))
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-fast bench lock help image mlflow-image

help:
	@echo "make demo   - set up .venv and run the pipeline (dvc repro) on the embedded RotatedDigits"
	@echo "make test   - set up .venv and run the whole test suite (what CI runs; about 19 min on 2 cores)"
	@echo "make test-fast - the unit and in-process tests only (pytest -m 'not slow'; about 4 min on 2 cores)"
	@echo "make bench  - print the benchmark figures (bench/)"
	@echo "make lock   - re-resolve requirements*.lock from requirements*.in (needs uv)"
	@echo "make image  - build the image (IMAGE=..., BASE_IMAGE=..., PIP_CONF=..., DOCKER_BUILD_FLAGS=...)"
	@echo "make mlflow-image - build infra/'s MLflow server image (MLFLOW_IMAGE=..., same options)"

# The lock pins every package; --no-deps installs exactly that set, so nothing backtracks. uv installs it in about
# 20 s where pip takes 3-4 min (torch with its CUDA libraries is 6 GB; measured on the 2-core build machine); pip,
# with the machine's pip configuration, where uv cannot be installed or cannot reach the index.
$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	{ $(BIN)/pip install --quiet uv 2> >(grep -v 'is ignored: it is neither' >&2) \
	  && $(BIN)/uv pip install --python $(BIN)/python --quiet --no-deps -r requirements-dev.lock; } \
	  || $(BIN)/pip install --quiet --no-deps -r requirements-dev.lock 2> >(grep -v 'is ignored: it is neither' >&2)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored: it is neither' >&2)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m alignclip.demo

# pytest-xdist: one worker per CPU (TEST_WORKERS=0 runs in one process); each test file runs whole on one worker,
# so a file's module fixtures (the image build, compiled pipelines, servers) are made once; the files in the order
# tests/conftest.py gives them (the costliest first), not xdist's
TEST_WORKERS ?= auto
PYTEST = $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

# No pipeline, server, image, dvc repro or killed process: the tests marked slow are left to `make test`.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/listing.py
	$(BIN)/python bench/input_pipeline.py
	$(BIN)/python bench/cli_latency.py
	$(BIN)/python bench/portable_kernels.py

lock:
	uv pip compile requirements.in -o requirements.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match $(UV_INDEXES)
	uv pip compile requirements-dev.in -o requirements-dev.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match $(UV_INDEXES)

# The image: BuildKit (RUN --mount). The first docker client that builds with BuildKit: a client with buildx, or
# one with BuildKit built in (docker 20.10-22); a client without either only has the legacy builder.
DOCKER ?= $(firstword $(foreach d,$(shell which -a docker 2>/dev/null),$(shell DOCKER_BUILDKIT=1 $(d) build --help >/dev/null 2>&1 && echo $(d))) docker)
IMAGE ?= ghcr.io/alignclip/alignclip:0.1.0
BASE_IMAGE ?= python:3.11.14-slim-bookworm
# provenance: the commit (marked -dirty when tracked files differ from it)
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)$(shell git diff --quiet HEAD 2>/dev/null || echo -dirty)
# The package index settings of the build machine, as BuildKit secrets (never in a layer): a pip config file
# (index URLs, credentials) and the CA bundle the index needs. Both optional.
PIP_CONF ?=
PIP_CA ?= $(or $(PIP_CERT),$(SSL_CERT_FILE))
BUILD_SECRETS = $(if $(PIP_CONF),--secret id=pip.conf$(,)src=$(PIP_CONF)) $(if $(PIP_CA),--secret id=ca.crt$(,)src=$(PIP_CA))
DOCKER_BUILD_FLAGS ?=
MLFLOW_IMAGE ?= ghcr.io/alignclip/mlflow-server:3.17.2

image:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(DOCKER_BUILD_FLAGS) $(BUILD_SECRETS) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg IMAGE=$(IMAGE) \
	  --build-arg GIT_COMMIT=$(GIT_COMMIT) \
	  -t $(IMAGE) .
	@$(DOCKER) image inspect --format 'built $(IMAGE): {{.Size}} bytes' $(IMAGE)

mlflow-image:
	DOCKER_BUILDKIT=1 $(DOCKER) build $(DOCKER_BUILD_FLAGS) $(BUILD_SECRETS) \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) -f infra/mlflow/Dockerfile -t $(MLFLOW_IMAGE) .
	@$(DOCKER) image inspect --format 'built $(MLFLOW_IMAGE): {{.Size}} bytes' $(MLFLOW_IMAGE)
