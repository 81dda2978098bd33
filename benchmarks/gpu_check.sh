#!/usr/bin/env bash
# The prepared GPU check, for one call on a lent GPU machine: the library's tests (CUDA path
# included), the step-time matrix on CUDA, and batch-size-1 speed with whole-step CUDA graphs. Needs only torch, numpy, pandas, tabulate and pytest
# (no Hydra / OmegaConf / W&B), so it runs on a bare GPU image:
#     OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/bench}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_precondition.py tests/test_fast_path.py tests/test_hessian.py tests/test_kernels.py 2>&1 | tail -3 | tee -a "$out/gpu.txt"
python3 benchmarks/bench_step.py --device cuda --seconds 2 --out "$out" 2>&1 | tee "$out/bench_cuda.log"
python3 benchmarks/bench_overhead.py --device cuda --rounds 20 --out "$out" 2>&1 | tee -a "$out/bench_cuda.log"
python3 benchmarks/bench_graph.py --steps 5000 --out "$out" 2>&1 | tee "$out/bench_graph.log"
