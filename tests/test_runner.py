"""The runner end to end: real composed configs, errors, resume, divergence, W&B offline files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnp.config import ConfigError, NotApplicable
from bnp.log import read_json, read_metrics
from bnp.train import run
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "mlp": ["model=mlp", "model.depth=1", "model.width=8"],
    "cnn": ["model=cnn", "model.channels=[4,8]", "model.convs_per_stage=1"],
    "resnet20": ["model=resnet", "model.arch=resnet20"],
    "resnet18": ["model=resnet", "model.arch=resnet18"],
}
NORMS = ["none", "bn", "bnp", "ln", "gn"]
DATA = ["digits", "synthetic", "fashion_mnist", "mnist", "cifar10", "cifar100"]


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_norm_data_combination_trains(compose, data_root, tmp_path, model, norm, data):
    cfg = compose(*TINY, *MODELS[model], f"norm={norm}", f"data={data}", f"data.root={data_root}")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed", summary
    assert summary["steps"] == 2 and 0 <= summary["final_test_acc"] <= 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert {"train_loss", "lr", "samples_per_s", "prequential_acc"} <= set(rows[-2]) | set(rows[-1])
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.yaml").exists()


def test_config_errors_name_the_field_and_accepted_values(compose, tmp_path):
    cases = {
        "model.name=transformer": "model.name: 'transformer' is not one of ['mlp', 'cnn', 'resnet']",
        "model=resnet model.arch=resnet7": "model.arch: 'resnet7' is not one of ['resnet20',",
        "optim.lr=-0.1": "optim.lr: must be a finite number > 0",
        "train.batch_size=0": "train.batch_size",
        "train.device=tpu": "train.device: 'tpu' is not one of ['auto', 'cpu', 'cuda']",
        "norm.momentum=1.5": "norm.momentum",
        "optim.schedule=linear": "optim.schedule: 'linear' is not one of ['constant', 'cosine', 'step']",
        "train.batch_size=abc": "train.batch_size",
        "model.widht=3": "Key 'widht' not in 'ModelConfig'",
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


def test_divergence_stops_the_run(compose, tmp_path):
    cfg = compose(*TINY, "data=synthetic", "norm=none", "optim.lr=1e8", "train.steps=50", "train.log_every=5")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "diverged" and summary["steps"] < 50
    assert read_json(tmp_path / "summary.json")["status"] == "diverged"


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


def cli(*args, env_extra=None, **kwargs):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "bnp.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_cli_config_error_exits_with_message(tmp_path):
    proc = cli("logger=none", "optim.lr=-1", f"out_root={tmp_path}")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: optim.lr: must be a finite number > 0, got -1.0" in out


def test_resume_after_sigkill_gives_the_uninterrupted_metrics(tmp_path):
    # long enough (several seconds) that the kill lands mid-run however fast the steps are
    args = ["logger=none", "norm=bnp", "train.batch_size=1", "train.steps=24000", "train.eval_every=500",
            "train.log_every=250", "model.width=128"]
    reference = cli(*args, f"out_root={tmp_path / 'ref'}")
    victim = cli(*args, f"out_root={tmp_path / 'kill'}")
    run_dir = tmp_path / "kill" / "runs"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and killed_at is None:
        for metrics in run_dir.glob("*/metrics.jsonl"):
            rows = read_metrics(metrics)
            steps = [r["step"] for r in rows if "val_acc" in r]
            if steps and steps[-1] >= 500 and (metrics.parent / "checkpoint.pt").exists():
                victim.send_signal(signal.SIGKILL)
                killed_at = steps[-1]
        time.sleep(0.01)
    victim.wait(timeout=60)
    assert killed_at is not None and killed_at < 24000, "the run finished before it could be killed"
    assert not list(run_dir.glob("*/summary.json"))
    resumed = cli(*args, f"out_root={tmp_path / 'kill'}")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming at step" in out, out
    reference.communicate(timeout=300)
    (ref_dir,) = (tmp_path / "ref" / "runs").iterdir()
    (kill_dir,) = run_dir.iterdir()
    assert ref_dir.name == kill_dir.name  # named after the overrides, not the time
    a, b = read_json(ref_dir / "summary.json"), read_json(kill_dir / "summary.json")
    for key in ("status", "steps", "final_train_loss", "final_val_loss", "final_val_acc", "final_test_acc",
                "best_val_acc", "test_acc_at_best_val", "prequential_acc"):
        assert a[key] == b[key], key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(ref_dir / "metrics.jsonl")) == strip(read_metrics(kill_dir / "metrics.jsonl"))


def test_sigint_leaves_a_resumable_checkpoint(tmp_path):
    args = ["logger=none", "train.batch_size=1", "train.steps=100000", "train.eval_every=100000",
            "train.log_every=200", f"out_root={tmp_path}"]
    proc = cli(*args)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob("runs/*/metrics.jsonl")):
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists(), out
    import torch

    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["progress"]["step"]
    assert 0 < step < 100000


def wandb_records(path: Path):
    """Decode a W&B transaction log (LevelDB log format of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, chunks, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        chunks = payload if kind in (1, 2) else chunks + payload  # FULL/FIRST start, MIDDLE/LAST append
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


def test_wandb_offline_run_files_contain_the_metrics(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(*[o for o in TINY if o != "logger=none"], "logger=wandb", "train.steps=6", "train.eval_every=3")
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed"
    (log_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(log_file):
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    for row in rows:
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value), (row["step"], key)
