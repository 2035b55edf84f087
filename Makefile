# funnelrank: set-up and the two everyday commands.
#   make demo   set everything up and run the nightly demo on synthetic data
#   make test   set everything up, lint, and run the test suite
#   make lint   ruff: lint rules and formatting
# Everything installs into a project-local virtualenv (.venv) from constraints.txt,
# the set of versions seen working together; a fresh machine gets the same set.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo.toml
PIP    := $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt
# this machine's pip config lists local wheel folders, some absent: drop that noise
QUIET  := 2>&1 | { grep -v 'is ignored: it is neither' || true; }

.PHONY: venv demo lint test clean

venv: $(VENV)/.installed

# torchrec depends on the CUDA `fbgemm-gpu`; on CPU its kernels come from
# `fbgemm-gpu-cpu`, and the two cannot share one site-packages. An empty placeholder
# named fbgemm-gpu (third_party/) is installed first so pip never pulls the CUDA one.
# torch is pinned (==2.13.0): an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt third_party/fbgemm-gpu-placeholder/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) ./third_party/fbgemm-gpu-placeholder $(QUIET)
	$(PIP) -e '.[dev]' fbgemm-gpu-cpu $(QUIET)
	$(BIN)/pip check
	touch $@

demo: venv
	$(BIN)/funnelrank demo --config $(CONFIG)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) state
