"""Sweeps through Hydra's launchers end to end, and the report on their sweep directories."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnp.runs import load_runs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("launcher", ["submitit_local", "local"])
def test_two_job_sweep_and_report(launcher, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "bnp.train", "-m", f"launcher={launcher}", "logger=none", "norm=none,bnp",
           "train.steps=10", "train.device=cpu", f"out_root={tmp_path}", "name=two"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the sweep's progress (output to a file: plain lines), not the runs' per-step lines
    assert "[sweep two] 2/2 runs done (2 completed, 0 diverged, 0 failed, 0 not applicable)" in proc.stdout
    assert "step 10/10" not in proc.stdout + proc.stderr
    runs, _ = load_runs(tmp_path / "sweeps" / "two")
    assert sorted(runs["norm"]) == ["bnp", "none"] and set(runs["status"]) == {"completed"}
    report = subprocess.run([sys.executable, "-m", "bnp.report", str(tmp_path / "sweeps" / "two")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and (tmp_path / "sweeps" / "two" / "report" / "table.md").exists()


def test_slurm_launcher_config_composes(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["launcher=slurm", "hydra.launcher.partition=gpu"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and "export WANDB_MODE=offline" in launcher.setup


def test_sweep_size_and_progress_line():
    from collections import Counter

    from bnp.progress import describe, sweep_size

    assert sweep_size({"norm": "none,bn,bnp,ln", "optim.lr": "0.1,0.3"}, ["norm=bnp,ln", "train.seed=range(3)"]) == 12
    assert sweep_size({}, ["experiment=glob(*)"]) is None
    line = describe(Counter(completed=35, diverged=2), 180, 192.0, fresh=37)
    assert line == ("37/180 runs done (35 completed, 2 diverged, 0 failed, 0 not applicable), 3m12s, "
                    "about 12m22s left")


def test_progress_counts_only_its_own_multiruns_jobs(tmp_path):
    """Multiruns that share a sweep directory at once (the bracketing extensions) each count their
    own jobs: the records carry the launching multirun's token, which travels with the pickled
    callback into the job processes."""
    import json
    import pickle

    from bnp.progress import PROGRESS_FILE, SweepProgress

    mine, other = SweepProgress(token="mine"), SweepProgress(token="other")
    job_side = pickle.loads(pickle.dumps(mine))  # what a joblib / submitit job gets
    assert job_side._token == "mine"
    records = [("mine", "completed"), ("other", "completed"), ("other", "diverged"), ("mine", "diverged")]
    (tmp_path / PROGRESS_FILE).write_text("".join(json.dumps({"status": s, "token": t}) + "\n" for t, s in records))
    for callback in (mine, other):
        callback._file = tmp_path / PROGRESS_FILE
    assert mine._read() == ({"completed": 1, "diverged": 1}, 2)
    assert other._read() == ({"completed": 1, "diverged": 1}, 2)
    # later reads take only what was appended since, and never half a line (a job mid-append)
    with open(tmp_path / PROGRESS_FILE, "a") as f:
        f.write(json.dumps({"status": "completed", "token": "mine", "skipped": True}) + "\n" + '{"status": "fai')
    assert mine._read() == ({"completed": 2, "diverged": 1}, 2)
    with open(tmp_path / PROGRESS_FILE, "a") as f:
        f.write('led", "token": "mine"}\n' + "not json\n")  # a torn line is skipped
    assert mine._read() == ({"completed": 2, "diverged": 1, "failed": 1}, 3)
    # a file replaced or truncated under the reader is read again from its start
    (tmp_path / PROGRESS_FILE).write_text(json.dumps({"status": "diverged", "token": "mine"}) + "\n")
    assert mine._read() == ({"diverged": 1}, 1)
    (tmp_path / PROGRESS_FILE).unlink()
    assert mine._read() == ({}, 0)


def _live_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies, which nothing may reap in a
    container, do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while being read
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_sigterm_to_a_local_sweep_stops_every_worker(tmp_path):
    """`kill -- -PGID` (SIGTERM to the sweep's process group, as a scheduler or a user stopping it
    does): every joblib worker checkpoints its run and exits, and none goes on to the jobs still
    queued for it."""
    import signal
    import time

    from bnp.log import read_metrics

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bnp.train", "-m", "launcher=local", "hydra.launcher.n_jobs=2", "logger=none",
           "data=digits", "model.width=16", "train.batch_size=1", "train.steps=1000000", "train.log_every=100",
           "train.eval_every=1000000", "train.device=cpu", "train.seed=0,1,2,3,4,5", f"out_root={tmp_path}",
           "name=term"]
    output = open(tmp_path / "output.txt", "w")  # a file, not a pipe nobody reads that could fill up
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    sweep = tmp_path / "sweeps" / "term"
    try:
        deadline, logged = time.monotonic() + 900, []  # a cap for a sweep that never starts, far above a slow start
        while proc.poll() is None and time.monotonic() < deadline:  # until both workers' runs have logged
            logged = [m for m in sweep.glob("*/metrics.jsonl") if any("train_loss" in r for r in read_metrics(m))]
            if len(logged) == 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None and len(logged) == 2, (tmp_path / "output.txt").read_text()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=600)
        deadline = time.monotonic() + 300  # a cap for a hung worker, far above the step boundary it needs
        while _live_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _live_members(proc.pid), "workers still running after SIGTERM"
    finally:
        for pid in _live_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
        output.close()
    started = sorted(p.parent.name for p in sweep.glob("*/metrics.jsonl"))
    assert len(started) == 2, started  # no worker took a queued job after the signal
    assert all((sweep / name / "checkpoint.pt").exists() for name in started)
