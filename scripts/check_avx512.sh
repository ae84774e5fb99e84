#!/usr/bin/env bash
# Run the fast-scan tests against its AVX-512 path on a CPU without AVX-512: the same sources
# built with SIMDe (Debian package libsimde-dev), which implements each AVX-512 intrinsic in
# portable code. Checks the AVX-512 logic (lanes, two-block steps, odd block counts), not its speed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  echo "SIMDe headers not found: apt-get install libsimde-dev" >&2
  exit 2
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
suffix=$("$python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
g++ -O2 -std=c++17 -shared -fPIC -mavx2 -mfma -mbmi2 -ffp-contract=off -DTQ_SIMDE -DTQ_ISA_AVX512 \
  -DTQ_MODULE_NAME=_fastscan_avx512_simde $("$python" -m pybind11 --includes) \
  tqindex/kernels/csrc/fastscan_avx512.cpp -o "$out/_fastscan_avx512_simde$suffix"
PYTHONPATH="$out${PYTHONPATH:+:$PYTHONPATH}" TQINDEX_TEST_FASTSCAN_MODULE=_fastscan_avx512_simde \
  "$python" -m pytest -q -p no:cacheprovider tests/test_fastscan.py -k "avx512_simde" "$@"
