"""The fair-comparison rule and its bracketing record.

Within each setting (bnp.runs), the learning rate with the best mean validation accuracy wins,
over the seeds every learning rate of the setting ran with (where some have more); a diverged run
counts as 0, ties go to the smaller lr. ``lr_bracket`` says how the choice is bracketed by the lrs
tried around it; ``next_lr`` is the lr one grid step beyond an edge, which the sweep driver
(bnp.sweep) runs. Its record, ``<sweep dir>/bracket.json``, is
``{setting_key: {"low": n, "high": n, "cap": cap}}``: the extensions made below and above each
setting's grid and the cap they ran under; ``read_extensions`` / ``write_extensions`` are its
one reader and writer (bnp.archive merges two records by the larger count on each side).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bnp.log import read_json
from bnp.runs import LEGACY_NORMS, SETTING, _filled


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


BRACKET = "bracket.json"  # the bracketing record's file name, in a sweep directory and beside a report


def read_extensions(sweep_dir: Path) -> dict:
    """The driver's bracketing record (bnp.sweep), {setting_key: {"low": n, "high": n, "cap": cap}}."""
    path = Path(sweep_dir) / BRACKET
    records = read_json(path) if path.exists() else {}
    return {_current_key(key): record for key, record in records.items()}


def _current_key(key: str) -> str:
    """A record's setting key with an earlier norm variant's name in today's (runs.LEGACY_NORMS)."""
    parts = key.split("|")
    if len(parts) > 2 and parts[2] in LEGACY_NORMS:
        parts[2] = LEGACY_NORMS[parts[2]]
    return "|".join(parts)


def write_extensions(directory: Path, extensions: dict) -> None:
    (Path(directory) / BRACKET).write_text(json.dumps(extensions, indent=1, sort_keys=True) + "\n")
