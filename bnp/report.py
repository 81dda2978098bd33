"""Sweep directory -> comparison tables and figures: ``python -m bnp.report SWEEP_DIR [--out DIR]``.

The runs come from bnp.runs (one row per run, keyed by setting), the learning rate of each setting
from bnp.choice (the fair-comparison rule and its bracketing); the table reports each setting's
chosen lr's test metrics as mean +- std over all of its seeds. Diverged, not-applicable and failed
runs are counted in the status column, never dropped silently; damaged runs are listed and the rest
of the report is written all the same.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from bnp.choice import (_val_for_choice, lr_bracket, pick_learning_rates, read_extensions, seeds_shared, setting_key,
                        write_extensions)
from bnp.runs import SETTING, _filled, load_runs, steps_to_target

NORM_ORDER = ["none", "bn", "bnp", "ln", "gn"]
NORM_COLORS = {"none": "#7f7f7f", "bn": "#1f77b4", "bnp": "#d62728", "ln": "#2ca02c", "gn": "#9467bd"}
NORM_LABELS = {"none": "no norm", "bn": "BatchNorm", "bnp": "BNP", "ln": "LayerNorm", "gn": "GroupNorm"}
VARIANT_COLORS = ["#ff7f0e", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#000000"]


def norm_rank(norm: str) -> tuple[int, str]:
    """Table and legend order: the five kinds, then variants (e.g. bnp_releps) by name."""
    return (NORM_ORDER.index(norm), "") if norm in NORM_ORDER else (len(NORM_ORDER), norm)


def norm_color(norm: str) -> str:
    return NORM_COLORS.get(norm) or VARIANT_COLORS[sum(map(ord, norm)) % len(VARIANT_COLORS)]


# ---------------------------------------------------------------------------------------- loading


# ---------------------------------------------------------------------------------------- tables
def _status_counts(statuses: pd.Series) -> str:
    counts = statuses.value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _mean_std(values: pd.Series, digits: int = 4) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def comparison_table(runs: pd.DataFrame, curves: dict[str, list[dict]], target: float,
                     extensions: dict | None = None) -> pd.DataFrame:
    """One row per setting at its chosen learning rate: mean ± std over seeds, status counts, and
    how the lr is bracketed (``extensions``: the driver's bracketing record, by setting_key)."""
    runs = _filled(runs)
    runs["steps_to_target"] = [steps_to_target(curves.get(r, []), target) for r in runs["run"]]
    chosen = pick_learning_rates(runs)
    out = []
    for key, group in runs.groupby(SETTING, sort=False):
        row = dict(zip(SETTING, key))
        match = chosen.merge(pd.DataFrame([row]), on=SETTING)
        row["status"] = _status_counts(group["status"])
        if match.empty or not (group["status"] == "completed").any():  # none completed: no lr to show
            row.update({"lr": "n/a", "lr_bracket": "n/a", "seeds": 0})
            out.append(row)
            continue
        lr, hparams = match["lr"].iloc[0], match["hparams"].iloc[0]
        best = group[(group["lr"] == lr) & (group["hparams"] == hparams) & (group["status"] == "completed")]
        row.update({
            "lr": lr, "lr_bracket": lr_bracket(group, lr, hparams, (extensions or {}).get(setting_key(key))),
            "hparams": hparams, "seeds": len(best),
            # the seeds every lr of the setting ran: what the lr was chosen on (1 = a one-seed screen)
            "chosen_on": len(seeds_shared(_val_for_choice(group))) or len(best),
            "test_acc": _mean_std(best["final_test_acc"]),
            "best_val_acc": _mean_std(best["best_val_acc"]),
            "train_loss": _mean_std(best["final_train_loss"]),
            f"steps_to_{target:g}": _mean_std(best["steps_to_target"], 0),
            "prequential_acc": _mean_std(best["prequential_acc"]),
            "wall_s": _mean_std(best["wall_time_s"], 1),
        })
        out.append(row)
    table = pd.DataFrame(out)
    table["norm"] = pd.Categorical(table["norm"], sorted(set(table["norm"]), key=norm_rank))
    return table.sort_values(["data", "model", "batch_size", "norm"]).reset_index(drop=True).fillna("n/a")


# ---------------------------------------------------------------------------------------- figures
def _chosen_runs(runs: pd.DataFrame) -> pd.DataFrame:
    runs = _filled(runs)
    chosen = pick_learning_rates(runs)
    return runs.merge(chosen, on=SETTING + ["lr", "hparams"])


def _methods(group: pd.DataFrame):
    """(norm, legend label, runs) per method of a panel, in table order; a config that differs
    within the panel is part of the label."""
    methods = sorted(group.groupby(["norm", "config"]), key=lambda kv: (norm_rank(kv[0][0]), kv[0][1]))
    for (norm, config), runs in methods:
        yield norm, NORM_LABELS.get(norm, norm) + (f" ({config})" if config else ""), runs


def _band(ax, frames: list[pd.DataFrame], x: str, y: str, norm: str, label: str) -> None:
    """Mean over seeds with a min-max band, on the union of logged x values."""
    series = [f.set_index(x)[y].dropna() for f in frames if y in f and not f[y].dropna().empty]
    if not series:
        return
    joined = pd.concat(series, axis=1).sort_index().interpolate(limit_area="inside")
    mean = joined.mean(axis=1)
    ax.plot(mean.index, mean.values, color=norm_color(norm), label=label)
    if len(series) > 1:
        ax.fill_between(mean.index, joined.min(axis=1), joined.max(axis=1), color=norm_color(norm), alpha=0.2)


def make_figures(runs: pd.DataFrame, curves: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    chosen = _chosen_runs(runs[runs["status"] == "completed"])
    if chosen.empty:
        return written

    def save(fig, name):
        for ext in ("png", "pdf"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=150, bbox_inches="tight")
            written.append(path)
        plt.close(fig)

    # training curves: one column per (data, model, batch size), rows: train loss, test accuracy
    panels = list(chosen.groupby(["data", "model", "batch_size"]))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 6.5), squeeze=False)
    for col, ((data, model, bs), group) in enumerate(panels):
        for norm, label, runs_of_norm in _methods(group):
            frames = [pd.DataFrame(curves[r]) for r in runs_of_norm["run"]]
            _band(axes[0, col], frames, "epoch", "train_loss", norm, label)
            _band(axes[1, col], frames, "epoch", "test_acc", norm, label)
        axes[0, col].set_title(f"{data}, {model}, batch {bs}")
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("train loss (log-interval mean)")
        axes[0, col].legend(fontsize="small")
        axes[1, col].set_ylabel("test accuracy")
        for ax in axes[:, col]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    fig.suptitle("Training curves at each method's chosen learning rate (mean over seeds, band: min-max)")
    save(fig, "curves")

    # final test accuracy vs batch size
    groups = list(chosen.groupby(["data", "model"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for col, ((data, model), group) in enumerate(groups):
        ax = axes[0, col]
        for norm, label, g in _methods(group):
            stats = g.groupby("batch_size")["final_test_acc"].agg(["mean", "std"]).reset_index()
            ax.errorbar(stats["batch_size"], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                        color=norm_color(norm), label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel("final test accuracy")
        ax.set_title(f"{data}, {model}")
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, "accuracy_vs_batch_size")

    # prequential accuracy for online runs (batch size 1)
    online = chosen[chosen["batch_size"] == 1]
    if not online.empty:
        groups = list(online.groupby(["data", "model"]))
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for col, ((data, model), group) in enumerate(groups):
            ax = axes[0, col]
            for norm, label, g in _methods(group):
                frames = []
                for r in g["run"]:
                    f = pd.DataFrame(curves[r])
                    if "prequential_acc" in f:
                        f = f.dropna(subset=["prequential_acc"]).assign(samples=lambda d: d["step"])
                        frames.append(f)
                _band(ax, frames, "samples", "prequential_acc", norm, label)
            ax.set_xlabel("samples seen (online, batch size 1)")
            ax.set_ylabel("prequential accuracy (cumulative)")
            ax.set_title(f"{data}, {model}")
            ax.grid(alpha=0.3)
            ax.legend()
        save(fig, "prequential")
    return written


# ---------------------------------------------------------------------------------------- main
def _provenance(argv: list[str], sweep_dir: Path, runs: pd.DataFrame) -> str:
    """How the results were made: every sweep invocation with its commit (<sweep>/invocations.jsonl;
    Hydra's multirun.yaml for sweeps from before it), the commits the runs ran at, this report's
    command and commit, the machine and the summed training time."""
    from bnp.provenance import git_commit, read_invocations, relative

    commit = git_commit() or "unknown"
    lines = []
    invocations = read_invocations(sweep_dir)
    for inv in invocations:
        lines.append(f"sweep: `{relative(inv['command'])}` (commit {inv['commit']}, {inv['started']} to "
                     f"{inv['finished'] or 'interrupted'})")
    multirun = Path(sweep_dir) / "multirun.yaml"
    if not invocations and multirun.exists():
        task = yaml.safe_load(multirun.read_text()).get("hydra", {}).get("overrides", {}).get("task", [])
        lines.append(f"sweep (the last one only): `python -m bnp.train -m {' '.join(task)}`")
    by_commit = runs["commit"].value_counts()
    lines += [
        "runs by the commit they ran at: " + ", ".join(f"{c} ({n})" for c, n in by_commit.items()),
        f"report: `python -m bnp.report {relative(' '.join(argv))}` (commit {commit})",
        f"runs: {len(runs)} ({_status_counts(runs['status'])}); training time summed over runs: "
        f"{runs['wall_time_s'].sum():.0f} s",
        f"machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        f"date: {time.strftime('%Y-%m-%d %H:%M')}",
    ]
    return "\n".join(f"- {line}" for line in lines) + "\n"


def _appended_lines(provenance: Path) -> str:
    """What was appended to an earlier PROVENANCE.md after its report's part (which ends with the
    ``- date:`` line that _provenance writes last): experiment invocations, notes. A report rewrites
    its own part and keeps these."""
    if not provenance.exists():
        return ""
    _, dated, rest = provenance.read_text().partition("\n- date: ")
    return rest.partition("\n")[2] if dated else ""


def _markdown(table: pd.DataFrame) -> str:
    """table.md: a chosen lr that is not bracketed on both sides is shown in bold with its label."""
    shown = table.copy()
    if "lr_bracket" in shown:
        shown["lr_bracket"] = [b if b in ("interior", "n/a") else f"**{b}**" for b in shown["lr_bracket"]]
    return shown.to_markdown(index=False) + "\n"


def report(sweep_dir: Path, out: Path, target: float = 0.9, argv: list[str] | None = None) -> pd.DataFrame:
    runs, curves = load_runs(sweep_dir)
    if runs.empty:
        raise SystemExit(f"error: no run directories (config.yaml + summary.json) under {sweep_dir}")
    out.mkdir(parents=True, exist_ok=True)
    extensions = read_extensions(sweep_dir)
    table = comparison_table(runs, curves, target, extensions)
    if extensions:  # kept beside runs.csv, so the labels can be recomputed from the results alone
        write_extensions(out, extensions)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(_markdown(table))
    (out / "table.tex").write_text(table.to_latex(index=False, escape=True))
    from bnp.provenance import relative

    runs.assign(run=[relative(r) for r in runs["run"]],
                overrides=runs["overrides"].map(relative)
                ).to_csv(out / "runs.csv", index=False)
    every = runs.assign(run=[Path(r).name for r in runs["run"]]).sort_values("run")
    (out / "runs.md").write_text(every[["run", "status", "reason", "best_val_acc", "final_test_acc", "steps"]]
                                 .to_markdown(index=False) + "\n")
    make_figures(runs, curves, out)
    provenance = out / "PROVENANCE.md"
    provenance.write_text(_provenance(argv or [str(sweep_dir)], sweep_dir, runs) + _appended_lines(provenance))
    return table


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bnp.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, help="where tables and figures go (default: SWEEP_DIR/report)")
    parser.add_argument("--target", type=float, default=0.9, help="validation accuracy for steps-to-target")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"SWEEP_DIR {args.sweep_dir} is not a directory")
    table = report(args.sweep_dir, args.out or args.sweep_dir / "report", args.target, argv)
    print(table.to_markdown(index=False))
    print(f"\nwritten to {args.out or args.sweep_dir / 'report'}")


if __name__ == "__main__":
    main()
