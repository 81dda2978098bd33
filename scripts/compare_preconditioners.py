"""The preconditioner comparison's table and figure: each method's test accuracy at its chosen lr
(results/preconditioners/table.csv, the sweep's report; the fc-head CNN's plain SGD and SGD + BNP
from results/cnn-fc-b128-2ep, where those same runs live) beside its step time as a ratio to plain
SGD measured in one process (results/bench/optimizers-<device>.csv, benchmarks/bench_optimizers.py).

    python scripts/compare_preconditioners.py            # -> results/preconditioners/comparison.{md,csv}, accuracy_vs_cost.png

A method is an optimizer with or without a BNP-family preconditioner: sgd, sgd+bnp, sgd+full (the
full-covariance rule), adam, adam+bnp, shampoo, soap, muon, kron.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRECONDITIONER = {"none": "", "bnp": "+bnp", "bnp_full": "+full"}
COLUMNS = ["model", "batch_size", "method", "source", "lr", "lr_bracket", "seeds", "chosen_on", "test_acc", "acc_mean", "vs_sgd",
           "prequential_acc", "steps_to_0.85", "step_time_ratio", "dominated_by"]
TIMING_TOLERANCE = 0.1  # step-time ratios within 10% count as equal cost: repeated benchmark runs move them that much


def mean(cell: str) -> float:
    try:
        return float(str(cell).split("±")[0])
    except ValueError:
        return float("nan")


def spread(cell: str) -> float:
    """The ± part of a ``mean ± std`` cell (0 for a single seed)."""
    parts = str(cell).split("±")
    return float(parts[1]) if len(parts) == 2 else 0.0


# rows trained once, in another setting: the fc-head CNN's plain SGD and SGD + BNP at batch 128 (2 epochs) are
# the runs of results/cnn-fc-b128-2ep (norm none and bnp), the same configs, so the comparison reads them there
BORROWED = {"cnn-fc-b128-2ep": ("cnn-fc 16-32", ["none", "bnp"])}  # setting -> (its model, norms)


def borrowed(results: Path, settings: dict[str, tuple[str, list[str]]], models) -> pd.DataFrame:
    """The plain-SGD rows ``settings`` names ({setting directory: (model, norms)}) from their own tables,
    each with its ``source`` (``comparison`` refuses a method that arrives from two places); only for the
    ``models`` this comparison has (a variant without the CNN, e.g. the smoke run, borrows nothing)."""
    frames = []
    models = set(models)
    for setting, (model, norms) in settings.items():
        if model not in models:
            continue
        path = results / setting / "table.csv"
        if not path.is_file():
            sys.exit(f"[compare] {path} is missing: its {model} rows ({', '.join(norms)}) complete this comparison; "
                     f"make it with `python -m bnp.setting {setting} --restore --report-only` (or make fig-{setting})")
        table = pd.read_csv(path, dtype={"config": str})
        frames.append(table[table["norm"].isin(norms) & (table["optim"] == "sgd")].assign(source=setting))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# the table's model label -> the benchmark's (benchmarks/bench_optimizers.py times these two models)
BENCH_MODEL = {"mlp 3x256": "MLP 784-256-256-256-10", "cnn-fc 16-32": "CNN-fc 16-16-32-32, 1x28x28"}


def comparison(table: pd.DataFrame, bench: pd.DataFrame) -> pd.DataFrame:
    rows = table.assign(method=table["optim"] + table["norm"].map(PRECONDITIONER))
    # counts stay integers beside a row not yet run (whose cells are empty)
    counts = [c for c in ("seeds", "chosen_on") if c in rows.columns]
    rows[counts] = rows[counts].astype("Int64").astype(object)
    keys = ["model", "batch_size", "method"]
    if rows.duplicated(keys).any():
        raise ValueError(f"two rows for one method: {rows[rows.duplicated(keys, keep=False)][keys].values.tolist()}")
    ratios = {(model, int(b), m): r for model, b, m, r in bench[["model", "batch", "method", "ratio"]].itertuples(index=False)}
    for model in sorted(set(rows["model"]) - set(BENCH_MODEL)):
        print(f"[compare] warning: no benchmark of {model!r} (BENCH_MODEL): its step_time_ratio is n/a", file=sys.stderr)
    rows["step_time_ratio"] = [ratios.get((BENCH_MODEL.get(model), int(b), m), float("nan"))
                               for model, b, m in rows[["model", "batch_size", "method"]].itertuples(index=False)]
    order = {m: i for i, m in enumerate(["sgd", "sgd+bnp", "sgd+full", "adam", "adam+bnp", "shampoo", "soap",
                                         "muon", "kron"])}
    rows = rows.assign(_order=rows["method"].map(order)).sort_values(["model", "batch_size", "_order"])
    rows["acc_mean"] = rows["test_acc"].map(mean)
    sgd = rows[rows["method"] == "sgd"].set_index(["model", "batch_size"])["acc_mean"]
    rows["vs_sgd"] = [f"{100 * (a - sgd[(m, b)]):+.1f}" if (m, b) in sgd.index and a == a else "n/a"
                      for m, b, a in rows[["model", "batch_size", "acc_mean"]].itertuples(index=False)]
    rows["dominated_by"] = [", ".join(dominating(rows, row)) if row["step_time_ratio"] == row["step_time_ratio"]
                            else "n/a (no step time)" for _, row in rows.iterrows()]
    return rows[[c for c in COLUMNS if c in rows.columns]].reset_index(drop=True)


def dominating(rows: pd.DataFrame, row: pd.Series) -> list[str]:
    """The methods of the same model and batch size that are at least as accurate (mean test
    accuracy) at no more step cost (within TIMING_TOLERANCE), one of the two strictly: the ones that
    make ``row`` a bad buy."""
    peers = rows[(rows["model"] == row["model"]) & (rows["batch_size"] == row["batch_size"])
                 & (rows["method"] != row["method"])]
    cost, acc = peers["step_time_ratio"], peers["acc_mean"]
    better = peers[(acc >= row["acc_mean"]) & (cost <= row["step_time_ratio"] * (1 + TIMING_TOLERANCE))
                   & ((acc > row["acc_mean"]) | (cost < row["step_time_ratio"]))]
    return list(better["method"])


def figure(frame: pd.DataFrame, out: Path) -> None:
    panels = list(frame.groupby(["model", "batch_size"], sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, ((model, batch), group) in zip(axes[0], panels):
        for _, row in group.iterrows():
            acc = row["acc_mean"]
            color = "#d62728" if "bnp" in row["method"] or "full" in row["method"] else "#1f77b4"
            ax.errorbar(row["step_time_ratio"], acc, yerr=spread(row["test_acc"]), fmt="o", color=color, capsize=2)
            ax.annotate(row["method"], (row["step_time_ratio"], acc), fontsize=7, xytext=(3, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("step time / plain SGD's (one benchmark process)")
        ax.set_title(f"{model}, batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "preconditioners")
    parser.add_argument("--bench", type=Path, default=ROOT / "results" / "bench" / "optimizers-cpu.csv")
    args = parser.parse_args()
    own = pd.read_csv(args.results / "table.csv", dtype={"config": str}).assign(source=args.results.name)
    table = pd.concat([own, borrowed(args.results.parent, BORROWED, own["model"])], ignore_index=True)
    frame = comparison(table, pd.read_csv(args.bench))
    frame.to_csv(args.results / "comparison.csv", index=False)
    command = "python scripts/compare_preconditioners.py"
    markdown = frame.astype(object).fillna("n/a").to_markdown(index=False, disable_numparse=True)
    (args.results / "comparison.md").write_text(
        f"Made by `{command}` from `table.csv`, the rows of {', '.join(f'results/{k}' for k in BORROWED)} "
        f"named in `source`, and `{args.bench.relative_to(ROOT)}`.\n\n" + markdown + "\n")
    figure(frame, args.results / "accuracy_vs_cost.png")
    print(markdown)


if __name__ == "__main__":
    main()
