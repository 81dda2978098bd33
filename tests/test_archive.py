"""bnp.archive: a sweep's finished runs survive a move to another machine and the sweep resumes there."""

import io
import json
import subprocess
import sys
import tarfile

import pandas as pd
import pytest
import yaml

from bnp.archive import main, restore, save
from bnp.runs import load_runs
from bnp.sweep import ArchiveKeeper, wait
from bnp.train import run
from conftest import TINY

BASE = [*TINY, "data=synthetic", "train.steps=6", "train.eval_every=3", "model.depth=1", "model.width=8"]


def make_sweep(compose, sweep):
    """Finished runs of each kind, one interrupted run (no summary yet) and the sweep's own records."""
    configs = {"none-0.03": compose(*BASE, "norm=none", "optim.lr=0.03"),
               "bnp-0.03": compose(*BASE, "norm=bnp", "optim.lr=0.03"),
               "none-diverged": compose(*BASE, "norm=none", "optim.lr=1e9", "train.log_every=2"),
               "bn-online": compose(*BASE, "norm=bn", "train.batch_size=1")}
    for name, cfg in configs.items():
        run(cfg, sweep / name, in_sweep=True)
        (sweep / name / ".hydra").mkdir()
        (sweep / name / ".hydra" / "overrides.yaml").write_text(f"- run={name}\n")
        (sweep / name / "wandb").mkdir()
        (sweep / name / "wandb" / "run.wandb").write_bytes(b"\0" * 64)
    interrupted = sweep / "bnp-interrupted"
    interrupted.mkdir()
    (interrupted / "config.yaml").write_text((sweep / "bnp-0.03" / "config.yaml").read_text())
    (interrupted / "metrics.jsonl").write_text('{"step": 3, "train_loss": 2.0}\n')
    (interrupted / "checkpoint.pt").write_bytes(b"\0" * 64)
    (sweep / "invocations.jsonl").write_text(json.dumps({"id": "a", "command": "python -m bnp.train -m x"}) + "\n")
    (sweep / "bracket.json").write_text('{"setting": {"low": 1, "high": 0, "cap": 2}}\n')
    return configs


@pytest.fixture
def archive(compose, tmp_path):
    """The archive of make_sweep's sweep (in tmp_path / "first")."""
    make_sweep(compose, tmp_path / "first")
    save(tmp_path / "first", tmp_path / "sweep.tar.gz")
    return tmp_path / "sweep.tar.gz"


def test_save_then_restore_gives_the_same_report_and_the_sweep_resumes(compose, tmp_path):
    sweep = tmp_path / "machine_a" / "sweeps" / "s"
    configs = make_sweep(compose, sweep)
    archive = tmp_path / "results" / "sweep.tar.gz"
    assert save(sweep, archive) == 4

    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    expected = {"invocations.jsonl", "bracket.json"} | {
        f"{run}/{f}" for run in configs for f in ("config.yaml", "summary.json", "metrics.jsonl", ".hydra/overrides.yaml")
    } - {"bn-online/metrics.jsonl"}  # a run that was not applicable trained nothing
    assert names == expected  # no checkpoint, no W&B files, nothing of the interrupted run

    moved = tmp_path / "machine_b" / "sweeps" / "s"
    assert restore(archive, moved) == (4, 0)
    before, curves_before = load_runs(sweep)
    after, curves_after = load_runs(moved)
    before = before[before["status"] != "unfinished"].drop(columns="run").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after.drop(columns="run").reset_index(drop=True))
    assert sorted(curves_before[str(sweep / r)] == curves_after[str(moved / r)] for r in configs) == [True] * 4
    assert set(after["status"]) == {"completed", "diverged", "not_applicable"}
    assert json.loads((moved / "bracket.json").read_text()) == json.loads((sweep / "bracket.json").read_text())

    for name, cfg in configs.items():  # the resume check sees every restored run as finished
        assert run(cfg, moved / name, in_sweep=True).get("skipped") is True, name


def test_restore_keeps_a_finished_local_run_and_replaces_an_unfinished_one_whole(compose, archive, tmp_path):
    local = tmp_path / "b"
    (local / "none-0.03").mkdir(parents=True)
    (local / "none-0.03" / "summary.json").write_text('{"status": "completed", "mine": true}')
    for name, status in (("bnp-0.03", None), ("none-diverged", "failed")):  # interrupted here, failed here
        (local / name).mkdir()
        (local / name / "metrics.jsonl").write_text('{"step": 1, "train_loss": 9.0}\n')
        (local / name / "checkpoint.pt").write_bytes(b"\0")
        if status:
            (local / name / "summary.json").write_text(json.dumps({"status": status}))
    assert restore(archive, local) == (3, 1)
    assert json.loads((local / "none-0.03" / "summary.json").read_text())["mine"] is True
    for name in ("bnp-0.03", "none-diverged"):  # the archived run, not a mix of both
        assert (local / name / "metrics.jsonl").read_bytes() == (tmp_path / "first" / name / "metrics.jsonl").read_bytes()
        assert not (local / name / "checkpoint.pt").exists()
    assert restore(archive, local) == (0, 4)  # a second restore changes nothing


def test_restore_leaves_a_run_being_trained_alone(archive, tmp_path):
    import fcntl

    local = tmp_path / "b" / "bnp-0.03"
    local.mkdir(parents=True)
    (local / "metrics.jsonl").write_text("{}\n")
    with open(local / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as bnp.train.run_lock holds it while training
        assert restore(archive, tmp_path / "b") == (3, 1)
    assert (local / "metrics.jsonl").read_text() == "{}\n"


def test_restore_refuses_a_path_outside_the_sweep_and_names_a_damaged_archive(tmp_path):
    for name in ("../outside.txt", "/tmp/outside.txt"):
        evil = tmp_path / "evil.tar.gz"
        with tarfile.open(evil, "w:gz") as tar:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        with pytest.raises(SystemExit, match="outside a sweep directory"):
            restore(evil, tmp_path / "sweep")
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "sweep").exists()
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(SystemExit, match="damaged.tar.gz is not a readable sweep archive"):
        restore(damaged, tmp_path / "sweep")
    with pytest.raises(SystemExit, match="not a readable sweep archive"):  # save never replaces it blindly
        save(tmp_path, damaged)


def test_command_line(compose, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_sweep(compose, sweep)
    main(["save", str(sweep), str(tmp_path / "s.tar.gz")])
    assert "4 finished runs" in capsys.readouterr().out
    main(["restore", str(tmp_path / "s.tar.gz"), str(tmp_path / "copy")])
    assert "rerun the sweep's command" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a sweep directory"):
        main(["save", str(tmp_path / "missing"), str(tmp_path / "x.tar.gz")])
    with pytest.raises(SystemExit, match="no archive"):
        main(["restore", str(tmp_path / "missing.tar.gz"), str(tmp_path / "copy")])


def test_keeper_saves_when_more_runs_have_finished(compose, tmp_path):
    sweep, archive = tmp_path / "sweep", tmp_path / "results" / "sweep.tar.gz"
    keep = ArchiveKeeper(sweep, archive)
    keep()  # no sweep directory yet: nothing to save
    assert not archive.exists()
    run(compose(*BASE, "norm=none", "optim.lr=0.03"), sweep / "a", in_sweep=True)
    keep()
    with tarfile.open(archive) as tar:
        assert "a/summary.json" in tar.getnames()
    archive.unlink()
    keep()  # the same finished runs: not saved again
    assert not archive.exists()
    run(compose(*BASE, "norm=bnp", "optim.lr=0.03"), sweep / "b", in_sweep=True)
    ticks = []
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert wait([proc], lambda: (ticks.append(1), keep()), every=0.05) == [0]
    assert ticks  # the sleep outlasts a 0.05 s wait at least once, however loaded the machine
    with tarfile.open(archive) as tar:
        assert {"a/summary.json", "b/summary.json"} <= set(tar.getnames())


def test_saving_onto_an_archive_merges(compose, archive, tmp_path):
    """A second machine's save keeps the first machine's runs; a run finished later replaces its copy
    whole; records are merged."""
    second = tmp_path / "second"
    run(compose(*BASE, "norm=none", "optim.lr=0.01"), second / "none-0.03", in_sweep=True)  # same name, rerun
    run(compose(*BASE, "norm=bn", "optim.lr=0.03"), second / "bn-0.03", in_sweep=True)
    (second / "invocations.jsonl").write_text(json.dumps({"id": "b", "command": "python -m bnp.train -m y"}))  # no newline
    (second / "bracket.json").write_text('{"setting": {"low": 0, "high": 2, "cap": 2}, "other": {"low": 1, "high": 0}}')
    assert save(second, archive) == 5
    merged = tmp_path / "merged"
    restore(archive, merged)
    runs, _ = load_runs(merged)
    assert sorted(p.rsplit("/", 1)[-1] for p in runs["run"]) == sorted(
        ["none-0.03", "bnp-0.03", "none-diverged", "bn-online", "bn-0.03"])
    assert float(runs[runs["run"].str.endswith("/none-0.03")]["lr"].iloc[0]) == 0.01  # the later one
    assert not (merged / "none-0.03" / ".hydra").exists()  # the replaced run's files are all the new ones
    assert [json.loads(line)["id"] for line in (merged / "invocations.jsonl").read_text().splitlines()] == ["a", "b"]
    assert json.loads((merged / "bracket.json").read_text()) == {
        "setting": {"low": 1, "high": 2, "cap": 2}, "other": {"low": 1, "high": 0}}

    (tmp_path / "first" / "none-0.03" / "summary.json").write_text(  # an older finished copy comes back
        (tmp_path / "first" / "none-0.03" / "summary.json").read_text().replace('"started": "', '"started": "0'))
    save(tmp_path / "first", archive)
    restore(archive, tmp_path / "again")
    assert yaml.safe_load((tmp_path / "again" / "none-0.03" / "config.yaml").read_text())["optim"]["lr"] == 0.01
    unchanged = archive.stat().st_mtime_ns
    save(second, archive)  # nothing new: the file is not rewritten
    assert archive.stat().st_mtime_ns == unchanged


def test_the_driver_archives_the_finished_runs_of_a_sweep_that_fails(tmp_path):
    """The second grid's command fails (Hydra finds no such norm): the driver stops with that error,
    and the first grid's finished run is in the archive all the same."""
    from test_search import ENV, ROOT, TINY_RUN

    code = ("import sys; from bnp.sweep import run_experiment\n"
            "run_experiment('quickstart', [{'norm': 'bnp', 'optim.lr': '0.03', 'train.seed': '0'}, {'norm': 'nosuch'}],"
            f" fixed={TINY_RUN!r}, argv=sys.argv[1:])\n")
    argv = [sys.executable, "-c", code, "--launcher", "basic", "--out-root", str(tmp_path), "--results",
            str(tmp_path / "res"), "--bracket-cap", "0"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode != 0 and "CalledProcessError" in proc.stderr, proc.stderr[-2000:]
    with tarfile.open(tmp_path / "res" / "sweep.tar.gz") as tar:
        summaries = [json.load(tar.extractfile(n)) for n in tar.getnames() if n.endswith("summary.json")]
    assert [s["status"] for s in summaries] == ["completed"]
    missing = subprocess.run([*argv[:-4], "--results", str(tmp_path / "none"), "--restore"], cwd=ROOT,
                             capture_output=True, text=True, env=ENV, timeout=600)
    assert missing.returncode == 2 and f"--restore: no archive at {tmp_path / 'none' / 'sweep.tar.gz'}" in missing.stderr
