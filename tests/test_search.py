"""Learning-rate bracketing in the experiment driver, and the Optuna sweeper: both on tiny runs."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bnp.choice import lr_bracket, next_lr

ROOT = Path(__file__).resolve().parent.parent
ENV = {"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
TINY_RUN = ["data=synthetic", "logger=none", "train.steps=2", "train.eval_every=2", "train.log_every=1",
            "model.depth=1", "model.width=8", "train.batch_size=16", "train.threads=1"]


def test_next_lr_follows_the_grid():
    assert next_lr([0.01, 0.03, 0.1, 0.3], up=True) == 1.0
    assert next_lr([0.01, 0.03, 0.1, 0.3], up=False) == 0.003
    assert next_lr([0.001, 0.003], up=False) == 0.0003
    assert next_lr([0.02, 0.04, 0.08], up=True) == 0.16  # off the 1-3-10 ladder: the grid's own ratio
    assert next_lr([0.02, 0.04, 0.08], up=False) == 0.01


def frame(rows):
    return pd.DataFrame([{"lr": lr, "hparams": "", "status": st, "best_val_acc": acc} for lr, st, acc in rows])


def test_bracket_labels():
    runs = frame([(0.01, "completed", 0.5), (0.03, "completed", 0.7), (0.1, "completed", 0.6)])
    assert lr_bracket(runs, 0.03, "") == "interior"
    assert lr_bracket(runs, 0.1, "") == "edge"
    assert lr_bracket(runs, 0.1, "", {"high": 3, "low": 0, "cap": 3}) == "capped"
    assert lr_bracket(frame([(0.1, "completed", 0.6)]), 0.1, "") == "single"
    diverged = frame([(0.01, "completed", 0.5), (0.03, "completed", 0.7), (0.1, "diverged", 0.0)])
    assert lr_bracket(diverged, 0.03, "") == "diverged-beyond"


def sweep_frame(rows):
    """A sweep's runs as bnp.runs.load_runs gives them, from (lr, seed, status, best_val_acc)."""
    return pd.DataFrame([{"data": "d", "model": "m", "norm": "bnp", "batch_size": 8, "optim": "sgd", "lr": lr,
                          "hparams": "", "seed": seed, "status": st, "best_val_acc": acc,
                          "overrides": f"experiment=x norm=bnp optim.lr={lr} train.seed={seed} model.width=[2,3]"}
                         for lr, seed, st, acc in rows])


def planned(rows, extensions=None, cap=3):
    from bnp.sweep import plan_extensions

    return plan_extensions(sweep_frame(rows), extensions or {}, cap)


def test_extensions_go_one_grid_step_beyond_the_winning_edge_with_the_same_seeds():
    rows = [(lr, seed, "completed", acc + 0.01 * seed) for lr, acc in ((0.01, 0.5), (0.03, 0.6), (0.1, 0.7))
            for seed in (0, 1)]
    [(key, side, overrides)] = planned(rows)
    assert (key, side) == ("d|m|bnp|8|sgd", "high")
    assert overrides == ["experiment=x", "norm=bnp", "model.width=[2,3]", "optim.lr=0.3", "train.seed=0,1"]
    assert planned(rows, {"d|m|bnp|8|sgd": {"low": 0, "high": 3}}) == []  # capped
    assert planned(rows + [(0.3, 0, "diverged", 0.0), (0.3, 1, "diverged", 0.0)]) == []  # diverged-beyond
    assert planned([(0.01, 0, "completed", 0.5)]) == []  # a single lr is not a grid
    everything_diverged = [(lr, 0, "diverged", 0.0) for lr in (0.01, 0.03)]
    assert planned(everything_diverged)[0][2][-2] == "optim.lr=0.003"  # ties go down


def test_new_runs_of_a_merged_setting_go_into_its_sweep_not_their_earlier_ones(tmp_path):
    """A setting's runs may come from sweeps of other names (merged from its archive): repeating one
    at another lr or seed runs it into the setting's own sweep directory."""
    from bnp.sweep import _into

    earlier = ["experiment=resnet", "name=resnet_variants_6ep", "out_root=outputs", "norm=gn", "optim.lr=0.3",
               "train.seed=0"]
    assert _into(ROOT / "outputs" / "sweeps" / "resnet20-b128-6ep", earlier) == [
        "experiment=resnet", "norm=gn", "optim.lr=0.3", "train.seed=0", "name=resnet20-b128-6ep", "out_root=outputs"]
    assert _into(tmp_path / "sweeps" / "s", earlier)[-2:] == ["name=s", f"out_root={tmp_path}"]
    # how the new runs execute comes from the invocation that repeats them, not from the earlier runs
    earlier = ["experiment=cnn", "launcher=basic", "++train.threads=4", "train.device=cuda", "norm=bn", "optim.lr=0.1",
               "train.seed=1,2"]
    assert _into(tmp_path / "sweeps" / "s", earlier, ["launcher=local", "train.threads=1"]) == [
        "experiment=cnn", "norm=bn", "optim.lr=0.1", "train.seed=1,2", "launcher=local", "train.threads=1", "name=s",
        f"out_root={tmp_path}"]


@pytest.mark.slow  # ~90 s of Hydra launches; the quickstart's smoke test brackets through the driver too
def test_driver_extends_edge_learning_rates_until_bracketed(tmp_path):
    """Through the experiment driver: the extensions run, are recorded, reported and not rerun."""
    code = (
        "import sys; from bnp.sweep import run_experiment\n"
        "run_experiment('quickstart', [{'norm': 'none', 'optim.lr': '0.0001,0.0003', 'train.seed': '0'}],"
        f" fixed={TINY_RUN!r}, argv=sys.argv[1:])\n"
    )
    argv = [sys.executable, "-c", code, "--launcher", "basic", "--out-root", str(tmp_path), "--results",
            str(tmp_path / "res"), "--bracket-cap", "2", "--suffix", "br"]
    first = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    sweep = tmp_path / "sweeps" / "quickstart_br"
    [record] = json.loads((sweep / "bracket.json").read_text()).values()
    made = record["low"] + record["high"]
    assert 1 <= made and record["low"] <= 2 and record["high"] <= 2 and record["cap"] == 2
    runs = pd.read_csv(tmp_path / "res" / "runs.csv")
    lrs = sorted(runs["lr"])
    assert len(lrs) == 2 + made and {0.0001, 0.0003} <= set(lrs)
    assert runs["commit"].notna().all() and runs["overrides"].str.contains("optim.lr=").all()
    table = pd.read_csv(tmp_path / "res" / "table.csv")
    label, lr = table["lr_bracket"].iloc[0], table["lr"].iloc[0]
    assert label in ("interior", "capped", "diverged-beyond")
    assert (label == "capped") == (lr in (lrs[0], lrs[-1]))
    assert ("**" in (tmp_path / "res" / "table.md").read_text()) == (label != "interior")
    assert json.loads((tmp_path / "res" / "bracket.json").read_text()) == json.loads((sweep / "bracket.json").read_text())
    provenance = (tmp_path / "res" / "PROVENANCE.md").read_text()
    assert provenance.count("- sweep: `python -m bnp.train -m") == 1 + made  # the grid and each extension
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and "bracketing" not in again.stdout
    assert len(pd.read_csv(tmp_path / "res" / "runs.csv")) == 2 + made
    cli = subprocess.run([sys.executable, "-m", "bnp.sweep", str(sweep)], cwd=ROOT, capture_output=True, text=True,
                         env=ENV, timeout=600)  # the same bracketing for any sweep: nothing left to do
    assert cli.returncode == 0 and "bracketing" not in cli.stdout and f"done: {made} lr extensions" in cli.stdout, cli.stderr


@pytest.mark.parametrize("args, message", [(["missing"], "sweep_dir: "), (["empty", "--cap", "0"], "--cap: "),
                                           (["empty"], "sweep_dir: no runs"),
                                           (["empty", "--parallel", "0"], "--parallel: ")])
def test_bracketing_cli_names_the_bad_argument(tmp_path, capsys, args, message):
    from bnp.sweep import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / args[0]), *args[1:]])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_optuna_study_on_digits_resumes_and_reports_the_best_trial(tmp_path):
    cmd = [sys.executable, "-m", "bnp.train", "-m", "sweeper=optuna_bnp", "norm=bnp", "name=study",
           f"out_root={tmp_path}", "hydra.sweeper.n_trials=4", *TINY_RUN, "data=digits"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    sweep = tmp_path / "sweeps" / "study"
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(s["best_val_acc"] for s in summaries)
    # the same command proposes the same trials (seeded sampler): every one is skipped
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("skipped") == 4
    assert len(list(sweep.glob("*/summary.json"))) == 4

    from bnp.report import main

    main([str(sweep), "--out", str(tmp_path / "rep")])
    row = pd.read_csv(tmp_path / "rep" / "table.csv").iloc[0]
    assert row["lr"] == pytest.approx(best["best_params"]["optim.lr"])
    assert f"eps={best['best_params']['norm.eps']}" in row["hparams"]


def confirmations(rows, seeds):
    from bnp.sweep import plan_confirmations

    return plan_confirmations(sweep_frame(rows), seeds)


def test_confirmation_runs_the_missing_seeds_at_the_chosen_lr_only():
    from bnp.sweep import plan_confirmations

    screened = [(0.01, 0, "completed", 0.5), (0.03, 0, "completed", 0.7), (0.1, 0, "diverged", 0.0)]
    [(key, overrides)] = confirmations(screened, [0, 1, 2])
    assert key == "d|m|bnp|8|sgd"
    assert overrides == ["experiment=x", "norm=bnp", "model.width=[2,3]", "optim.lr=0.03", "train.seed=1,2"]
    # a much worse seed 1 (mean 0.45 < 0.5 at 0.01) does not move the choice; the failed seed 2 runs again
    confirmed = screened + [(0.03, 1, "completed", 0.2), (0.03, 2, "failed", 0.0)]
    assert confirmations(confirmed, [0, 1, 2])[0][1][-2:] == ["optim.lr=0.03", "train.seed=2"]
    assert confirmations(confirmed + [(0.03, 2, "completed", 0.6)], [0, 1, 2]) == []
    assert confirmations([(0.01, 0, "completed", 0.5), (0.03, 1, "completed", 0.7)], [0, 1]) == []  # no shared seed
    # after confirming, a later extension is screened on the shared seed only, and never as an Optuna study
    edge = [(0.01, 0, "completed", 0.5), (0.03, 0, "completed", 0.7), (0.03, 1, "completed", 0.7)]
    [(_, side, overrides)] = planned(edge)
    assert side == "high" and overrides[-2:] == ["optim.lr=0.1", "train.seed=0"]
    optuna = sweep_frame(screened)
    optuna["overrides"] = "sweeper=optuna norm=bnp optim.lr=0.0312345678901 train.seed=0"
    [(_, overrides)] = plan_confirmations(optuna, [0, 1])
    assert overrides == ["norm=bnp", "optim.lr=0.0312345678901", "train.seed=1"]  # the lr exactly as it ran


def test_all_seeds_runs_the_missing_seeds_at_every_lr_tried():
    from bnp.sweep import plan_confirmations

    screened = [(0.01, 0, "completed", 0.5), (0.03, 0, "completed", 0.7), (0.1, 0, "diverged", 0.0),
                (0.03, 1, "completed", 0.6), (0.01, 2, "failed", 0.0)]
    plans = plan_confirmations(sweep_frame(screened), [0, 1, 2], every_lr=True)
    assert [overrides[-2:] for _, overrides in plans] == [["optim.lr=0.01", "train.seed=1,2"],
                                                         ["optim.lr=0.03", "train.seed=2"],
                                                         ["optim.lr=0.1", "train.seed=1,2"]]
    done = [(lr, seed, "completed", 0.5) for lr in (0.01, 0.03, 0.1) for seed in (0, 1, 2)]
    assert plan_confirmations(sweep_frame(done), [0, 1, 2], every_lr=True) == []


@pytest.mark.parametrize("text", ["0,x", "0,0", "", "-1,2"])
def test_confirm_seeds_names_the_bad_value(text):
    import argparse

    from bnp.sweep import parse_seeds

    with pytest.raises(argparse.ArgumentTypeError, match="seeds"):
        parse_seeds(text)


def test_driver_confirms_the_chosen_lr_with_more_seeds(tmp_path):
    """Through the experiment driver: screen two lrs on seed 0, then --confirm-seeds 0,1 runs seed 1 at
    the chosen lr only; the table reports both seeds; a rerun has nothing left to do."""
    code = (
        "import sys; from bnp.sweep import run_experiment\n"
        "run_experiment('quickstart', [{'norm': 'none', 'optim.lr': '0.0001,0.1', 'train.seed': '0'}],"
        f" fixed={TINY_RUN!r}, argv=sys.argv[1:])\n"
    )
    argv = [sys.executable, "-c", code, "--launcher", "basic", "--out-root", str(tmp_path), "--results",
            str(tmp_path / "res"), "--bracket-cap", "0", "--suffix", "conf", "--confirm-seeds", "0,1"]
    first = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "confirming 1/1" in first.stdout
    runs = pd.read_csv(tmp_path / "res" / "runs.csv")
    table = pd.read_csv(tmp_path / "res" / "table.csv").iloc[0]
    assert sorted(runs[runs["lr"] == table["lr"]]["seed"]) == [0, 1] and len(runs) == 3
    assert table["seeds"] == 2 and "±" in table["test_acc"]
    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and "confirming" not in again.stdout
    assert len(pd.read_csv(tmp_path / "res" / "runs.csv")) == 3
    bad = subprocess.run([*argv[:-1], "0,one"], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert bad.returncode == 2 and "--confirm-seeds" in bad.stderr
