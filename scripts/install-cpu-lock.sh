#!/usr/bin/env bash
# Installs requirements/cpu.lock.txt (the CPU test set, hashes checked) into the venv of PYTHON:
#
#   scripts/install-cpu-lock.sh .venv/bin/python
#
# torch 2.13.0's CPU build is not on PyPI (PyPI's torch 2.13.0 is the CUDA build: GBs of nvidia-* wheels that a
# CPU job never uses), so the lock names it explicitly, 2.13.0+cpu with its sha256, and it is installed first:
# from a local wheelhouse where pip's configuration has one (--no-index: pip's find-links, e.g. a machine's
# /opt/wheels), otherwise from PyTorch's CPU index, asked for torch alone. Then the rest from PyPI; torch is
# already satisfied. The hashes are the lock's either way, so a different file fails instead of installing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: scripts/install-cpu-lock.sh PYTHON}
LOCK=requirements/cpu.lock.txt
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

torch_lock=$(mktemp)
trap 'rm -f "$torch_lock"' EXIT
# The torch entry: its line and the hash lines that continue it.
awk '/^torch==/ {keep = 1} keep {print; if (!/\\$/) exit}' "$LOCK" > "$torch_lock"
grep -q '^torch==.*+cpu' "$torch_lock" || { echo "$LOCK: no torch==...+cpu entry" >&2; exit 1; }

if ! "$PY" -m pip install -q --no-deps --require-hashes --no-index -r "$torch_lock" 2>/dev/null; then
    echo "torch's CPU build is in no local wheelhouse: from $TORCH_CPU_INDEX" >&2
    "$PY" -m pip install -q --no-deps --require-hashes --index-url "$TORCH_CPU_INDEX" -r "$torch_lock"
fi
"$PY" -m pip install -q --require-hashes -r "$LOCK"
