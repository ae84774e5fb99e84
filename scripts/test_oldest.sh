#!/usr/bin/env bash
# The suite on the oldest supported Python and dependency versions (.ci/oldest-constraints.txt),
# in ./.venv-oldest. PyPI has no CPU-only torch, so this installs the default torch wheel with its
# CUDA libraries (about 2.5 GB, downloaded once); the tests run on the CPU all the same.
set -euo pipefail
cd "$(dirname "$0")/.."
python=""
for candidate in "${PYTHON_OLDEST:-}" python3.10 "$(pyenv root 2>/dev/null)/versions/3.10.13/bin/python"; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
    python=$candidate
    break
  fi
done
if [ -z "$python" ]; then
  echo "test_oldest.sh: no Python 3.10 found (set PYTHON_OLDEST)" >&2
  exit 1
fi
constraints=.ci/oldest-constraints.txt
if [ ! -x .venv-oldest/bin/python ] || ! cmp -s "$constraints" .venv-oldest/constraints.txt; then
  rm -rf .venv-oldest
  "$python" -m venv .venv-oldest
  # (the sed drops pip's notes on this machine's local package folders; pipefail keeps pip's status)
  .venv-oldest/bin/python -m pip install --disable-pip-version-check -q -c "$constraints" -e ".[datasets,corpus,kv]" pytest 2>&1 |
    sed '/is ignored: it is neither a file nor a directory/d'
  cp "$constraints" .venv-oldest/constraints.txt
fi
.venv-oldest/bin/python -c 'import sys, numpy, torch, numba, transformers, triton; print("oldest environment: Python", sys.version.split()[0], "numpy", numpy.__version__, "torch", torch.__version__, "numba", numba.__version__, "transformers", transformers.__version__, "triton", triton.__version__)'
# Not the Triton kernels: torch 2.5 pins triton 3.1, below the triton extra's floor (3.8: the
# interpreters of triton 3.1-3.6 fail on them); they run in the main environment (scripts/test.sh).
exec .venv-oldest/bin/python -m pytest -q -p no:cacheprovider -m "not triton" "$@"
