#!/usr/bin/env bash
# The one prepared device call of a GPU session (issues 12 and 13), from the repository root:
#   1. every Triton test compiled on the GPU (TRITON_INTERPRET=0): scan, unpack, encode, KV attention
#      (not the CPU-side tools: the sm_90 compile checks and the launch-overhead timer);
#   2. benchmarks/bench_gpu.py at issue 12's sizes, with its tiling sweep;
#   3. benchmarks/bench_kv_gpu.py at issue 13's sizes;
#   4. benchmarks/gpu_profile.py: kernel times inside one decode step and one index search;
#   5. the rest of the suite (not marked triton: part 1 ran those compiled, and the interpreter of
#      the machine's triton 3.6 is older than the triton>=3.8 the project supports for it).
# Each part has its own time limit (585 s in all; about 4 minutes used on an H200 in 2026-12, before the int8 sweep), so a part that hangs costs only its
# own share; logs and results go under $OUT (the device tool's folder: at most 8 files come back)
# or results/gpu_session.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine (device tool: run, timeout_s=590)
set -uo pipefail
out=${OUT:-results/gpu_session}
mkdir -p "$out/bench"
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
began=$SECONDS
stamp() { echo "[$((SECONDS - began)) s] $*"; }

# the fast-scan extension for part 4, built while the GPU parts run
(python3 setup.py -q build_ext --inplace -j 3 >"$out/suite.log" 2>&1) &
build=$!

stamp "1. Triton tests on the GPU" | tee "$out/tests.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$out/tests.log"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" | tee -a "$out/tests.log"
TRITON_INTERPRET=0 timeout 100 python3 -m pytest -q -m triton -k "not compile and not launch_overhead" -n 8 -p no:cacheprovider tests/ >>"$out/tests.log" 2>&1
echo "tests exit: $?" >>"$out/tests.log"
tail -n 25 "$out/tests.log"

stamp "2. bench_gpu.py"
TRITON_INTERPRET=0 timeout 240 python3 benchmarks/bench_gpu.py --out "$out/bench" >"$out/bench.log" 2>&1
echo "bench exit: $?" | tee -a "$out/bench.log"

stamp "3. bench_kv_gpu.py"
TRITON_INTERPRET=0 timeout 130 python3 benchmarks/bench_kv_gpu.py --json "$out/kv.json" >"$out/kv.log" 2>&1
echo "kv exit: $?" | tee -a "$out/kv.log"

stamp "4. gpu_profile.py"
TRITON_INTERPRET=0 timeout 50 python3 benchmarks/gpu_profile.py >"$out/profile.log" 2>&1
echo "profile exit: $?" | tee -a "$out/profile.log"

stamp "5. the rest of the suite"
wait "$build"
echo "extension build exit: $?" >>"$out/suite.log"
env -u TRITON_INTERPRET timeout 65 python3 -m pytest -q -m "not triton" -n 14 -p no:cacheprovider tests/ >>"$out/suite.log" 2>&1
echo "suite exit: $?" >>"$out/suite.log"

stamp "done"
grep -E "passed|failed|error" "$out/tests.log" | tail -n 3
tail -n 4 "$out/suite.log"
cat "$out/bench/results.md" 2>/dev/null || tail -n 40 "$out/bench.log"
sed -n '/^Attention per decode step/,$p' "$out/kv.log" | head -n 60
