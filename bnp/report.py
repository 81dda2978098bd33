"""Sweep directory -> comparison tables and figures: ``python -m bnp.report SWEEP_DIR [--out DIR]``.

Reads only the run directories' files (``config.yaml``, ``summary.json``, ``metrics.jsonl``),
never the W&B API, so it works offline and on a laptop after a cluster sweep.

The fair-comparison rule: within each setting (everything but the learning rate and the seed), the
learning rate with the best mean validation accuracy over seeds wins (over the seeds every learning
rate of the setting ran with, where some have more); the table reports that learning rate's test
metrics as mean +- std over all of its seeds. Diverged, not-applicable and failed runs
are counted in the status column, never dropped silently.

A setting is data, model, norm, batch size and optimizer, plus every other config value that
differs among those runs (the ``config`` column, e.g. ``optim.momentum=0.9,train.steps=600``),
except the lr, the seed, the norm's options (``hparams``: chosen between like lrs) and values that
do not change what is trained (``NOT_SETTING``: threads, device, logging, paths). Two runs of the
same config and seed count once: the finished one, or of two finished ones the later (a warning
names both). A run whose files cannot be read is listed and counted as ``damaged``; the rest of the
report is written all the same.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from bnp.log import FINISHED, OVERRIDES, Unreadable, read_json, read_metrics, read_summary

SETTING = ["data", "model", "norm", "batch_size", "optim", "config"]
# config values that do not change what a run trains: they never split a setting
NOT_SETTING = ("optim.lr", "train.seed", "train.rerun", "train.threads", "train.verbose", "train.device",
               "train.cuda_graph", "train.compile", "train.diagnostics", "train.log_every", "train.eval_batch_size",
               "name", "out_root", "data.root", "data.download", "logger.", "norm.")
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
def find_runs(sweep_dir: Path) -> list[Path]:
    """Every run directory below ``sweep_dir`` (any launcher layout): those with a summary or config."""
    dirs = {p.parent for p in Path(sweep_dir).rglob("summary.json")} | {p.parent for p in Path(sweep_dir).rglob("config.yaml")
                                                                          if (p.parent / "metrics.jsonl").exists()}
    return sorted(d for d in dirs if "wandb" not in d.parts and ".hydra" not in d.parts)


def _model_label(cfg: dict) -> str:
    m = cfg["model"]
    if m["name"] == "mlp":
        return f"mlp {m['depth']}x{m['width']}"
    if m["name"] == "cnn":
        head = m.get("head", "gap")  # runs from before the fc head had none: gap
        hidden = f" h{m['hidden']}" if head == "fc" and m.get("hidden") else ""
        return ("cnn " if head == "gap" else "cnn-fc ") + "-".join(str(c) for c in m["channels"]) + hidden
    return m["arch"] + ("-proj" if m.get("shortcut", "identity") == "projection" else "")


def _hparams(norm_cfg: dict) -> str:
    """The norm options that differ from their defaults (BNP's eps, momentum, variant options):
    runs that differ here are different configurations of one method, chosen between like lrs."""
    from bnp.config import NormConfig

    defaults = NormConfig().__dict__
    keep = {k: v for k, v in norm_cfg.items() if k not in ("kind", "variant", "fast") and k in defaults
            and v != defaults[k]}
    return ",".join(f"{k}={v}" for k, v in sorted(keep.items()))


def _norm_label(norm_cfg: dict) -> str:
    return norm_cfg.get("variant") or norm_cfg["kind"]


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train.seed": 0, ...} from a nested config; lists become tuples, numbers floats (2 == 2.0)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _plain(value)
    return out


def _plain(value):
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _shown(value) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _defaults() -> dict:
    """The schema's values, flat: keys an older run's config.yaml lacks take them (so a key added
    later never splits a setting)."""
    from omegaconf import OmegaConf

    from bnp.config import RunConfig

    return _flat(OmegaConf.to_container(OmegaConf.structured(RunConfig)))


def _config_column(runs: pd.DataFrame, flats: list[dict]) -> list[str]:
    """Per run, the config values (outside NOT_SETTING) that differ among the runs of its
    (data, model, batch size, optimizer), as ``key=value,...``: the same keys for every method
    compared there, so methods line up on the same settings."""
    column = [""] * len(runs)
    for _, index in runs.groupby(["data", "model", "batch_size", "optim"], sort=False).groups.items():
        rows = [flats[i] for i in index]
        keys = sorted(k for k in set().union(*rows) if not k.startswith(NOT_SETTING)
                      and len({repr(r.get(k)) for r in rows}) > 1)
        for i in index:
            column[i] = ",".join(f"{k}={_shown(flats[i].get(k))}" for k in keys)
    return column


def _one_per_config(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of the same config and seed (e.g. optim.lr=0.01 and optim.lr=1e-2, two directories)
    count once: a finished one before others, then the one that started last."""
    runs = runs.assign(_unfinished=~runs["status"].isin(FINISHED)).sort_values(
        ["_unfinished", "started"], ascending=[True, False], kind="stable")
    group = runs.groupby(SETTING + ["lr", "hparams", "seed"], dropna=False, sort=False).ngroup()  # NaN lr: one value
    dropped = runs[group.duplicated(keep="first")]
    for index, extra in dropped.iterrows():
        kept = runs[group == group[index]].iloc[0]
        print(f"[report] warning: {extra['run']} repeats the config and seed of {kept['run']}; counted once "
              "(kept the finished one, or the later)", file=sys.stderr)
    return runs.drop(index=dropped.index).drop(columns="_unfinished").sort_index()


def load_runs(sweep_dir: Path) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """One row per run (setting, lr, seed, status and summary metrics), and its metric rows. A run
    whose config cannot be read is left out and named; one with a torn summary is ``damaged``."""
    rows, flats, curves, unreadable = [], [], {}, []
    defaults = _defaults()
    for run_dir in find_runs(sweep_dir):
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            continue
        try:
            cfg = yaml.safe_load(config_path.read_text())
            flat = {**defaults, **_flat(cfg)}
            model = _model_label(cfg)
        except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            unreadable.append(f"{config_path} ({type(err).__name__})")
            continue
        try:
            summary = read_summary(run_dir) or {"status": "unfinished"}
        except Unreadable as err:
            summary = {"status": "damaged", "reason": str(err)}
        overrides = run_dir / OVERRIDES
        if not overrides.exists():  # runs from before the runner wrote its own copy
            overrides = run_dir / ".hydra" / OVERRIDES
        row = {
            "run": str(run_dir), "data": cfg["data"]["name"], "model": model, "norm": _norm_label(cfg["norm"]),
            "batch_size": cfg["train"]["batch_size"], "optim": cfg["optim"]["name"], "lr": cfg["optim"]["lr"],
            "hparams": _hparams(cfg["norm"]), "seed": cfg["train"]["seed"], "status": summary.get("status", "unknown"),
            "reason": summary.get("reason", ""), "commit": summary.get("git_commit") or "unknown",
            "started": summary.get("started") or "",
            "overrides": shlex.join(yaml.safe_load(overrides.read_text()) or []) if overrides.exists() else "",
        }
        for key in ("final_test_acc", "best_val_acc", "test_acc_at_best_val", "final_train_loss", "final_val_acc",
                    "prequential_acc", "wall_time_s", "samples_per_s", "steps"):
            value = summary.get(key)
            row[key] = float(value) if isinstance(value, (int, float)) else math.nan
        rows.append(row)
        flats.append(flat)
        metrics = run_dir / "metrics.jsonl"
        curves[str(run_dir)] = read_metrics(metrics) if metrics.exists() else []
    damaged = unreadable + [r["reason"] for r in rows if r["status"] == "damaged"]
    if damaged:
        print(f"[report] warning: {len(damaged)} runs with unreadable files, left out or counted as damaged "
              f"(train them again to repair): {'; '.join(damaged)}", file=sys.stderr)
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs, curves
    runs.insert(runs.columns.get_loc("optim") + 1, "config", _config_column(runs, flats))
    return _one_per_config(runs), curves


def steps_to_target(rows: list[dict], target: float) -> float:
    """First evaluated step with validation accuracy >= target (NaN if never reached)."""
    for row in rows:
        if row.get("val_acc") is not None and row["val_acc"] >= target:
            return float(row["step"])
    return math.nan


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


def _filled(runs: pd.DataFrame) -> pd.DataFrame:
    """``hparams`` and ``config`` as strings: a runs.csv read back has NaN for none (and older ones
    have no config column)."""
    return runs.assign(**{c: runs[c].astype(object).fillna("") if c in runs else "" for c in ("hparams", "config")})


def _val_for_choice(runs: pd.DataFrame) -> pd.DataFrame:
    ok = _filled(runs[runs["status"].isin(["completed", "diverged"])])
    ok["val_for_choice"] = ok["best_val_acc"].where(ok["status"] == "completed", 0.0).fillna(0.0)
    return ok


def seeds_shared(ok: pd.DataFrame) -> set:
    """The seeds that every (lr, norm options) of one setting's usable runs (completed or diverged)
    ran with."""
    per_lr = [set(seeds) for _, seeds in ok.groupby(["lr", "hparams"], dropna=False)["seed"]]
    return set.intersection(*per_lr) if per_lr else set()


def _shared_seeds(ok: pd.DataFrame) -> pd.DataFrame:
    """Per setting, only the seeds that every (lr, norm options) of it ran with, or all of them where
    no seed is shared: a learning rate given more seeds later (the driver's ``--confirm-seeds``) is
    compared with the others on the same seeds, not by a mean over more of them."""
    kept = []
    for _, group in ok.groupby(SETTING, dropna=False, sort=False):
        shared = seeds_shared(group)
        kept.append(group[group["seed"].isin(shared)] if shared else group)
    return pd.concat(kept) if kept else ok


def pick_learning_rates(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting, the learning rate (and norm options, where several were tried) with the best
    mean validation accuracy over the seeds they share (``_shared_seeds``); a diverged run counts as
    0. Ties go to the smaller lr."""
    shared = _shared_seeds(_val_for_choice(runs))
    means = shared.groupby(SETTING + ["lr", "hparams"], as_index=False)["val_for_choice"].mean()
    best = means.sort_values(["val_for_choice", "lr"], ascending=[False, True]).groupby(SETTING, as_index=False).first()
    return best[SETTING + ["lr", "hparams"]]


def _ladder(lr: float) -> bool:
    """On the 1-3-10 ladder (0.001, 0.003, 0.01, ...), as the experiments' grids are."""
    mantissa = lr / 10 ** math.floor(math.log10(lr) + 1e-9)
    return math.isclose(mantissa, 1, rel_tol=0.02) or math.isclose(mantissa, 3, rel_tol=0.02)


def next_lr(lrs: list[float], up: bool) -> float:
    """One grid step beyond the edge of ``lrs``: the next 1-3-10 value if the grid is on that
    ladder, else the grid's own mean ratio (rounded to 3 significant digits)."""
    lrs = sorted(lrs)
    edge = lrs[-1] if up else lrs[0]
    if all(_ladder(x) for x in lrs):
        decade = 10 ** math.floor(math.log10(edge) + 1e-9)
        is_one = math.isclose(edge / decade, 1, rel_tol=0.02)
        new = (3 * decade if is_one else 10 * decade) if up else (0.3 * decade if is_one else decade)
    else:
        ratio = (lrs[-1] / lrs[0]) ** (1 / (len(lrs) - 1)) if len(lrs) > 1 else 3.0
        new = edge * ratio if up else edge / ratio
    return float(f"{new:.3g}")


BRACKETS = ("interior", "diverged-beyond", "capped", "edge", "single", "n/a")


def lr_bracket(runs: pd.DataFrame, lr: float, hparams: str, extensions: dict | None = None) -> str:
    """How a setting's chosen lr is bracketed by the lrs tried around it (one of BRACKETS):
    interior (a tried lr on each side that did not diverge everywhere), diverged-beyond (the lr
    on one side diverged in every seed), capped (at an edge after the driver's extension cap),
    edge (at an edge, not extended), single (one lr tried). ``extensions``: the driver's record
    for this setting, {"low": n, "high": n, "cap": cap}."""
    ok = _val_for_choice(runs[runs["hparams"] == hparams])
    lrs = sorted(ok["lr"].unique())
    if lr not in lrs:
        return "n/a"
    if len(lrs) == 1:
        return "single"
    i = lrs.index(lr)
    sides = {"low": lrs[i - 1] if i > 0 else None, "high": lrs[i + 1] if i + 1 < len(lrs) else None}
    for side, neighbour in sides.items():
        if neighbour is None:
            record = extensions or {}
            return "capped" if record.get(side, 0) >= record.get("cap", math.inf) else "edge"
    if any((ok[ok["lr"] == n]["status"] == "diverged").all() for n in sides.values()):
        return "diverged-beyond"
    return "interior"


def choices(runs: pd.DataFrame):
    """Per setting: its chosen row (pick_learning_rates), all of its runs, and its usable runs
    (completed or diverged) at the chosen norm options: what bracketing and its labels look at."""
    runs = _filled(runs)
    for _, chosen in pick_learning_rates(runs).iterrows():
        group = runs[(runs[SETTING] == chosen[SETTING]).all(axis=1)]
        yield chosen, group, _val_for_choice(group[group["hparams"] == chosen["hparams"]])


def setting_key(values) -> str:
    """The name of a setting in the bracketing record (``<sweep>/bracket.json``); an empty config
    adds nothing, so records from before the config column keep their names."""
    return "|".join(str(v) for v in values if not (isinstance(v, str) and v == ""))


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


def read_extensions(sweep_dir: Path) -> dict:
    """The driver's bracketing record (bnp.sweep), {setting_key: {"low": n, "high": n, "cap": cap}}."""
    path = Path(sweep_dir) / "bracket.json"
    return read_json(path) if path.exists() else {}


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
        (out / "bracket.json").write_text(json.dumps(extensions, indent=1, sort_keys=True) + "\n")
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(_markdown(table))
    (out / "table.tex").write_text(table.to_latex(index=False, escape=True))
    from bnp.provenance import relative

    runs.assign(run=[relative(r) for r in runs["run"]]).to_csv(out / "runs.csv", index=False)
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
