"""Batch moments for BNP's fold: torch.var_mean (one pass) vs two plain passes (mean, then the mean
squared deviation), on the shapes the fold sees. Both are timed in alternating blocks in one process.

    python benchmarks/bench_moments.py [--device cpu] [--threads 1] [--out results/bench]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

SHAPES = {  # (shape, pooled dims)
    "MLP inputs, batch 1 (1 x 1552)": ((1, 1552), (0,)),
    "MLP inputs, batch 128 (128 x 1552)": ((128, 1552), (0,)),
    "conv input, batch 128 (128 x 32 x 28 x 28)": ((128, 32, 28, 28), (0, 2, 3)),
}


def one_pass(x, dims):
    return torch.var_mean(x, dims, correction=0)


def two_pass(x, dims):
    mean = x.mean(dims)
    return (x - mean.view(-1, *(1,) * (x.dim() - 2))).square_().mean(dims), mean


def timed(fn, x, dims, reps):
    start = time.perf_counter()
    for _ in range(reps):
        fn(x, dims)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    lines = [f"device {args.device}, {args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}", "",
             f"command: `python benchmarks/bench_moments.py --device {args.device} --threads {args.threads}"
             f"{' --out ' + str(args.out) if args.out else ''}`", "",
             "| shape | var_mean (us) | two passes (us) | var_mean / two passes |", "| --- | ---: | ---: | ---: |"]
    for label, (shape, dims) in SHAPES.items():
        x = torch.randn(*shape, device=args.device)
        reps = max(3, int(2e6 / x.numel()))
        for fn in (one_pass, two_pass):
            timed(fn, x, dims, reps)  # warm up
        times = {one_pass: [], two_pass: []}
        for r in range(args.rounds):  # alternate, order swapped each round
            for fn in ((one_pass, two_pass) if r % 2 == 0 else (two_pass, one_pass)):
                times[fn].append(timed(fn, x, dims, reps))
        a, b = sorted(times[one_pass])[args.rounds // 2], sorted(times[two_pass])[args.rounds // 2]
        lines.append(f"| {label} | {a * 1e6:.1f} | {b * 1e6:.1f} | {a / b:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"moments-{args.device}.md").write_text(text)


if __name__ == "__main__":
    main()
