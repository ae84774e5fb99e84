#!/usr/bin/env bash
# The one prepared device call for a GPU session (issue 12): the Triton tests on the GPU, then
# benchmarks/bench_gpu.py at the sizes. Runs from the repository root; writes under $OUT
# (the device tool's folder) or results/gpu_session. Budget: tests <= 150 s, bench <= 330 s, so the
# whole call stays under 8 minutes even when both hit their limits.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine (device tool: run, timeout_s=540)
set -uo pipefail
out=${OUT:-results/gpu_session}
mkdir -p "$out"
export PYTHONPATH=$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)" | tee -a "$out/gpu.txt"

# 1. correctness on the GPU: every test marked triton (unpack, scan, encode, KV attention, index
#    search through the GPU path); the sm_90 compile check is for CPU-only CI and is left out here
timeout 150 python3 -m pytest -q -m triton -k "not compile" -p no:cacheprovider tests/ 2>&1 | tee "$out/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$out/tests.log"

# 2. the benchmark: 10M x 768 at 2 and 4 bits, batches 1/32/1024, both kernel forms at 1-16
#    queries, fp16 brute force and copy bandwidth as ceilings, 1M-row index end to end, encode
timeout 330 python3 benchmarks/bench_gpu.py --out "$out/bench" 2>&1 | tee "$out/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"
