# The two set-up commands of the README:
#   make repro   create .venv, install, run the whole pipeline (dvc repro) on the phantom data
#   make test    create .venv if missing, install with test extras, run pytest
# Other targets: make plan PLAN=paper, make lint-params, make clean-outputs.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mammodp-installed
PYTEST_ARGS ?=
# What a --no-build-isolation build (pyradiomics) needs in the venv (tests/test_install.py).
BUILD_TOOLS := 'setuptools>=70.1' 'wheel>=0.43'
# Stage commands in dvc.yaml call `mammodp`, `mlflow` from the venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: repro test install plan data clean-outputs lint-params gpu-check gpu-wheels server postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the dependency list changes. pyradiomics 3.0.1 (for FRD) must be built
# against the installed numpy without build isolation: PyPI's 3.1.0 does not install.
$(STAMP): pyproject.toml | $(BIN)/python
	# Build tools first: a fresh Python 3.11 venv has setuptools 65 and no `wheel`, and a
	# --no-build-isolation build uses exactly what the venv holds (bdist_wheel is missing).
	$(BIN)/pip install $(BUILD_TOOLS) 'numpy==2.4.6'  # numpy: same pin as pyproject
	$(BIN)/pip install --no-build-isolation 'pyradiomics==3.0.1'
	$(BIN)/pip install -e '.[test,frd]'
	touch $(STAMP)

install: $(STAMP)

# data/raw is versioned by data.dvc. With no raw data present, the deterministic phantom is
# written there (byte-identical to the committed data.dvc); real data brought by the user is
# left alone. `dvc commit` then records whatever data/raw holds (a no-op when unchanged).
data: $(STAMP)
	$(BIN)/mammodp phantom --out data/raw --if-missing
	$(BIN)/dvc commit --force --quiet data.dvc

# `mammodp preload`: the stages run as forks of one process that imported torch, timm and
# MLflow once (README, "Set-up"), instead of 27 stage processes importing them again.
repro: data
	$(BIN)/mammodp preload -- $(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# The shared tracking server (README, "From one machine to a cluster"): PostgreSQL (Debian's
# server, `make postgres` installs it) as MLflow's backend store, artifacts proxied into
# .mlflow-server/artifacts. Clients: export MLFLOW_TRACKING_URI=http://HOST:5000.
SERVER_ARGS ?=
server: $(STAMP)
	$(BIN)/mammodp server --root .mlflow-server $(SERVER_ARGS)

postgres:
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)

# Every params file loads strictly: all keys present, known, well typed and in range.
lint-params: $(STAMP)
	$(BIN)/mammodp lint-params params.yaml pipelines/*.yaml

# GPU check (bench/gpu_check.sh) on a bare GPU machine with Python 3.12: carry these wheels.
GPU_PY ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl opacus==1.6.0 pydicom==3.0.2 timm==1.0.31  # timm: the pinned Swin code

gpu-check:
	bash bench/gpu_check.sh

# Switch the experiment plan: copies pipelines/$(PLAN).yaml over params.yaml.
plan:
	@test -n "$(PLAN)" || (echo "usage: make plan PLAN=demo|paper|gpu" && exit 1)
	cp pipelines/$(PLAN).yaml params.yaml
	@echo "params.yaml now holds the '$(PLAN)' plan; run: make repro"

clean-outputs:
	rm -rf data/prepared data/synthetic models metrics plots reports
