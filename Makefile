# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv from the lock file if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# extra package indexes of this workplace (local wheel mirrors); empty elsewhere
UV_INDEXES ?= $(foreach i,$(wildcard /opt/pypi-more/simple /opt/pypi/simple),--extra-index-url file://$(i))
export HF_HUB_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test bench lock clean-demo help

help:
	@echo "make demo   - set up .venv and run the pipeline (dvc repro) on the embedded RotatedDigits"
	@echo "make test   - set up .venv and run the test suite"
	@echo "make bench  - print the benchmark figures (bench/)"
	@echo "make lock   - re-resolve requirements*.lock from requirements*.in (needs uv)"

# The lock pins every package; --no-deps installs exactly that set, so pip never backtracks.
$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements-dev.lock 2> >(grep -v 'is ignored: it is neither' >&2)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . 2> >(grep -v 'is ignored: it is neither' >&2)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m alignclip.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/listing.py
	$(BIN)/python bench/input_pipeline.py

lock:
	uv pip compile requirements.in -o requirements.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match $(UV_INDEXES)
	uv pip compile requirements-dev.in -o requirements-dev.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match $(UV_INDEXES)
