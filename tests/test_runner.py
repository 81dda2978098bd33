"""The runner end to end: real composed configs, errors, resume, divergence, W&B offline files."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnp.config import ConfigError, NotApplicable
from bnp.log import read_json, read_metrics
from bnp.train import run
from conftest import TINY, cli, wandb_history

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "mlp": ["model=mlp", "model.depth=1", "model.width=8"],
    "cnn": ["model=cnn", "model.channels=[4,8]", "model.convs_per_stage=1"],
    "resnet20": ["model=resnet", "model.arch=resnet20"],
    "resnet20-proj": ["model=resnet", "model.arch=resnet20", "model.shortcut=projection"],
    "resnet18": ["model=resnet", "model.arch=resnet18"],
}
NORMS = ["none", "bn", "bnp", "ln", "gn"]
DATA = ["digits", "synthetic", "fashion_mnist", "mnist", "cifar10", "cifar100"]


def combinations():
    """Every model x norm on digits and every dataset with two model x norm pairs in the default
    suite; the rest of the full cross-product is marked slow (make test-all)."""
    fast = {(m, n, "digits") for m in MODELS for n in NORMS}
    fast |= {(m, n, d) for d in DATA for m, n in (("cnn", "bnp"), ("resnet20", "bn"))}
    return [pytest.param(m, n, d, marks=() if (m, n, d) in fast else pytest.mark.slow)
            for m in MODELS for n in NORMS for d in DATA]


@pytest.mark.parametrize(("model", "norm", "data"), combinations())
def test_every_model_norm_data_combination_trains(compose, data_root, tmp_path, model, norm, data):
    # a small lr: two steps must run every code path, and the synthetic data is deliberately badly
    # scaled (ResNet-18 with LayerNorm blew up past 10x its first loss in two steps at 0.05)
    cfg = compose(*TINY, *MODELS[model], f"norm={norm}", f"data={data}", f"data.root={data_root}", "optim.lr=0.001")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed", summary
    assert summary["steps"] == 2 and 0 <= summary["final_test_acc"] <= 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"train_loss", "lr", "samples_per_s", "prequential_acc"} <= set(rows[-2]) | set(rows[-1])
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.yaml").exists()


def test_projection_shortcuts_sit_where_the_shape_changes_and_bnp_tracks_them():
    from bnp import BNP
    from bnp.models import CifarResNet

    for norm in ("none", "bn"):
        model = CifarResNet(20, 1, 10, norm, shortcut="projection")
        projected = [name for name, _ in model.named_modules() if name.endswith(".project")]
        assert projected == ["blocks.3.project", "blocks.6.project"]  # the first block of stages 2 and 3
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert {"blocks.3.project.0", "blocks.6.project.0"} <= set(BNP(CifarResNet(20, 1, 10, "bnp", "projection")).names)
    assert not any(".project" in name for name, _ in CifarResNet(20, 1, 10, "bn").named_modules())


def test_config_errors_name_the_field_and_accepted_values(compose, tmp_path):
    cases = {
        "model.name=transformer": "model.name: 'transformer' is not one of ['mlp', 'cnn', 'resnet']",
        "model=resnet model.arch=resnet7": "model.arch: 'resnet7' is not one of ['resnet20',",
        "model=resnet model.shortcut=conv": "model.shortcut: 'conv' is not one of ['identity', 'projection']",
        "optim.lr=-0.1": "optim.lr: must be a finite number > 0",
        "train.batch_size=0": "train.batch_size",
        "train.device=tpu": "train.device: 'tpu' is not one of ['auto', 'cpu', 'cuda']",
        "norm.momentum=1.5": "norm.momentum",
        "optim.schedule=linear": "optim.schedule: 'linear' is not one of ['constant', 'cosine', 'step']",
        "train.batch_size=abc": "train.batch_size",
        "model.widht=3": "Key 'widht' not in 'ModelConfig'",
        "grad=agc grad.agc.clip=0": "grad.agc.clip: must be a finite number > 0",
        "norm=bn norm.average_start=true": "norm.kind: must be 'bnp' for the BNP options ['average_start']",
    }
    from hydra.errors import ConfigCompositionException

    for override, message in cases.items():
        # types are checked while composing (Hydra), choices and ranges before training (bnp)
        with pytest.raises((ConfigError, ConfigCompositionException)) as err:
            run(compose("logger=none", *override.split()), tmp_path)
        text = f"{err.value} {err.value.__cause__}"
        assert message in text, (override, text)


def test_unknown_group_option_lists_the_choices(compose):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose("norm=batchnorm")
    for option in ("bn", "bnp", "gn", "ln", "none"):
        assert option in str(err.value)


def test_bn_at_batch_size_one_is_a_clear_error_or_not_applicable(compose, tmp_path):
    cfg = compose("logger=none", "norm=bn", "train.batch_size=1")
    with pytest.raises(NotApplicable, match="norm=bnp .*norm=ln"):
        run(cfg, tmp_path / "single")
    summary = run(cfg, tmp_path / "sweep", in_sweep=True)
    assert summary["status"] == "not_applicable" and "BatchNorm1d" in summary["reason"]


def test_divergence_stops_the_run_with_the_step_and_the_reason(compose, tmp_path, capsys):
    cfg = compose(*TINY, "data=synthetic", "norm=none", "optim.lr=1e8", "train.steps=50", "train.log_every=5")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "diverged" and summary["steps"] < 50
    assert summary["reason"].startswith(f"step {summary['steps']}: ")
    assert read_json(tmp_path / "summary.json")["status"] == "diverged"
    assert f"DIVERGED at step {summary['steps']}: " in capsys.readouterr().out


def test_an_optimizer_that_raises_on_a_blow_up_marks_the_run_diverged(compose, tmp_path, monkeypatch):
    # an optimizer that factors its statistics (Shampoo's SVD) can raise on a blow-up before the next train
    # row sees it: that run diverged. Here SGD's 5th step raises as such a factorization would; train rows
    # come every 50 steps, so only the runner's check at the raise can tell
    real_step, calls = torch.optim.SGD.step, []

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    base = [*TINY, "data=synthetic", "norm=none", "train.steps=50", "train.log_every=50"]
    summary = run(compose(*base, "optim.lr=1e8"), tmp_path / "blown")
    assert summary["status"] == "diverged" and summary["steps"] == 4, summary
    assert summary["reason"].startswith("step 5: ") and "the step raised _LinAlgError" in summary["reason"], summary
    calls.clear()  # the same raise in a healthy run is a failure, as any other error
    with pytest.raises(torch.linalg.LinAlgError):
        run(compose(*base, "optim.lr=0.01"), tmp_path / "healthy")


def test_a_loss_that_blows_up_without_overflowing_is_diverged(compose, tmp_path, capsys):
    # plain SGD at lr 100 on digits: the train loss reaches about 1e24 while staying finite
    base = ["logger=none", "model.width=32", "norm=none", "optim.lr=100", "train.steps=300", "train.log_every=20"]
    summary = run(compose(*base), tmp_path / "default")
    assert summary["status"] == "diverged" and summary["steps"] <= 40, summary
    assert "> 10 x the untrained model's validation loss" in summary["reason"]
    assert "(train.diverge_factor)" in summary["reason"] and "DIVERGED at step" in capsys.readouterr().out
    strict = run(compose(*base, "train.diverge_factor=2"), tmp_path / "strict")
    assert strict["status"] == "diverged" and strict["steps"] <= summary["steps"]
    assert "> 2 x the untrained" in strict["reason"]
    with pytest.raises(ConfigError, match=r"train.diverge_factor: must be null \(off\) or > 1"):
        run(compose(*base, "train.diverge_factor=0.5"), tmp_path / "bad")


def test_every_run_that_starts_leaves_a_summary(compose, tmp_path):
    with pytest.raises(ConfigError, match="skip pattern 'foo' matches no layer"):
        run(compose(*TINY, "norm=bnp", "norm.skip=[foo]"), tmp_path / "skip")
    failed = read_json(tmp_path / "skip" / "summary.json")
    assert failed["status"] == "failed" and "skip pattern 'foo' matches no layer" in failed["reason"]
    with pytest.raises(ConfigError):
        run(compose(*TINY, "train.batch_size=0"), tmp_path / "invalid")
    assert read_json(tmp_path / "invalid" / "summary.json")["status"] == "failed"
    assert (tmp_path / "invalid" / "config.yaml").exists()  # the config as given: reports place the run


@pytest.mark.parametrize("batch_size", [1, 16, 128])
@pytest.mark.parametrize("norm", NORMS)
def test_the_defaults_learn(compose, tmp_path, norm, batch_size):
    # every setting default but the length (results/defaults has the full 10 epochs, 3 seeds);
    # a learning rate that does not suit a method blows up within the first 100-200 steps
    steps = 300 if batch_size == 1 else 200
    cfg = compose("logger=none", f"norm={norm}", f"train.batch_size={batch_size}", f"train.steps={steps}",
                  f"train.eval_every={steps}", "train.device=cpu")
    if norm == "bn" and batch_size == 1:
        with pytest.raises(NotApplicable):
            run(cfg, tmp_path)
        return
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["final_val_acc"] > 0.5, summary  # chance: 0.1


def test_same_seed_same_metrics_and_completed_runs_are_skipped(compose, tmp_path, capsys):
    overrides = [*TINY, "train.steps=30", "train.eval_every=10", "train.log_every=5", "train.batch_size=1"]
    first = run(compose(*overrides), tmp_path / "a")
    second = run(compose(*overrides), tmp_path / "b")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert first["final_val_loss"] == second["final_val_loss"]
    again = run(compose(*overrides), tmp_path / "a")
    assert "already completed; skipped" in capsys.readouterr().out and again["started"] == first["started"]
    redone = run(compose(*overrides, "train.rerun=true"), tmp_path / "a")
    assert redone["final_val_loss"] == first["final_val_loss"]
    assert len(read_metrics(tmp_path / "a" / "metrics.jsonl")) == len(read_metrics(tmp_path / "b" / "metrics.jsonl"))


def test_cli_config_error_exits_with_message(tmp_path):
    proc = cli("logger=none", "optim.lr=-1", f"out_root={tmp_path}")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: optim.lr: must be a finite number > 0 (or null: the default for the optimizer and norm), got -1.0" in out


KILL_SCRIPT = """
import os, signal, sys
from hydra import compose, initialize_config_dir
import bnp.train
run_dir, kill_at, *overrides = sys.argv[1:]
with initialize_config_dir(config_dir={configs!r}, version_base="1.3"):
    cfg = compose(config_name="config", overrides=overrides)
def kill(trainer):  # triggered by the run's progress, never by a clock
    if trainer.step >= int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)
bnp.train.run(cfg, run_dir, progress=kill)
"""


@pytest.mark.slow  # the default suite kills and resumes in tests/test_faults.py, and resumes through the CLI below
def test_resume_after_sigkill_gives_the_uninterrupted_metrics(tmp_path):
    # a healthy run (BNP at batch size 1 at a learning rate that suits it); the victim kills itself at
    # a log point between two checkpoints, so the resumed run must also drop the rows written after
    # the last checkpoint
    args = ["logger=none", "norm=bnp", "train.batch_size=1", "train.steps=3000", "train.eval_every=1000",
            "train.log_every=250", "model.width=128", "optim.lr=0.01"]
    reference = cli(*args, f"out_root={tmp_path / 'ref'}")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    (ref_dir,) = (tmp_path / "ref" / "runs").iterdir()
    kill_dir = tmp_path / "kill" / "runs" / ref_dir.name  # where the CLI puts these overrides
    script = KILL_SCRIPT.format(configs=str(ROOT / "configs"))
    env = {**os.environ, "WANDB_MODE": "disabled"}
    victim = subprocess.run([sys.executable, "-c", script, str(kill_dir), "1750", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert victim.returncode == -signal.SIGKILL, victim.stdout + victim.stderr
    assert not (kill_dir / "summary.json").exists()
    assert max(r["step"] for r in read_metrics(kill_dir / "metrics.jsonl")) == 1750
    resumed = cli(*args, f"out_root={tmp_path / 'kill'}")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resuming at step 1000/3000" in out, out
    a, b = read_json(ref_dir / "summary.json"), read_json(kill_dir / "summary.json")
    assert a["status"] == "completed" and a["final_val_acc"] > 0.9  # a model that learned
    for key in ("status", "steps", "final_train_loss", "final_val_loss", "final_val_acc", "final_test_acc",
                "best_val_acc", "test_acc_at_best_val", "prequential_acc"):
        assert a[key] == b[key], key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(ref_dir / "metrics.jsonl")) == strip(read_metrics(kill_dir / "metrics.jsonl"))


def test_sigint_leaves_a_resumable_checkpoint_and_says_how_to_resume(tmp_path):
    args = ["logger=none", "train.batch_size=1", "train.steps=100000", "train.eval_every=100000",
            "train.log_every=200", "optim.lr=0.01", f"out_root={tmp_path}"]
    proc = cli(*args)
    while proc.poll() is None:  # wait for the first train row (progress), however slow the machine
        rows = [r for m in tmp_path.glob("runs/*/metrics.jsonl") for r in read_metrics(m) if "train_loss" in r]
        if rows:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists(), out
    assert proc.returncode == 130 and "Traceback" not in out
    assert "interrupted by SIGINT at step" in out and "run the same command again to resume" in out, out
    import torch

    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["progress"]["step"]
    assert 0 < step < 100000
    # the same command finds the run and resumes it (stopped again once it says so)
    again = cli(*args)
    first = again.stdout.readline()
    while first and "resuming at step" not in first:
        first = again.stdout.readline()
    again.send_signal(signal.SIGINT)
    rest, _ = again.communicate(timeout=600)
    assert f"resuming at step {step}/100000" in first, first + rest


def test_a_signal_that_comes_as_the_run_ends_is_still_honoured(compose, tmp_path, monkeypatch):
    """A stop signal caught after the loop's last look at it (or by a resumed run with no step
    left) still stops the process, once the finished run's summary is written: a sweep worker must
    not go on to its next job."""
    import pickle

    from bnp.loop import Interrupted, Trainer

    original = Trainer.run

    def signalled_at_the_end(self, progress=None):
        result = original(self, progress)
        self.stop_signal = signal.SIGTERM
        return result

    monkeypatch.setattr(Trainer, "run", signalled_at_the_end)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted) as caught:
        run(compose("logger=none", "train.steps=20", "train.eval_every=10", "model.width=16"), run_dir)
    assert caught.value.signum == signal.SIGTERM and caught.value.finished
    assert "as the run ended (completed, summary written)" in str(caught.value)
    assert read_json(run_dir / "summary.json")["status"] == "completed"
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses processes intact
    assert (str(copy), copy.signum, copy.finished) == (str(caught.value), signal.SIGTERM, True)


def test_errors_a_user_can_act_on_are_one_line_without_a_traceback(compose, tmp_path):
    args = ["logger=none", "train.steps=20", "train.eval_every=10", "model.width=16"]
    run_dir = tmp_path / "run"
    run(compose(*args), run_dir)
    (run_dir / "summary.json").unlink()  # an unfinished run, with a torn checkpoint
    checkpoint = run_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    proc = cli(*args, f"hydra.run.dir={run_dir}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "Traceback" not in out, out
    assert f"error: {checkpoint}: cannot resume from it" in out and "train.rerun=true" in out, out
    assert read_json(run_dir / "summary.json")["status"] == "failed"

    import fcntl

    from bnp.train import RunLocked, one_line

    with open(run_dir / ".lock", "w") as held:  # another process trains this run
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RunLocked) as err:
            run(compose(*args, "train.rerun=true"), run_dir)
    assert one_line(err.value) == (f"{run_dir} is being trained by another process (it holds {run_dir / '.lock'}); "
                                   "wait for it, or stop it and run this command again to resume")

    proc = cli(*args, "+train.foo=1", f"hydra.run.dir={tmp_path / 'foo'}")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "error: train.foo: not a key of train (it accepts: epochs," in out, out
    proc = cli(*args, "+train.foo=1", f"hydra.run.dir={tmp_path / 'foo'}", env_extra={"BNP_TRACEBACK": "1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "Traceback" in out


def test_wandb_offline_run_files_contain_the_metrics_and_a_resume_continues_the_same_run(compose, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(*[o for o in TINY if o != "logger=none"], "logger=wandb", "train.steps=6", "train.eval_every=3")

    def stop_at_3(trainer):
        if trainer.step == 3:  # after the checkpoint at step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path, progress=stop_at_3)
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # two sessions of one W&B run id
    history = {}
    for log_file in files:
        for step, items in wandb_history(log_file).items():
            history.setdefault(step, {}).update(items)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {r["step"] for r in rows} == {0, 3, 6}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value), (row["step"], key)


def test_the_composed_yaml_defaults_equal_the_schema(compose, monkeypatch):
    """configs/ repeats the defaults of bnp/config.py (so that the YAML files document them): they
    must say the same."""
    from omegaconf import OmegaConf

    from bnp.config import RunConfig

    monkeypatch.delenv("BNP_DATA", raising=False)
    composed = OmegaConf.to_container(compose(), resolve=True)
    schema = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    assert composed == schema
