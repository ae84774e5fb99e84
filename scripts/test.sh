#!/usr/bin/env bash
# Set up .venv (with the dev extras) and run the test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
exec .venv/bin/python -m pytest -q "$@"
