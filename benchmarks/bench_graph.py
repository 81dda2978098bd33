"""Batch-size-1 training speed on a GPU: eager PyTorch vs a whole-step CUDA graph, plain SGD vs BNP.

    python benchmarks/bench_graph.py                 # needs CUDA; MLP 784-256-256-256-10, batch 1
    python benchmarks/bench_graph.py --steps 20000 --batch-size 8 --out results/bench

A step takes its batch from a dataset that lives on the GPU (the position is a device tensor
that the step advances itself, so a replayed graph walks through the data with no host work),
then runs forward, cross-entropy, backward, (BNP step,) and the SGD step. At batch size 1 an
eager step is bound by CPU overhead (kernel launches, Python); a CUDA graph replays all of the
step's kernels with one launch. Before timing, the captured BNP step is checked against the eager
one: both train copies of the same model on the same samples and must agree to float tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import pandas as pd
import torch
from torch.nn import functional as F

from bench_step import machine
from bnp import BNP
from bnp.models import MLP

DATASET = 60_000


class Run:
    """A model, its optimizer, optionally BNP, and a step reading the on-device dataset."""

    def __init__(self, model: torch.nn.Module, norm: str, data: tuple[torch.Tensor, torch.Tensor], batch: int):
        self.model = model
        self.pre = BNP(model, fast=norm == "bnp") if norm in ("bnp", "bnp-ref") else None
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True)
        self.x, self.y = data
        device = self.x.device
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(batch, device=device)
        self.batch = batch
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self) -> None:
        index = self.position + self.offsets
        x, y = self.x.index_select(0, index), self.y.index_select(0, index)
        self.position.add_(self.batch).remainder_(len(self.x) - self.batch)  # stays on the device
        self.opt.zero_grad(set_to_none=False)
        F.cross_entropy(self.model(x), y).backward()
        if self.pre is not None:
            self.pre.step()
        self.opt.step()

    def capture(self, warmup: int = 20) -> None:
        """Warm up on a side stream (allocations, BNP's first batch), then capture one step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self.pre.recording() if self.pre else contextlib.nullcontext():
            self.step()  # recorded, not run: its Python bookkeeping ran, its kernels did not

    def replay(self) -> None:
        self.graph.replay()
        if self.pre is not None:
            self.pre.replayed()  # a replay runs kernels only: keep BNP's step and batch counts in line


def build(width: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(784, 10, depth=3, width=width, norm="none").to(device).train()


def steps_per_second(step, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def check_graph_matches_eager(data, batch: int, width: int, device: torch.device, steps: int = 200) -> float:
    """Largest parameter difference between eager BNP and graph-replayed BNP after the same steps."""
    eager, graphed = Run(build(width, device), "bnp", data, batch), Run(build(width, device), "bnp", data, batch)
    graphed.capture(warmup=20)
    for _ in range(20):
        eager.step()
    for _ in range(steps):
        eager.step()
        graphed.replay()
    torch.cuda.synchronize()
    return max((a - b).abs().max().item() for a, b in zip(eager.model.parameters(), graphed.model.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000, help="timed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--out", type=Path, help="write <out>/cuda-graph.md and .csv")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the runner: denormal floats are 100x slower on CPUs
    if not torch.cuda.is_available():
        raise SystemExit("bench_graph.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.device("cuda")
    data = (torch.rand(DATASET, 784, device=device), torch.randint(0, 10, (DATASET,), device=device))
    header = f"MLP 784-{args.width}x3-10, batch {args.batch_size}, {machine(device)}"
    print("#", header, flush=True)
    diff = check_graph_matches_eager(data, args.batch_size, args.width, device)
    print(f"graph vs eager BNP after 220 steps: max |param difference| = {diff:.3g}", flush=True)

    rows = []
    for norm in ("none", "bnp", "bnp-ref"):
        for mode in ("eager", "graph"):
            run = Run(build(args.width, device), norm, data, args.batch_size)
            if mode == "graph":
                run.capture()
                rate = steps_per_second(run.replay, args.steps)
            else:
                for _ in range(20):
                    run.step()
                rate = steps_per_second(run.step, min(args.steps, 2000))
            rows.append({"norm": norm, "mode": mode, "steps_per_s": rate, "samples_per_s": rate * args.batch_size})
            print(f"{norm:8} {mode:6} {rate:10.0f} steps/s", flush=True)
    table = pd.DataFrame(rows)
    plain = table[table.norm == "none"].set_index("mode").steps_per_s
    table["time_vs_plain"] = [plain[m] / r for m, r in zip(table["mode"], table.steps_per_s)]
    print(table.round(3).to_string(index=False))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "cuda-graph.csv", index=False)
        (args.out / "cuda-graph.md").write_text(
            f"{header}\n\ncommand: `python benchmarks/bench_graph.py --steps {args.steps} --batch-size "
            f"{args.batch_size} --out {args.out}`; graph vs eager BNP max |param difference| after 220 steps: "
            f"{diff:.3g}\n\n" + table.round(3).to_markdown(index=False) + "\n")


if __name__ == "__main__":
    main()
