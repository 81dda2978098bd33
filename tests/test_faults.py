"""Fault injection: nothing finished is lost, and a resumed run ends with the metrics of an
uninterrupted one. Runs are killed by SIGKILL at a step (triggered by the run's progress, never by a
clock) or in the middle of writing a checkpoint; files are torn or deleted; bad commands meet
finished and running runs; reports meet mixed configurations; the library is called out of order.
Every training run here is a healthy one (the MLP on digits learns to > 80% validation accuracy)."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP
from bnp.precondition.covariance import FullCovariance
from bnp.archive import save
from bnp.config import ConfigError
from bnp.log import read_json, read_metrics
from bnp.report import comparison_table, report
from bnp.runs import load_runs
from bnp.train import RunLocked, run, slug
from conftest import CONFIGS, ROOT, cli, wandb_history

# checkpoints (evaluations) at steps 0, 100, 200, 300; train rows every 50 steps
HEALTHY = ["model.width=32", "norm=none", "optim.lr=0.05", "train.batch_size=16", "train.steps=300",
           "train.eval_every=100", "train.log_every=50", "train.device=cpu"]

FAULT_SCRIPT = """
import json, os, signal, sys
import torch
from hydra import compose, initialize_config_dir
import bnp.train
spec = json.loads(sys.argv[1])
with initialize_config_dir(config_dir=spec["configs"], version_base="1.3"):
    cfg = compose(config_name="config", overrides=spec["overrides"])
real_save, saves = torch.save, []
def torn_save(obj, path, *args, **kwargs):  # the n-th checkpoint write stops halfway: the process dies
    saves.append(path)
    real_save(obj, path, *args, **kwargs)
    if len(saves) == spec.get("die_in_save"):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn_save
def progress(trainer):
    if spec.get("kill_at") is not None and trainer.step >= spec["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
bnp.train.run(cfg, spec["run_dir"], progress=progress)
"""


def train(run_dir: Path, overrides: list[str], kill_at: int | None = None, die_in_save: int | None = None,
          wandb: bool = False) -> subprocess.CompletedProcess:
    """One run in a fresh process (each process alike, so float results compare bit for bit)."""
    spec = {"configs": str(CONFIGS), "run_dir": str(run_dir), "kill_at": kill_at, "die_in_save": die_in_save,
            "overrides": [*overrides, "logger=wandb" if wandb else "logger=none"]}
    env = {**os.environ, "WANDB_MODE": "offline" if wandb else "disabled"}
    return subprocess.run([sys.executable, "-c", FAULT_SCRIPT, json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def rows(run_dir: Path) -> list[dict]:
    """The metric rows without the one machine-dependent field."""
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(run_dir / "metrics.jsonl")]


RESULTS = ("status", "steps", "final_train_loss", "final_val_loss", "final_val_acc", "final_test_acc", "best_val_acc",
           "test_acc_at_best_val", "prequential_acc")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed one must equal."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = train(run_dir, HEALTHY)
    assert done.returncode == 0, done.stderr
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "completed" and summary["final_val_acc"] > 0.8, summary  # it learned
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert (run_dir / "metrics.jsonl").read_bytes().count(b"\0") == 0
    assert rows(run_dir) == rows(reference)
    a, b = read_json(reference / "summary.json"), read_json(run_dir / "summary.json")
    assert {k: a[k] for k in RESULTS} == {k: b[k] for k in RESULTS}


# ------------------------------------------------------------------ kills and resumes
@pytest.mark.parametrize("kill_at", [0, pytest.param(50, marks=pytest.mark.slow), 150])
def test_killed_anywhere_resumes_to_the_uninterrupted_metrics(tmp_path, reference, kill_at):
    """Killed after the step-0 evaluation (before any train step), before the first evaluation's
    checkpoint (only step 0's exists), and between two checkpoints."""
    run_dir = tmp_path / "run"
    victim = train(run_dir, HEALTHY, kill_at=kill_at)
    assert victim.returncode == -signal.SIGKILL and not (run_dir / "summary.json").exists()
    assert (run_dir / "checkpoint.pt").exists()  # written before the first train step
    assert train(run_dir, HEALTHY).returncode == 0
    assert_same_run(run_dir, reference)


def test_without_a_checkpoint_the_rerun_starts_its_metrics_over(tmp_path, reference):
    run_dir = tmp_path / "run"
    assert train(run_dir, HEALTHY, kill_at=50).returncode == -signal.SIGKILL
    (run_dir / "checkpoint.pt").unlink()  # e.g. a run killed by an older version, before any checkpoint
    assert train(run_dir, HEALTHY).returncode == 0
    assert_same_run(run_dir, reference)  # no rows of the killed attempt are left


def test_killed_while_writing_a_checkpoint(tmp_path, reference):
    """Dies halfway through writing the step-100 checkpoint: the torn file is the temporary one,
    the step-0 checkpoint stays whole, and the resumed run loses nothing."""
    run_dir = tmp_path / "run"
    victim = train(run_dir, HEALTHY, die_in_save=2)  # checkpoint writes: step 0, step 100 (torn)
    assert victim.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoint.tmp").exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["progress"]["step"] == 0
    assert train(run_dir, HEALTHY).returncode == 0
    assert_same_run(run_dir, reference)


def test_deleted_metrics_start_the_run_over_instead_of_padding_the_file(tmp_path, reference):
    run_dir = tmp_path / "run"
    assert train(run_dir, HEALTHY, kill_at=150).returncode == -signal.SIGKILL
    (run_dir / "metrics.jsonl").unlink()  # the checkpoint at step 100 counts on rows that are gone
    again = train(run_dir, HEALTHY)
    assert again.returncode == 0 and "metrics.jsonl holds 0 bytes" in again.stderr and "starting the run over" \
        in again.stderr, again.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("checkpoint", ["kept", "deleted"])
def test_divergence_is_caught_after_a_resume(tmp_path, checkpoint):
    """The divergence rule compares with the untrained model's loss, which a resume must not lose:
    plain SGD at lr 100 blows up to a finite 1e20+ loss within 40 steps."""
    blowup = ["model.width=32", "norm=none", "optim.lr=100", "train.steps=300", "train.log_every=20",
              "train.eval_every=300", "train.device=cpu"]
    run_dir = tmp_path / "run"
    assert train(run_dir, blowup, kill_at=0).returncode == -signal.SIGKILL  # after the step-0 evaluation
    if checkpoint == "deleted":
        (run_dir / "checkpoint.pt").unlink()
    assert train(run_dir, blowup).returncode == 0
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "diverged" and "untrained model's validation loss" in summary["reason"], summary


def test_a_checkpoint_without_the_divergence_baseline_takes_it_from_the_metrics(tmp_path):
    """Checkpoints written before the divergence rule lack the untrained model's loss; the step-0
    row of metrics.jsonl has it, so the rule stays on after resuming from such a checkpoint."""
    blowup = ["model.width=32", "norm=none", "optim.lr=100", "train.steps=300", "train.log_every=20",
              "train.eval_every=1", "train.device=cpu"]  # the loss is 244 at step 2
    run_dir = tmp_path / "run"
    assert train(run_dir, blowup, kill_at=1).returncode == -signal.SIGKILL  # after the step-1 checkpoint
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert state["progress"]["step"] == 1
    del state["progress"]["initial_loss"]
    torch.save(state, run_dir / "checkpoint.pt")
    assert train(run_dir, blowup).returncode == 0
    summary = read_json(run_dir / "summary.json")
    assert summary["status"] == "diverged" and "untrained model's validation loss" in summary["reason"], summary


def test_wandb_receives_every_row_of_a_run_resumed_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    assert train(run_dir, HEALTHY, kill_at=150, wandb=True).returncode == -signal.SIGKILL
    done = train(run_dir, HEALTHY, wandb=True)
    assert done.returncode == 0, done.stderr
    sessions = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(sessions) == 2 and len({f.name for f in sessions}) == 1  # one W&B run id, two sessions
    history = wandb_history(sessions[-1])  # the resumed session alone holds the whole run
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in row.items():
            if key != "step" and value is not None:
                assert history[row["step"]][key] == pytest.approx(value), (row["step"], key)


# ------------------------------------------------------------------ torn files
def test_a_torn_summary_is_an_unfinished_run(tmp_path, reference, compose):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    summary = run_dir / "summary.json"
    summary.write_text(summary.read_text()[:40])  # cut mid-write
    again = train(run_dir, HEALTHY)
    assert again.returncode == 0 and f"{summary}: not valid JSON" in again.stderr, again.stderr
    assert_same_run(run_dir, reference)  # resumed from the last checkpoint: the summary is whole again
    summary.write_text(summary.read_text()[:40])
    redone = run(compose(*HEALTHY, "logger=none", "train.rerun=true"), run_dir)
    assert redone["status"] == "completed"


def test_reports_and_archives_list_damaged_runs_and_keep_the_others(tmp_path, compose, capsys):
    sweep = tmp_path / "sweep"
    for lr in (0.03, 0.1):
        run(compose(*HEALTHY, "logger=none", "train.steps=100", f"optim.lr={lr}"), sweep / f"lr={lr}")
    torn = sweep / "lr=0.1" / "summary.json"
    torn.write_text(torn.read_text()[:30])
    (sweep / "bad").mkdir()
    (sweep / "bad" / "config.yaml").write_text("model: [unclosed\n")
    (sweep / "bad" / "metrics.jsonl").write_text("")
    table = report(sweep, tmp_path / "report")
    assert (tmp_path / "report" / "table.csv").exists() and (tmp_path / "report" / "curves.png").exists()
    assert table["status"].iloc[0] == "1 completed, 1 damaged" and table["lr"].iloc[0] == 0.03
    err = capsys.readouterr().err
    assert "2 runs with unreadable files" in err and str(torn) in err and "bad/config.yaml" in err
    assert save(sweep, tmp_path / "sweep.tar.gz") == 1  # the good run; the damaged one stays out
    proc = subprocess.run([sys.executable, "-m", "bnp.archive", "save", str(sweep), str(tmp_path / "again.tar.gz")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 finished runs" in proc.stdout and str(torn) in proc.stderr, proc


# ------------------------------------------------------------------ bad commands beside good runs
def test_a_bad_command_never_touches_a_finished_run(tmp_path):
    """train.threads is not part of the directory name, so a bad value of it meets the finished run."""
    args = ["logger=none", "model.width=32", "train.steps=40", "train.eval_every=20", f"out_root={tmp_path}"]
    proc = cli(*args, "train.threads=1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    (run_dir,) = (tmp_path / "runs").iterdir()

    def files():  # every file of the run directory (Hydra's .hydra/ included, were it written)
        return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = files()
    assert {"summary.json", "config.yaml", "overrides.yaml", "metrics.jsonl"} <= {p.name for p in before}
    proc = cli(*args, "train.threads=0")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "error: train.threads: must be null or an integer >= 1, got 0" in out, out
    assert files() == before
    assert read_json(run_dir / "summary.json")["status"] == "completed"


def test_a_bad_command_never_touches_a_running_run(tmp_path, compose):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("the running run's config\n")
    with open(run_dir / ".lock", "w") as held:  # another process trains this run
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunLocked):
            run(compose("logger=none", "train.threads=0"), run_dir)
        with pytest.raises(RunLocked):
            run(compose("logger=none"), run_dir)
    assert (run_dir / "config.yaml").read_text() == "the running run's config\n"
    assert not (run_dir / "summary.json").exists()
    with pytest.raises(ConfigError):  # an interrupted run's directory keeps its config too
        run(compose("logger=none", "train.threads=0"), run_dir)
    assert (run_dir / "config.yaml").read_text() == "the running run's config\n"


def test_overrides_that_differ_never_share_a_directory():
    assert slug("data.root=a/b") != slug("data.root=a_b")
    assert slug("norm=bnp,optim.lr=0.01") == "norm=bnp,optim.lr=0.01"  # plain ones keep their readable name
    assert slug("") == "default"


@pytest.mark.parametrize(("override", "message"), [
    ("norm=foo", "error: norm=foo: no such option in configs/norm/ (accepted: bn, bnp, bnp_avgstart,"),
    ("train.batch_size=abc", "error: train.batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer"),
])
def test_hydra_errors_are_one_line_and_exit_2(tmp_path, override, message):
    proc = cli("logger=none", override, f"out_root={tmp_path}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and out.strip().startswith(message) and len(out.strip().splitlines()) == 1, out


def test_a_missing_dataset_error_lists_every_place_tried_on_one_line(tmp_path):
    from bnp.config import DataConfig
    from bnp.data import DataError, load

    with pytest.raises(DataError) as err:
        load(DataConfig(name="mnist", root=str(tmp_path), download=False), torch.device("cpu"))
    text = str(err.value)
    assert "\n" not in text and f"{tmp_path}" in text and "torchvision download: skipped (data.download=false)" in text


# ------------------------------------------------------------------ reports
def test_a_report_keeps_different_configurations_apart_and_counts_a_config_once(tmp_path, compose, capsys):
    sweep = tmp_path / "sweep"
    for momentum in (0, 0.9):
        for steps in (100, 200):
            cfg = compose(*HEALTHY, "logger=none", f"optim.momentum={momentum}", f"train.steps={steps}",
                          "optim.lr=0.01")
            run(cfg, sweep / f"m{momentum}-s{steps}")
    shutil.copytree(sweep / "m0-s100", sweep / "again")  # the same config and seed, run twice
    runs, curves = load_runs(sweep)
    assert len(runs) == 4 and "repeats the config and seed" in capsys.readouterr().err
    table = comparison_table(runs, curves, 0.9)
    assert sorted(table["config"]) == ["optim.momentum=0,train.steps=100", "optim.momentum=0,train.steps=200",
                                       "optim.momentum=0.9,train.steps=100", "optim.momentum=0.9,train.steps=200"]
    assert (table["seeds"] == 1).all() and (table["status"] == "1 completed").all()
    for name in ("bad", "bad-again"):  # a config that failed validation twice: no lr, still counted once
        with pytest.raises(ConfigError):
            run(compose(*HEALTHY, "logger=none", "train.threads=0", "optim.lr=null"), sweep / name)
    runs, _ = load_runs(sweep)
    assert len(runs) == 5 and runs["lr"].isna().sum() == 1


def test_a_setting_whose_runs_all_diverged_has_no_chosen_lr(tmp_path, compose):
    sweep = tmp_path / "sweep"
    for lr in (100, 300):
        run(compose("logger=none", "model.width=32", "norm=none", f"optim.lr={lr}", "train.steps=100",
                    "train.log_every=20"), sweep / f"lr={lr}")
    runs, curves = load_runs(sweep)
    table = comparison_table(runs, curves, 0.9)
    assert table.loc[0, "status"] == "2 diverged" and table.loc[0, "lr"] == "n/a" and table.loc[0, "seeds"] == 0


# ------------------------------------------------------------------ the library, out of order
def net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


@pytest.mark.parametrize("fast", [False, True])
def test_library_misuse_raises_and_says_the_right_order(fast):
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = net()
    pre = BNP(model, fast=fast)
    loss = F.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match=r"call it after loss.backward\(\): forward, loss.backward\(\), "
                                           r"pre.step\(\), optimizer.step\(\)"):
        pre.step()  # before backward: no gradient yet
    loss.backward()
    pre.step()
    model.zero_grad(set_to_none=False)  # gradients that exist, unchanged since the next forward
    F.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match="step\\(\\) came before loss.backward\\(\\)"):
        pre.step()
    with pytest.raises(RuntimeError, match="already preconditioned by another BNP or FullCovariance instance"):
        BNP(model, fast=fast)
    with pytest.raises(RuntimeError, match="FullCovariance: layer .* already preconditioned"):
        FullCovariance(model)
    pre.remove()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="this preconditioner was removed"):
        pre.step()
    BNP(model, fast=fast)  # a removed one leaves room for a new one
    other = net()
    FullCovariance(other)
    with pytest.raises(RuntimeError, match="BNP: layer .* already preconditioned"):
        BNP(other, fast=fast)


@pytest.mark.parametrize("fast", [False, True])
def test_statistics_follow_the_models_dtype(fast):
    """After model.double() the statistics are float64, and the step equals a preconditioner built
    on the float64 model from the start."""
    x = torch.randn(16, 4, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 3, (16,))
    cast, native = net(), net(torch.float64)
    pre_cast, pre_native = BNP(cast, fast=fast), BNP(native, fast=fast)
    cast.double()
    for model, pre in ((cast, pre_cast), (native, pre_native)):
        for _ in range(2):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
    assert pre_cast.stats("0").mean.dtype == torch.float64
    for a, b in zip(cast.parameters(), native.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
