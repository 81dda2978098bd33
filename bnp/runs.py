"""A sweep's runs as one table: ``load_runs(SWEEP_DIR)`` reads every run directory's files
(``config.yaml``, ``summary.json``, ``metrics.jsonl``), never the W&B API, so it works offline and on
a laptop after a cluster sweep.

A setting is data, model, method (the norm, or its variant, plus its gradient rules: ``bnp+agc``),
batch size and optimizer, plus every other config value that differs among those runs (the
``config`` column, e.g. ``optim.momentum=0.9,train.steps=600``), except the lr, the seed, the norm's
and rules' options (``hparams``: chosen between like lrs) and values that do not change what is
trained (``NOT_SETTING``: threads, device, logging, paths). Two runs of the same config and seed
count once: the finished one, or of two finished ones the later (a warning names both). A run whose
files cannot be read is listed and counted as ``damaged``.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

import pandas as pd
import yaml

from bnp.log import FINISHED, OVERRIDES, Unreadable, read_metrics, read_summary


SETTING = ["data", "model", "norm", "batch_size", "optim", "config"]


# config values that do not change what a run trains: they never split a setting
NOT_SETTING = ("optim.lr", "train.seed", "train.rerun", "train.threads", "train.verbose", "train.device",
               "train.cuda_graph", "train.compile", "train.diagnostics", "train.log_every", "train.eval_batch_size",
               "name", "out_root", "data.root", "data.download", "logger.", "norm.", "grad.")


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


# norm variants of earlier runs that are now a norm plus gradient rules (configs/grad): read under the new names
LEGACY_NORMS = {"bnp_agc": "bnp+agc", "agc": "none+agc", "bnp_lars": "bnp+lars", "lars": "none+lars",
                "bnp_outscale": "bnp+outscale"}


def _hparams(cfg: dict) -> str:
    """The norm's and the gradient rules' options that differ from their defaults (BNP's eps,
    momentum, variant options; e.g. agc.clip): runs that differ here are different configurations
    of one method, chosen between like lrs."""
    from bnp.config import NormConfig

    norm_cfg, legacy = cfg["norm"], cfg["norm"].get("variant") in LEGACY_NORMS
    defaults = NormConfig().__dict__
    # a legacy rule without BNP was BNP with centering and scaling off: that is its label now
    keep = {k: v for k, v in norm_cfg.items() if k not in ("kind", "variant", "fast") and k in defaults
            and v != defaults[k] and not (legacy and k in ("center", "scale"))}
    for rule, options in (cfg.get("grad") or {}).items():
        if options is not None:
            default = _rule_defaults(rule)
            keep.update({f"{rule}.{k}": v for k, v in options.items() if v != default.get(k)})
    return ",".join(f"{k}={v}" for k, v in sorted(keep.items()))


def _rule_defaults(rule: str) -> dict:
    from bnp import config

    return {"outscale": config.OutScaleConfig, "agc": config.AGCConfig, "lars": config.LARSConfig}[rule]().__dict__


def method_label(cfg: dict) -> str:
    """The table's name of a run's method: the norm (or its variant), then its gradient rules,
    e.g. ``bnp+agc``; earlier runs' variant names are mapped (LEGACY_NORMS)."""
    from bnp.rules import RULE_ORDER

    norm = cfg["norm"].get("variant") or cfg["norm"]["kind"]
    if norm in LEGACY_NORMS:
        return LEGACY_NORMS[norm]
    grad = cfg.get("grad") or {}
    return "+".join([norm, *(rule for rule in RULE_ORDER if grad.get(rule) is not None)])


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
            "run": str(run_dir), "data": cfg["data"]["name"], "model": model, "norm": method_label(cfg),
            "batch_size": cfg["train"]["batch_size"], "optim": cfg["optim"]["name"], "lr": cfg["optim"]["lr"],
            "hparams": _hparams(cfg), "seed": cfg["train"]["seed"], "status": summary.get("status", "unknown"),
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


def _filled(runs: pd.DataFrame) -> pd.DataFrame:
    """``hparams`` and ``config`` as strings: a runs.csv read back has NaN for none (and older ones
    have no config column)."""
    return runs.assign(**{c: runs[c].astype(object).fillna("") if c in runs else "" for c in ("hparams", "config")})
