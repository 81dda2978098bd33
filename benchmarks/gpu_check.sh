#!/usr/bin/env bash
# The prepared GPU check, for one call on a lent GPU machine: the library's tests (CUDA path
# included), the step-time matrix on CUDA, and batch-size-1 speed with whole-step CUDA graphs.
# Needs only torch, numpy, pandas, tabulate and pytest, so it runs on a bare GPU image; where the
# runner's packages (hydra-core and omegaconf; wandb is not needed) are importable too, carried as
# wheels, it also runs the runner's CUDA-graph test and times the runner at batch size 1, eager
# and with train.cuda_graph=true (summary.json under $out/runner-graph-*/):
#     OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/bench}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
tests="tests/test_precondition.py tests/test_fast_path.py tests/test_hessian.py tests/test_kernels.py"
# the runner's CUDA-graph test needs hydra-core and omegaconf (wandb only for logger=wandb): carried as wheels
python3 -c "import hydra, omegaconf" 2>/dev/null && tests="$tests tests/test_cuda_graph.py" || echo "runner packages missing: tests/test_cuda_graph.py not run" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -3 | tee -a "$out/gpu.txt"
python3 benchmarks/bench_step.py --device cuda --seconds 2 --out "$out" 2>&1 | tee "$out/bench_cuda.log"
python3 benchmarks/bench_overhead.py --device cuda --rounds 20 --out "$out" 2>&1 | tee -a "$out/bench_cuda.log"
python3 benchmarks/bench_graph.py --steps 5000 --out "$out" 2>&1 | tee "$out/bench_graph.log"
if python3 -c "import hydra, omegaconf" 2>/dev/null; then
  for graph in false true; do  # the MLP 784-256x3-10 with BNP, online, on 784-feature synthetic data
    python3 -m bnp.train data=synthetic data.samples=70000 'data.shape=[1,28,28]' data.classes=10 model=mlp \
      model.depth=3 model.width=256 norm=bnp train.batch_size=1 train.steps=20000 train.log_every=5000 \
      optim.lr=0.001 train.device=cuda train.cuda_graph=$graph logger=none out_root="$out/runner-graph-$graph" 2>&1 | tail -2
    grep -ho '"samples_per_s": [0-9.]*' "$out"/runner-graph-$graph/runs/*/summary.json | sed "s/^/cuda_graph=$graph /"
  done 2>&1 | tee "$out/runner.log"
fi
