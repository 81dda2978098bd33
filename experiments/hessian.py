"""Claim 5: BNP improves the condition number of the loss Hessian with respect to each layer.

    python experiments/hessian.py            # digits and Fashion-MNIST, none vs bnp -> results/hessian
    python experiments/hessian.py --smoke    # digits only, a few steps

An MLP 2x32 is trained with plain SGD (norm=none) and with SGD+BNP (norm=bnp). At every evaluation
point, for every Linear layer, on a fixed batch of 512 validation samples, it computes cond(H) and
cond(U^T H U) over the nonzero spectrum (bnp.analysis.hessian): exactly for layers up to 2,500
parameters, by Lanczos (120 steps) for larger ones (the 784-input layer on Fashion-MNIST). U uses
the run's BNP running statistics for bnp runs (batch statistics at step 0, before any) and the
batch statistics of the layer's inputs for none runs (what BNP would use with fresh statistics).
"""

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

import bnp.train
from bnp.analysis.hessian import layer_conditioning
from bnp.provenance import git_commit
from bnp.report import NORM_COLORS, NORM_LABELS

ROOT = Path(__file__).resolve().parent.parent
LR = {"none": 0.1, "bnp": 0.03}  # fixed per method: the claim is about the points visited, not speed


def analyse(path: Path, eps: float):
    """A progress callback: per-layer condition numbers at every evaluation point -> hessian.jsonl."""
    done = {json.loads(line)["step"] for line in path.read_text().splitlines()} if path.exists() else set()

    def callback(trainer) -> None:
        if not trainer.at_eval(trainer.step) or trainer.step in done:
            return
        x, y = trainer.data.val_x[:512], trainer.data.val_y[:512]
        rows = []
        for name in [n for n, m in trainer.model.named_modules() if type(m).__name__ == "Linear"]:
            stats = trainer.pre.stats(name) if trainer.pre is not None else None
            stats = stats if stats is not None and stats.batches else None  # step 0: no statistics yet
            result = layer_conditioning(trainer.model, name, x, y, eps=eps, mean=stats and stats.mean,
                                        var=stats and stats.var)
            rows.append({"step": trainer.step, "layer": name, **{f"plain_{k}": v for k, v in asdict(result.plain).items()},
                         **{f"pre_{k}": v for k, v in asdict(result.preconditioned).items()}})
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        done.add(trainer.step)
        print(f"[hessian] step {trainer.step}: " + ", ".join(
            f"{r['layer']} {r['plain_cond']:.3g} -> {r['pre_cond']:.3g}" for r in rows), flush=True)

    return callback


def figure(table: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(table.groupby(["data", "layer"]))
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7), squeeze=False)
    for col, ((data, layer), group) in enumerate(panels):
        for row, (suffix, label) in enumerate((("cond", "cond, nonzero spectrum"), ("cond_q10", "max / 10th pct |λ|"))):
            ax = axes[row, col]
            for norm, g in group.groupby("norm"):
                median = g.groupby("step")[[f"plain_{suffix}", f"pre_{suffix}"]].median()
                color = NORM_COLORS[norm]
                ax.plot(median.index, median[f"plain_{suffix}"], color=color, ls="-", label=f"{NORM_LABELS[norm]} run: H")
                ax.plot(median.index, median[f"pre_{suffix}"], color=color, ls="--", label=f"{NORM_LABELS[norm]} run: UᵀHU")
            if group[f"plain_{suffix}"].isna().all():
                ax.text(0.5, 0.5, "n/a: Lanczos gives no\nspectrum density", ha="center", va="center",
                        transform=ax.transAxes)
            else:
                ax.set_yscale("log")
            if row == 0:
                ax.set_title(f"{data}, layer {layer}")
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.suptitle("Hessian condition number per layer along training (median over seeds)")
    for ext in ("png", "pdf"):
        fig.savefig(out / f"condition.{ext}", dpi=150, bbox_inches="tight")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-root", default="outputs")
    parser.add_argument("--results", default=None)
    args = parser.parse_args(argv)
    datasets, seeds, extra = (["digits"], [0], ["train.steps=20", "train.eval_every=10"]) if args.smoke else (
        ["digits", "fashion_mnist"], [0, 1, 2], [])
    name = "hessian_smoke" if args.smoke else "hessian"
    sweep = Path(args.out_root) / "sweeps" / name
    started, rows = time.time(), []
    commit = git_commit()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for data in datasets:
            for norm, lr in LR.items():
                for seed in seeds:
                    overrides = ["experiment=hessian", f"data={data}", f"norm={norm}", f"optim.lr={lr}",
                                 f"train.seed={seed}", *extra]
                    cfg = compose(config_name="config", overrides=overrides)
                    run_dir = sweep / bnp.train.slug(",".join(sorted(overrides)))
                    run_dir.mkdir(parents=True, exist_ok=True)
                    print(f"[hessian] {run_dir}", flush=True)
                    bnp.train.run(cfg, run_dir, in_sweep=True, progress=analyse(run_dir / "hessian.jsonl", cfg.norm.eps))
                    for line in (run_dir / "hessian.jsonl").read_text().splitlines():
                        rows.append({"data": data, "norm": norm, "seed": seed, **json.loads(line)})
    table = pd.DataFrame(rows)
    out = Path(args.results or ROOT / "results" / name)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "conditioning.csv", index=False)
    final = table[table["step"] == table.groupby(["data", "norm", "seed"])["step"].transform("max")]
    first = table[table["step"] == 0]
    summary = []
    for (data, norm, layer), g in table.groupby(["data", "norm", "layer"]):
        at = lambda frame, col: frame[(frame.data == data) & (frame.norm == norm) & (frame.layer == layer)][col]  # noqa: E731
        summary.append({
            "data": data, "run": norm, "layer": layer, "method": g["plain_method"].iloc[0],
            "cond(H) start": f"{at(first, 'plain_cond').median():.3g}", "cond(UᵀHU) start": f"{at(first, 'pre_cond').median():.3g}",
            "cond(H) end": f"{at(final, 'plain_cond').median():.3g}", "cond(UᵀHU) end": f"{at(final, 'pre_cond').median():.3g}",
            "q10 cond(H) end": f"{at(final, 'plain_cond_q10').median():.3g}",
            "q10 cond(UᵀHU) end": f"{at(final, 'pre_cond_q10').median():.3g}",
            "median ratio H/UᵀHU": f"{(g['plain_cond'] / g['pre_cond']).median():.3g}",
            "median ratio (q10)": f"{(g['plain_cond_q10'] / g['pre_cond_q10']).median():.3g}",
            "zero eigenvalues (H)": int(g["plain_zeros"].median()),
        })
    summary = pd.DataFrame(summary)
    summary.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(summary.to_markdown(index=False) + "\n")
    figure(table, out)
    (out / "PROVENANCE.md").write_text(
        f"- experiment: `python experiments/hessian.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
        f"- runs by the commit they ran at: {commit} ({table.groupby(['data', 'norm', 'seed']).ngroups})\n- machine: {platform.node()}, {platform.machine()}, python {platform.python_version()}\n"
        f"- wall time of this invocation: {time.time() - started:.0f} s\n- date: {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(summary.to_markdown(index=False))


if __name__ == "__main__":
    main()
