"""Every experiment's smoke variant runs end to end (sweep through the CLI, then its report)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import importlib.util

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_experiment_file_per_claim():
    """Each file runs the config of its own name, or names another experiment's (EXPERIMENT)."""
    assert {"mlp_batch_size", "online", "cnn", "resnet"} <= set(EXPERIMENTS)
    configs = {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")}
    assert {getattr(load(name), "EXPERIMENT", name) for name in EXPERIMENTS} <= configs


def run_smoke(name, out_root, results, *extra):
    """The experiment's smoke variant through its CLI, offline; fails with the run's output."""
    proc = subprocess.run(
        [sys.executable, f"experiments/{name}.py", "--smoke", *extra, "--out-root", str(out_root), "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


END_TO_END = {"quickstart"}  # the default suite runs this one (`make run`'s, the smallest); make test-all runs every one


@pytest.mark.parametrize("name", [n if n in END_TO_END else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXPERIMENTS])
def test_smoke_variant(name, tmp_path):
    results = tmp_path / "results"
    run_smoke(name, tmp_path, results)
    table = pd.read_csv(results / "table.csv")
    assert len(table) >= 2 and list(results.glob("*.png")) and list(results.glob("*.pdf"))
    provenance = (results / "PROVENANCE.md").read_text()
    assert f"python experiments/{name}.py" in provenance and "runs by the commit they ran at" in provenance
    if getattr(load(name), "GRIDS", None):  # the sweep driver's experiments (not hessian.py's own)
        assert "- sweep: `python -m bnp.train -m" in provenance and "(commit " in provenance
        check_a_later_report_keeps_earlier_invocations(name, tmp_path, results)
        check_another_machine_reports_from_the_archive(name, tmp_path, results)
    for summary in (tmp_path / "sweeps").glob("*/*/summary.json"):
        assert '"status": "completed"' in summary.read_text() or "not_applicable" in summary.read_text(), summary
    if name in END_TO_END:  # the default suite's pass of bracketing through the driver: 2 lrs, one edge extended
        extensions = json.loads((tmp_path / "sweeps" / f"{name}_smoke" / "bracket.json").read_text())
        assert extensions and all(e["low"] + e["high"] >= 1 for e in extensions.values()), extensions


def check_a_later_report_keeps_earlier_invocations(name, tmp_path, results):
    """A later invocation rewrites the report but keeps the earlier invocations' lines."""
    run_smoke(name, tmp_path, results, "--report-only")
    lines = (results / "PROVENANCE.md").read_text().splitlines()
    experiments = [line for line in lines if line.startswith("- experiment: ")]
    assert len(experiments) == 2 and "sweeps:" in experiments[0] and experiments[1].endswith("(report only)")
    assert lines.index(experiments[0]) > max(i for i, line in enumerate(lines) if line.startswith("- date: "))


def check_another_machine_reports_from_the_archive(name, tmp_path, results):
    """results/NAME/sweep.tar.gz alone (a fresh clone: no outputs/) makes the same table again."""
    copy = tmp_path / "clone_results"
    copy.mkdir()
    (copy / "sweep.tar.gz").write_bytes((results / "sweep.tar.gz").read_bytes())
    run_smoke(name, tmp_path / "clone_outputs", copy, "--restore", "--report-only")
    assert (copy / "table.csv").read_text() == (results / "table.csv").read_text()
    assert "- sweep: `python -m bnp.train -m" in (copy / "PROVENANCE.md").read_text()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_grid_point_is_a_valid_config(name, compose):
    """Each experiment's sweeps (full and smoke) compose and validate at every grid point."""
    from bnp.config import validate

    module = load(name)
    grids = [(g, getattr(module, "FIXED", [])) for g in getattr(module, "GRIDS", [])]
    grids += [(g, getattr(module, "SMOKE_FIXED", [])) for g in getattr(module, "SMOKE_GRIDS", [])]
    if not grids:  # an experiment with its own driver (hessian.py): its smoke variant is the check
        pytest.skip(f"experiments/{name}.py has no GRIDS; make test-all runs its smoke variant")
    for grid, fixed in grids:
        # each value of each key once, the other keys at their first value (composing every grid
        # point would take minutes); seeds and learning rates only change a number
        first = {k: v.split(",")[0] for k, v in grid.items()}
        points = {tuple({**first, k: value}.items()) for k, v in grid.items()
                  if k not in ("train.seed", "optim.lr") for value in v.split(",")}
        for point in sorted(points):
            validate(compose(f"experiment={getattr(module, 'EXPERIMENT', name)}", *fixed, *(f"{k}={v}" for k, v in point)))


def test_every_results_setting_is_declared_by_an_experiment_and_has_a_make_target():
    """An experiment file's SETTINGS name each results directory its sweeps fill; the Makefile's
    fig-<setting> targets run exactly those (python -m bnp.setting), with no arguments of their own."""
    from bnp.setting import declared

    settings = declared()
    archived = {p.parent.name for p in (ROOT / "results").glob("*/sweep.tar.gz")}
    assert archived <= set(settings), archived - set(settings)
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^fig-([a-z0-9-]+): setup ##", makefile, re.M)) - {"hessian"}
    assert targets | {"quickstart"} == set(settings)  # the quickstart is `make run`
    bodies = re.findall(r"^fig-([a-z0-9-]+): setup ##.*\n((?:\t.*\n)+)", makefile, re.M)
    assert {name: body for name, body in bodies if name != "hessian"} == {
        name: "\t$(SETTING_RUN) $(@:fig-%=%) $(ARGS)\n" for name in targets}


def test_a_setting_runs_with_its_declared_arguments(tmp_path):
    """--setting NAME expands to the setting's arguments and --name NAME (here: its smoke variant); the
    user's options and overrides follow the setting's own overrides."""
    proc = subprocess.run([sys.executable, "-m", "bnp.setting", "cnn-fc-b128-2ep", "--smoke", "--out-root", str(tmp_path),
                           "--results", str(tmp_path / "results"), "optim.momentum=0.5", "norm=bnp"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "sweeps" / "cnn-fc-b128-2ep_smoke").is_dir()
    overrides = " ".join(p.name for p in (tmp_path / "sweeps" / "cnn-fc-b128-2ep_smoke").iterdir())
    assert "model.head=fc" in overrides and "optim.momentum=0.5" in overrides and "norm=bnp" in overrides
    assert "model.head=gap" not in overrides and "norm=none" not in overrides  # the user's norm replaced the grid's
