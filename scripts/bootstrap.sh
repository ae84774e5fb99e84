#!/usr/bin/env bash
# Create ./.venv if needed and install tqindex into it with the given extras.
# Torch: a torch that is already importable is reused (the venv sees system packages);
# otherwise a GPU machine gets the default (CUDA) build and a CPU-only machine gets the
# CPU build pinned below, never a multi-GB CUDA build it cannot use.
set -euo pipefail
extras=${1:?usage: bootstrap.sh EXTRAS}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
cpu_torch="torch==2.13.0"

if [ ! -x .venv/bin/python ]; then
  if "$python" -c "import torch" >/dev/null 2>&1; then
    "$python" -m venv --system-site-packages .venv
  else
    "$python" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" "$cpu_torch"
  fi
fi
"${pip[@]}" -e ".[$extras]"
