"""Where BNP's time goes in a small step: the MLP at batch size 1 (or --batch-size), CPU by default.

    python benchmarks/bench_overhead.py --out results/bench                   # batch size 1
    python benchmarks/bench_overhead.py --batch-size 128 --out results/bench

Compared in one process, in alternating blocks, each as a ratio to plain SGD:
  function  every Linear as a bare Python ``torch.autograd.Function`` with the native backward
            math: the floor for any method whose backward runs Python code per layer;
  bnp       BNP(fast=True), whose Linear backward is such a Function;
  bnp-ref   the reference path (native backward, then .grad rewritten by step()).
It also counts the compute kernels (aten ops, views excluded) of one step, which is what a
whole-step CUDA graph replays.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from bench_step import Setup, machine, report, time_block
from bnp.kernels import count_kernels


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.mm(weight) if ctx.needs_input_grad[0] else None  # as native autograd does
        return grad_x, grad_out.t().mm(x), grad_out.sum(0)


class _FunctionForward:
    def __init__(self, module: nn.Linear):
        self.module = module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _Linear.apply(x, self.module.weight, self.module.bias)


def build(variant: str, batch: int, device: torch.device) -> Setup:
    setup = Setup("mlp", "none" if variant == "function" else variant, batch, device)
    if variant == "function":
        for module in setup.model.modules():
            if isinstance(module, nn.Linear):
                module.forward = _FunctionForward(module)
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=60, help="alternating blocks of ~50 ms per variant")
    parser.add_argument("--out", type=Path, help="write <out>/overhead-<device>-b<batch size>.md")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the runner: denormal floats are 100x slower on CPUs
    device = torch.device(args.device)
    variants = ["none", "function", "bnp", "bnp-ref"]
    setups = {v: build(v, args.batch_size, device) for v in variants}
    kernels = {}
    for variant, setup in setups.items():
        for _ in range(10):
            setup.step()
        kernels[variant] = count_kernels(setup.step)
    block = max(3, int(0.05 / time_block(setups["none"].step, 10, device)))
    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant, setup in setups.items():
            times[variant].append(time_block(setup.step, block, device))
    plain = statistics.median(times["none"])
    rows = [{"variant": v, "ms": statistics.median(times[v]) * 1e3, "ratio": statistics.median(times[v]) / plain,
             "kernels": kernels[v], "kernel_ratio": kernels[v] / kernels["none"]} for v in variants]
    table = pd.DataFrame(rows).round(4)
    command = (f"python benchmarks/bench_overhead.py --device {args.device} --batch-size {args.batch_size} "
               f"--rounds {args.rounds} --out {args.out}")
    report(table, f"MLP 784-256-256-256-10, batch {args.batch_size}, {machine(device)}", command, args.out,
           f"overhead-{device.type}-b{args.batch_size}.md")


if __name__ == "__main__":
    main()
