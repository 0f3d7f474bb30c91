#!/usr/bin/env bash
# Makes (once) a venv of its own with mergekit 0.1.5 from PyPI, for benchmarks/llm_merge.py: its
# pins (transformers, pydantic, ...) are not ours, so it never goes in our venv. The CPU torch
# wheel goes in first, as in ours, or pip would pull the CUDA build.
# Prints the venv's bin folder. Usage: BIN=$(benchmarks/mergekit-venv.sh)
set -eu
V=${FUSION_BENCH_MERGEKIT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fusion-bench-mergekit/venv}
if [ ! -x "$V/bin/mergekit-yaml" ]; then
  python3 -m venv "$V" >&2
  c=$(mktemp); printf "torch==2.13.0\n" > "$c"
  "$V/bin/pip" install -q torch==2.13.0 >&2
  "$V/bin/pip" install -q -c "$c" mergekit==0.1.5 >&2
  rm -f "$c"
fi
echo "$V/bin"
