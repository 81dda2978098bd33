"""bnp.report on a small real sweep: lr chosen by validation, statuses counted, files written."""

import math

import pandas as pd
import pytest

from bnp.config import ConfigError
from bnp.choice import pick_learning_rates
from bnp.report import comparison_table, main
from bnp.runs import load_runs, steps_to_target
from bnp.train import run
from conftest import TINY


def make_sweep(compose, root):
    base = [*TINY, "data=synthetic", "train.steps=20", "train.eval_every=5", "model.depth=1", "model.width=16"]
    for norm in ("none", "bnp", "bn"):
        for lr in (0.001, 0.03):
            for seed in (0, 1):
                cfg = compose(*base, f"norm={norm}", f"optim.lr={lr}", f"train.seed={seed}")
                run(cfg, root / f"{norm}-{lr}-{seed}", in_sweep=True)
    run(compose(*base, "norm=none", "optim.lr=1e9", "train.log_every=2"), root / "none-diverged", in_sweep=True)
    run(compose(*base, "norm=bn", "train.batch_size=1"), root / "bn-online", in_sweep=True)
    with pytest.raises(ConfigError):  # fails before training: still a row of the report
        run(compose(*base, "norm=bnp", "optim.lr=0.03", "norm.skip=[foo]"), root / "bnp-failed", in_sweep=True)


def test_report_tables_and_figures(compose, tmp_path):
    sweep = tmp_path / "sweep"
    make_sweep(compose, sweep)
    runs, curves = load_runs(sweep)
    assert len(runs) == 15 and set(runs["status"]) == {"completed", "diverged", "not_applicable", "failed"}

    chosen = pick_learning_rates(runs)
    for _, row in chosen.iterrows():
        cand = runs[(runs["norm"] == row["norm"]) & (runs["batch_size"] == row["batch_size"]) & (runs["status"] == "completed")]
        means = cand.groupby("lr")["best_val_acc"].mean()
        assert means[row["lr"]] == means.max()  # the fair-comparison rule

    table = comparison_table(runs, curves, target=0.5)
    by = {(r["norm"], r["batch_size"]): r for _, r in table.iterrows()}
    assert by[("none", 4)]["status"] == "4 completed, 1 diverged"
    assert by[("bn", 1)]["status"] == "1 not_applicable" and by[("bn", 1)]["lr"] == "n/a"
    assert by[("bnp", 4)]["seeds"] == 2 and "±" in by[("bnp", 4)]["test_acc"]
    assert by[("bnp", 4)]["status"] == "4 completed, 1 failed"

    out = tmp_path / "report"
    main([str(sweep), "--out", str(out), "--target", "0.5"])
    for name in ("table.md", "table.csv", "table.tex", "runs.csv", "curves.png", "curves.pdf",
                 "accuracy_vs_batch_size.png", "PROVENANCE.md"):
        assert (out / name).stat().st_size > 0, name
    csv = pd.read_csv(out / "table.csv")
    assert list(csv["norm"]).count("bn") == 2  # the not-applicable row is shown, not dropped
    assert "python -m bnp.report" in (out / "PROVENANCE.md").read_text()
    with open(out / "PROVENANCE.md", "a") as f:  # as an experiment driver appends its invocation
        f.write("- experiment: `python experiments/x.py`\n")
    main([str(sweep), "--out", str(out), "--target", "0.5"])  # a later report rewrites its own part only
    provenance = (out / "PROVENANCE.md").read_text()
    assert provenance.count("- report: ") == 1 and provenance.endswith("- experiment: `python experiments/x.py`\n")


def test_steps_to_target():
    rows = [{"step": 0, "val_acc": 0.1}, {"step": 5, "train_loss": 1.0}, {"step": 10, "val_acc": 0.8}]
    assert steps_to_target(rows, 0.5) == 10 and math.isnan(steps_to_target(rows, 0.9))


def test_experiment_overrides_replace_grid_values():
    from bnp.sweep import commands

    grids = [{"norm": "none,bn,bnp", "optim.lr": "0.1,0.3"}, {"norm": "none,bn,bnp", "train.batch_size": "1"}]
    cmds = commands("cnn", "cnn_x", grids, ["norm=none,bnp", "train.epochs=3"], "local", "outputs")
    assert [c[c.index("train.epochs=3") + 1 :] for c in cmds] == [
        ["norm=none,bnp", "optim.lr=0.1,0.3"], ["norm=none,bnp", "train.batch_size=1"]
    ]
    assert all(c.count("norm=none,bnp") == 1 for c in cmds)
    # a key only some grids have reaches the others too, as any other override
    cmds = commands("cnn", "cnn_x", grids, ["train.batch_size=8"], "local", "outputs")
    assert [c[c.index("out_root=outputs") + 1 :] for c in cmds] == [
        ["train.batch_size=8", "norm=none,bn,bnp", "optim.lr=0.1,0.3"], ["norm=none,bn,bnp", "train.batch_size=8"]
    ]


def test_learning_rate_is_chosen_on_the_seeds_every_lr_shares():
    """Seeds added later at one lr (the driver's --confirm-seeds) must not win it the choice: the
    lrs are compared on the seeds they all ran with; the table then shows all the chosen lr's seeds."""
    def row(norm, lr, seed, acc, status="completed"):
        return {"data": "d", "model": "m", "norm": norm, "batch_size": 8, "optim": "sgd", "lr": lr, "hparams": "",
                "seed": seed, "status": status, "best_val_acc": acc}

    runs = pd.DataFrame([row("bnp", 0.01, 0, 0.80), row("bnp", 0.03, 0, 0.78),
                         row("bnp", 0.03, 1, 0.95), row("bnp", 0.03, 2, 0.95),  # mean 0.89 > 0.80, but not on seed 0
                         row("bn", 0.01, 0, 0.70), row("bn", 0.03, 1, 0.75),  # no shared seed: all of them count
                         # a failed run is not a seed that ran: the lrs share seed 0 only (0.80 > 0.70)
                         row("ln", 0.01, 0, 0.70), row("ln", 0.01, 1, 0.95), row("ln", 0.03, 0, 0.80),
                         row("ln", 0.03, 1, 0.0, "failed"),
                         # a diverged run is a seed that ran (as 0): the lrs share seeds 0 and 1 (0.825 > 0.40)
                         row("gn", 0.01, 0, 0.70), row("gn", 0.01, 1, 0.95), row("gn", 0.03, 0, 0.80),
                         row("gn", 0.03, 1, 0.0, "diverged")])
    chosen = pick_learning_rates(runs).set_index("norm")["lr"]
    assert chosen.to_dict() == {"bnp": 0.01, "bn": 0.03, "ln": 0.03, "gn": 0.01}
    runs["hparams"] = float("nan")  # as pd.read_csv gives an empty column
    assert pick_learning_rates(runs).set_index("norm")["lr"].to_dict() == chosen.to_dict()
    metrics = {k: runs["best_val_acc"] for k in ("final_test_acc", "final_train_loss", "prequential_acc", "wall_time_s")}
    table = comparison_table(runs.assign(hparams="", config="", run=runs.index.astype(str), **metrics), {},
                             0.9).set_index("norm")
    assert table["chosen_on"].to_dict() == {"bnp": 1, "bn": 1, "ln": 1, "gn": 2}  # the seeds the choice saw


def test_provenance_names_the_checkouts_paths_relative_to_it():
    from bnp.provenance import ROOT, relative

    command = f"python -m bnp.train -m out_root={ROOT}/outputs name=x --results {ROOT}/results/x --cwd {ROOT}"
    assert relative(command) == "python -m bnp.train -m out_root=outputs name=x --results results/x --cwd ."
    assert relative("out_root=/tmp/elsewhere") == "out_root=/tmp/elsewhere"  # other places stay as they are
    # a second work tree's project folders read as this one's
    assert relative("out_root=/srv/wt/outputs x=/srv/wt/results/a 'y=/a/b/outputs/s'") == \
        "out_root=outputs x=results/a 'y=outputs/s'"
    assert relative("data=/srv/outputs_old/x") == "data=/srv/outputs_old/x"


def test_preconditioner_comparison_finds_each_models_step_time_and_dominance():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "compare_preconditioners.py"
    spec = importlib.util.spec_from_file_location("compare_preconditioners", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = pd.DataFrame([
        {"model": model, "batch_size": 128, "norm": norm, "optim": optim, "lr": 0.1, "lr_bracket": "interior",
         "seeds": 3, "chosen_on": 3, "test_acc": acc}
        for model in ("mlp 3x256", "cnn-fc 16-32", "cnn-fc 32-64-128")
        for norm, optim, acc in (("none", "sgd", "0.80 ± 0.01"), ("bnp", "sgd", "0.85 ± 0.01"),
                                 ("none", "shampoo", "0.84 ± 0.01"))])
    bench = pd.DataFrame([
        {"model": model, "batch": 128, "method": method, "ratio": ratio}
        for model, ratios in (("MLP 784-256-256-256-10", (1.0, 1.3, 67.0)), ("CNN-fc 16-16-32-32, 1x28x28", (1.0, 1.1, 14.0)))
        for method, ratio in zip(("sgd", "sgd+bnp", "shampoo"), ratios)])
    frame = module.comparison(table, bench).set_index(["model", "method"])
    assert frame.loc[("cnn-fc 16-32", "sgd+bnp"), "step_time_ratio"] == 1.1
    assert frame.loc[("mlp 3x256", "shampoo"), "step_time_ratio"] == 67.0
    assert frame.loc[("cnn-fc 16-32", "sgd+bnp"), "vs_sgd"] == "+5.0"
    assert frame.loc[("cnn-fc 16-32", "shampoo"), "dominated_by"] == "sgd+bnp"  # less accurate at 13x the cost
    assert frame.loc[("cnn-fc 16-32", "sgd+bnp"), "dominated_by"] == ""
    assert math.isnan(frame.loc[("cnn-fc 32-64-128", "sgd+bnp"), "step_time_ratio"])  # another CNN: not benchmarked


def test_preconditioner_comparison_borrows_rows_trained_in_another_setting(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "compare_preconditioners.py"
    spec = importlib.util.spec_from_file_location("compare_preconditioners", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "cnn").mkdir()
    rows = [("cnn-fc 16-32", norm, optim, acc) for norm, optim, acc in
            (("none", "sgd", "0.80 ± 0.01"), ("bnp", "sgd", "0.85 ± 0.01"), ("bn", "sgd", "0.86 ± 0.01"),
             ("none", "adam", "0.70 ± 0.01"))]
    pd.DataFrame([{"model": m, "batch_size": 128, "norm": n, "optim": o, "lr": 0.1, "lr_bracket": "interior",
                   "seeds": 3, "chosen_on": 3, "test_acc": a} for m, n, o, a in rows]).to_csv(tmp_path / "cnn" / "table.csv",
                                                                                           index=False)
    got = module.borrowed(tmp_path, {"cnn": ("cnn-fc 16-32", ["none", "bnp"])}, ["mlp 3x256", "cnn-fc 16-32"])
    assert sorted(got["norm"]) == ["bnp", "none"] and set(got["source"]) == {"cnn"}  # sgd only, the norms named
    # a comparison without that model (the smoke run's) borrows nothing, and reads nothing: no such setting here
    assert module.borrowed(tmp_path, {"absent": ("cnn-fc 16-32", ["none"])}, ["mlp 3x16"]).empty
    with pytest.raises(SystemExit, match="absent/table.csv is missing"):
        module.borrowed(tmp_path, {"absent": ("cnn-fc 16-32", ["none"])}, ["cnn-fc 16-32"])
    twice = pd.concat([got, got])
    with pytest.raises(ValueError, match="two rows for one method"):
        module.comparison(twice, pd.DataFrame(columns=["model", "batch", "method", "ratio"]))

