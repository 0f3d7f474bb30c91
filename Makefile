# fusion_bench: `make run` sets up and runs the main job, `make test` sets up and runs the tests.
# Both create .venv on first use. torch is pinned to the CPU wheel found locally (an unpinned torch
# pulls gigabytes of CUDA packages); constraints.txt keeps every later install on it.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup run test benchmark

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

run: setup
	$(BIN)/fusion_bench

test: setup
	TQDM_DISABLE=1 $(BIN)/python -m pytest

benchmark: setup
	$(BIN)/python benchmarks/merge_memory.py
