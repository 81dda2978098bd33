"""Time one training step of plain SGD vs SGD+BNP, measured in the same process.

    python benchmarks/bench_step.py [--device cpu|cuda] [--batch-sizes 1 128] [--seconds 2]

For each model and batch size it alternates short blocks of plain and BNP steps (so machine noise
hits both alike), reports the median time per step of each and the ratio BNP / plain.
"""

import argparse
import platform
import statistics
import time

import torch
from torch.nn import functional as F

from bnp import BNP
from bnp.models import CNN, MLP

MODELS = {
    "mlp 784-256-256-256-10": (lambda: MLP(784, 10, depth=3, width=256), (784,)),
    "cnn 32-32-64-64 on 1x28x28": (lambda: CNN(1, 10, channels=(32, 64)), (1, 28, 28)),
}


def make_step(model, use_bnp, batch_size, device, shape):
    data = torch.randn(1024, *shape, device=device) * 3 + 1
    labels = torch.randint(0, 10, (1024,), device=device)
    pre = BNP(model) if use_bnp else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    position = [0]

    def step():
        i = position[0]
        position[0] = (i + batch_size) % (1024 - batch_size)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(data[i : i + batch_size]), labels[i : i + batch_size]).backward()
        if pre is not None:
            pre.step()
        opt.step()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(step, n, device):
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def compare(build, shape, batch_size, device, seconds):
    steps = {}
    for use_bnp in (False, True):
        torch.manual_seed(0)
        steps[use_bnp] = make_step(build().to(device), use_bnp, batch_size, device, shape)
        for _ in range(20):
            steps[use_bnp]()
    block = max(5, int(0.05 / time_block(steps[False], 10, device)))  # ~50 ms blocks
    times = {False: [], True: []}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times[True]) < 5:
        for use_bnp in (False, True):
            times[use_bnp].append(time_block(steps[use_bnp], block, device))
    return statistics.median(times[False]), statistics.median(times[True])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per comparison")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} threads")
    print(f"{'model':30} {'batch':>5} {'plain ms/step':>14} {'bnp ms/step':>12} {'bnp/plain':>10}")
    for model_name, (build, shape) in MODELS.items():
        for batch_size in args.batch_sizes:
            plain, bnp = compare(build, shape, batch_size, device, args.seconds)
            print(f"{model_name:30} {batch_size:5d} {plain * 1e3:14.3f} {bnp * 1e3:12.3f} {bnp / plain:10.2f}", flush=True)


if __name__ == "__main__":
    main()
