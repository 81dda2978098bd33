"""Step cost of each method of experiments/preconditioners.py, as a ratio to plain SGD timed in the
same process (alternating blocks, bench_step.alternate).

    python benchmarks/bench_optimizers.py --out results/bench          # MLP batch 1, 8, 128; CNN 128
    python benchmarks/bench_optimizers.py --models mlp --batch-sizes 1 --seconds 1

A step is the runner's: slice a batch, forward, cross-entropy, backward, the preconditioner's step
(BNP fast, or the full-covariance rule), the optimizer's step, each built by bnp itself
(bnp.optim.build_optimizer) at its default learning rate.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pandas as pd
import torch

import bench_step
from bench_step import alternate, machine, report
from bnp import BNP, FullCovariance
from bnp.config import OptimConfig, default_lr
from bnp.models import CNN, MLP
from bnp.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "mlp": ("MLP 784-256-256-256-10", lambda norm: MLP(784, 10, depth=3, width=256, norm=norm), (784,)),
    "cnn": ("CNN-fc 16-16-32-32, 1x28x28", lambda norm: CNN(1, 10, channels=(16, 32), norm=norm, head="fc",
                                                         image_size=(28, 28)), (1, 28, 28)),
}


def methods() -> dict[str, tuple[str, str]]:
    """method -> (norm, optimizer), as the experiment declares them."""
    spec = importlib.util.spec_from_file_location("preconditioners", ROOT / "experiments" / "preconditioners.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: (norm, optim) for name, (norm, optim, _) in module.METHODS.items()}


class Setup(bench_step.Setup):
    """bench_step's step (slice, forward, backward, pre.step(), opt.step()) with the method's parts."""

    def __init__(self, model_key: str, norm: str, optim: str, batch_size: int, device: torch.device):
        torch.manual_seed(0)
        _, build, shape = MODELS[model_key]
        self.model = build("none" if norm in ("none", "bnp_full") else norm).to(device).train()
        self.pre = (BNP(self.model, fast=True) if norm == "bnp" else
                    FullCovariance(self.model) if norm == "bnp_full" else None)
        cfg = OptimConfig(name=optim, lr=default_lr(optim, norm))
        if optim == "muon":
            cfg.momentum, cfg.nesterov = 0.95, True  # configs/optim/muon.yaml
        self.opt, _ = build_optimizer(cfg, self.model, total_steps=10**9, steps_per_epoch=1000)
        self.data(shape, batch_size, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the experiment")
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per comparison")
    parser.add_argument("--out", type=Path, help="write <out>/optimizers-<device>.md and .csv")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    table = methods()
    rows = []
    for model_key in args.models:
        for batch_size in args.batch_sizes if model_key == "mlp" else [128]:  # the experiment's settings
            for name in args.methods or table:
                norm, optim = table[name]
                plain, method = Setup(model_key, "none", "sgd", batch_size, device), Setup(
                    model_key, norm, optim, batch_size, device)
                medians = alternate({"plain": plain.step, "method": method.step}, device, args.seconds)
                rows.append({"model": MODELS[model_key][0], "batch": batch_size, "method": name,
                             "sgd_ms": medians["plain"] * 1e3, "method_ms": medians["method"] * 1e3,
                             "ratio": medians["method"] / medians["plain"]})
                print(f"{model_key} batch {batch_size:4d} {name:9}: sgd {medians['plain'] * 1e3:8.3f} ms, "
                      f"{medians['method'] * 1e3:8.3f} ms, ratio {rows[-1]['ratio']:6.2f}", flush=True)
    frame = pd.DataFrame(rows).round(4)
    command = "python benchmarks/bench_optimizers.py " + f"--device {args.device} --seconds {args.seconds}"
    report(frame, machine(device), command, args.out, f"optimizers-{device.type}.md")
    if args.out:
        frame.to_csv(args.out / f"optimizers-{device.type}.csv", index=False)


if __name__ == "__main__":
    main()
