"""Plot the per-layer instruments (train.diagnostics=true) of some runs, one line per run.

    python scripts/plot_diagnostics.py RUN_DIR [RUN_DIR ...] --out fig.png [--labels a,b,...] [--table t.md]

Panels: train loss, and the maximum over layers of each instrument (update/weight ratio, largest
1/(sigma2+eps), eps-floor share, running-mean and running-variance drift), against the step; then
the update/weight ratio of every layer of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from bnp.log import read_metrics  # noqa: E402

QUANTITIES = ("update_ratio", "max_inv_d2", "floor_share", "mean_drift", "var_drift")


def train_rows(run_dir: Path) -> pd.DataFrame:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]
    if not rows or not any(k.startswith("diag/") for k in rows[-1]):
        raise SystemExit(f"error: {run_dir} has no diag/ metrics (run it with train.diagnostics=true)")
    return pd.DataFrame(rows)


def plot(run_dirs: list[Path], labels: list[str], out: Path) -> None:
    frames = [train_rows(d) for d in run_dirs]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for i, (frame, label) in enumerate(zip(frames, labels)):
        color = f"C{i}"  # one color per run in every panel, also where a run lacks a quantity
        axes[0, 0].plot(frame["step"], frame["train_loss"], label=label, color=color, marker=".")
        for ax, quantity in zip(axes.flat[1:], QUANTITIES):
            column = f"diag/{quantity}/max"
            if column in frame:
                ax.plot(frame["step"], frame[column], label=label, marker=".", color=color)
    axes[0, 0].set_title("train loss")
    for ax, quantity in zip(axes.flat[1:], QUANTITIES):
        ax.set_title(f"{quantity} (max over layers)")
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(frames), figsize=(5 * len(frames), 4), squeeze=False)
    for ax, frame, label in zip(axes[0], frames, labels):
        for column in sorted(c for c in frame if c.startswith("diag/update_ratio/") and not c.endswith("/max")):
            ax.plot(frame["step"], frame[column], label=column.split("/", 2)[2], lw=1)
        ax.set_title(f"{label}: update / weight per layer")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_layers" + out.suffix), dpi=130)
    plt.close(fig)


def summary_table(run_dirs: list[Path], labels: list[str]) -> pd.DataFrame:
    """Per run and logged step: the train loss, the largest and the median update/weight ratio over
    layers, and BNP's largest 1/(sigma2+eps) and eps-floor share."""
    rows = []
    for run_dir, label in zip(run_dirs, labels):
        for _, r in train_rows(run_dir).iterrows():
            ratios = [v for k, v in r.items() if k.startswith("diag/update_ratio/") and not k.endswith("/max")]
            rows.append({"run": label, "step": int(r["step"]), "train_loss": r["train_loss"],
                         "update_ratio max": r.get("diag/update_ratio/max"),
                         "update_ratio median": pd.Series(ratios, dtype=float).median(),
                         "floor_share max": r.get("diag/floor_share/max"),
                         "max_inv_d2 max": r.get("diag/max_inv_d2/max")})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="figure file (.png or .pdf); a second one, "
                        "<name>_layers, gets the per-layer update ratios")
    parser.add_argument("--labels", default=None, help="comma-separated, one per run (default: directory names)")
    parser.add_argument("--table", type=Path, default=None, help="also write the per-step numbers as markdown")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [d.name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        parser.error(f"--labels has {len(labels)} names for {len(args.run_dirs)} runs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(args.run_dirs, labels, args.out)
    if args.table:
        command = "python scripts/plot_diagnostics.py " + " ".join(str(a) for a in (argv or []))
        args.table.write_text(f"command: `{command}`\n\n"
                              + summary_table(args.run_dirs, labels).to_markdown(index=False, floatfmt=".4g") + "\n")
    print(f"written: {args.out}, {args.out.with_name(args.out.stem + '_layers' + args.out.suffix)}")


if __name__ == "__main__":
    main(sys.argv[1:])
