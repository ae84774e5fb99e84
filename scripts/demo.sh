#!/usr/bin/env bash
# Set up .venv (with the benchmark extras) and run the main job: build an index on a
# generated dataset, search it, print recall against exact search and FAISS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh bench,datasets
exec .venv/bin/python -m tqindex.demo "$@"
