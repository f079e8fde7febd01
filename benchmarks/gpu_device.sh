#!/usr/bin/env bash
# On a lent GPU machine (the device tool; its image has numba, numba-cuda and
# torch): the CUDA tests for real, then the GPU benchmark, results under $OUT.
#   run: bash benchmarks/gpu_device.sh     (timeout_s ~540)
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/numlstm-gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 240 python3 -m pytest -q -x tests/test_cuda_kernels.py tests/test_device.py \
    2>&1 | tee "$OUT/tests.log"
timeout 280 python3 -m benchmarks.gpu --out "$OUT" 2>&1 | tee "$OUT/bench.log"
