"""Training-step speed of each normalization, as a ratio to plain un-normalized SGD.

    python benchmarks/bench_step.py                       # full matrix on the default device
    python benchmarks/bench_step.py --models mlp --norms bnp --batch-sizes 1 --seconds 5
    python benchmarks/bench_step.py --out results/bench   # also write <out>/<device>.{md,csv}

A step is: slice a batch from an on-device dataset, forward, cross-entropy, backward, (BNP step),
SGD step. Norm bnp is BNP(fast=True), as the runner uses it; bnp-ref the reference path that
rewrites .grad after backward. For every (model, batch size, norm) it alternates short blocks of
the plain step and the normalized step in the same process (machine noise hits both alike) and
reports the median time per step of each, steps/s, samples/s, the ratio norm / plain, and memory:
peak CUDA memory on GPU, the bytes of parameters + gradients + normalization state on CPU (BNP's
own state in brackets).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from torch.nn import functional as F

from bnp import BNP
from bnp.models import CNN, MLP, CifarResNet

MODELS = {
    "mlp": ("MLP 784-256-256-256-10", lambda norm: MLP(784, 10, depth=3, width=256, norm=norm), (784,)),
    "cnn": ("CNN 32-32-64-64, 1x28x28", lambda norm: CNN(1, 10, channels=(32, 64), norm=norm), (1, 28, 28)),
    "resnet20": ("ResNet-20, 3x32x32", lambda norm: CifarResNet(20, 3, 10, norm), (3, 32, 32)),
}


class Setup:
    """One model + optimizer (+ BNP) with a step function over an on-device dataset."""

    def __init__(self, model_key: str, norm: str, batch_size: int, device: torch.device):
        torch.manual_seed(0)
        _, build, shape = MODELS[model_key]
        self.model = build("bnp" if norm == "bnp-ref" else norm).to(device).train()
        # bnp: the runner's BNP(fast=True); bnp-ref: the reference path that rewrites .grad after backward
        self.pre = BNP(self.model, fast=norm == "bnp") if norm in ("bnp", "bnp-ref") else None
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.data(shape, batch_size, device)

    def data(self, shape: tuple[int, ...], batch_size: int, device: torch.device) -> None:
        """An on-device dataset of badly scaled inputs that step() slices batch after batch."""
        n = 2048 if batch_size < 128 else 8 * batch_size
        self.x = torch.randn(n, *shape, device=device) * 3 + 1
        self.y = torch.randint(0, 10, (n,), device=device)
        self.batch_size, self.position, self.n = batch_size, 0, n

    def step(self) -> None:
        i = self.position
        self.position = (i + self.batch_size) % (self.n - self.batch_size)
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x[i : i + self.batch_size]), self.y[i : i + self.batch_size]).backward()
        if self.pre is not None:
            self.pre.step()
        self.opt.step()

    def state_bytes(self) -> tuple[int, int]:
        params = sum(p.numel() * p.element_size() * 2 for p in self.model.parameters())  # + grads
        buffers = sum(b.numel() * b.element_size() for b in self.model.buffers())
        bnp = sum(t.numel() * t.element_size() for t in (self.pre.running.mean, self.pre.running.var)) if self.pre else 0
        return params + buffers + bnp, bnp


def machine(device: torch.device) -> str:
    """The device's name and the host: CPU model, cores, torch threads, torch and Python versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = models[0] if models else cpu
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return (f"device {device} ({name}), host CPU {cpu} x {os.cpu_count()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")


def report(table: pd.DataFrame, header: str, command: str, out: Path | None, name: str) -> None:
    """Print a benchmark's table; with ``out``, also write it to <out>/<name> with its command."""
    print(header)
    print(table.to_string(index=False))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"{header}\n\ncommand: `{command}`\n\n{table.to_markdown(index=False)}\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(step, n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def alternate(steps: dict, device: torch.device, seconds: float) -> dict[str, float]:
    """Median seconds per step of each step function, timed in alternating ~50 ms blocks (the first
    one sets the block length) so that machine noise hits all alike."""
    for step in steps.values():
        for _ in range(10):
            step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block = max(3, int(0.05 / time_block(next(iter(steps.values())), 3, device)))
    times = {k: [] for k in steps}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 5:
        for key, step in steps.items():
            times[key].append(time_block(step, block, device))
    return {k: statistics.median(t) for k, t in times.items()}


def compare(model_key: str, norm: str, batch_size: int, device: torch.device, seconds: float) -> dict:
    setups = {"plain": Setup(model_key, "none", batch_size, device), norm: Setup(model_key, norm, batch_size, device)}
    medians = alternate({k: s.step for k, s in setups.items()}, device, seconds)
    plain, normed = medians["plain"], medians[norm]
    total, bnp_bytes = setups[norm].state_bytes()
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else total) / 2**20
    return {"model": MODELS[model_key][0], "batch": batch_size, "norm": norm, "plain_ms": plain * 1e3,
            "norm_ms": normed * 1e3, "ratio": normed / plain, "steps_per_s": 1 / normed,
            "samples_per_s": batch_size / normed, "memory_MiB": memory, "bnp_state_KiB": bnp_bytes / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--norms", nargs="+", default=["bnp", "bnp-ref", "bn", "ln"],
                        choices=["bnp", "bnp-ref", "bn", "ln", "gn"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per comparison")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); files get a -<N>t suffix")
    parser.add_argument("--out", type=Path, help="write <out>/<device>.md and .csv")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the runner: denormal floats are 100x slower on CPUs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    header = machine(device)
    print("#", header)
    rows = []
    for model_key in args.models:
        for batch_size in args.batch_sizes:
            for norm in args.norms:
                if norm == "bn" and batch_size == 1 and model_key == "mlp":
                    continue  # BatchNorm1d cannot train on one sample
                row = compare(model_key, norm, batch_size, device, args.seconds)
                rows.append(row)
                print(f"{row['model']:26} batch {batch_size:4d} {norm:7}: plain {row['plain_ms']:8.3f} ms, "
                      f"{norm:7} {row['norm_ms']:8.3f} ms, ratio {row['ratio']:5.2f}, "
                      f"{row['samples_per_s']:9.0f} samples/s, {row['memory_MiB']:7.1f} MiB", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table = pd.DataFrame(rows)
        stem = args.out / (device.type + (f"-{args.threads}t" if args.threads else ""))
        table.to_csv(stem.with_suffix(".csv"), index=False)
        memory_note = "peak CUDA memory" if device.type == "cuda" else "params + grads + buffers + BNP state"
        stem.with_suffix(".md").write_text(
            f"{header}\n\ncommand: `python benchmarks/bench_step.py --device {args.device} --seconds {args.seconds} "
            f"{f'--threads {args.threads} ' if args.threads else ''}--out {args.out}`; memory_MiB: {memory_note}\n\n" + table.round(4).to_markdown(index=False) + "\n")


if __name__ == "__main__":
    main()
