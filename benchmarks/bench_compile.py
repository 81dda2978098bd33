"""torch.compile vs eager: step time of the MLP 784-256-256-256-10, plain SGD and SGD+BNP(fast=True).

    python benchmarks/bench_compile.py --out results/bench                 # batch sizes 1 and 128, CPU
    python benchmarks/bench_compile.py --device cuda --out results/bench

The model is compiled (``torch.compile(model)``); the loss, backward, ``pre.step()`` and the
optimizer run as usual. Under torch.compile BNP's fast Linear layers take the reference path (the
model then compiles into one graph). Variants are timed in alternating blocks in one process; ratios
are to eager plain SGD at the same batch size.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import pandas as pd
import torch
from bench_step import Setup, machine, report, time_block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,128")
    parser.add_argument("--rounds", type=int, default=30, help="alternating blocks of ~50 ms per variant")
    parser.add_argument("--out", type=Path, help="write <out>/compile-<device>.md")
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the runner: denormal floats are 100x slower on CPUs
    warnings.filterwarnings("ignore", message="BNP\\(fast=True\\) under torch.compile")
    device = torch.device(args.device)
    rows = []
    for batch in map(int, args.batch_sizes.split(",")):
        setups = {}
        for norm in ("none", "bnp"):
            for compiled in (False, True):
                setup = Setup("mlp", norm, batch, device)
                if compiled:
                    setup.model = torch.compile(setup.model)
                setups[(norm, compiled)] = setup
        for setup in setups.values():
            for _ in range(10):  # compiles on the first call
                setup.step()
        block = max(3, int(0.05 / time_block(setups[("none", False)].step, 10, device)))
        times = {key: [] for key in setups}
        for _ in range(args.rounds):
            for key, setup in setups.items():
                times[key].append(time_block(setup.step, block, device))
        plain = statistics.median(times[("none", False)])
        for (norm, compiled), t in times.items():
            rows.append({"batch": batch, "variant": ("plain SGD" if norm == "none" else "BNP") + (", compiled" if compiled else ""),
                         "ms": statistics.median(t) * 1e3, "ratio_to_eager_plain": statistics.median(t) / plain})
    table = pd.DataFrame(rows).round(4)
    command = (f"python benchmarks/bench_compile.py --device {args.device} --batch-sizes {args.batch_sizes} "
               f"--rounds {args.rounds} --out {args.out}")
    report(table, f"MLP 784-256-256-256-10, {machine(device)}", command, args.out, f"compile-{device.type}.md")


if __name__ == "__main__":
    main()
