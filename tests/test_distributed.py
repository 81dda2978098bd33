"""BNP under torch.distributed (gloo, 2 CPU processes): synced statistics keep replicas identical
and equal to single-process training on the global batch; without the sync they drift apart."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnp import BNP
from conftest import train_steps as train

STEPS, GLOBAL_BATCH = 15, 8


class Unsqueeze(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


def build() -> nn.Module:
    """Dense and conv layers, so both statistics paths are synced."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), Unsqueeze(), nn.Conv1d(1, 3, 3, padding=1), nn.Flatten(),
                         nn.Linear(48, 3))


def global_batch(step: int):
    """Each half of the global batch comes from a differently shifted distribution, so the two
    ranks' local statistics disagree and the sync has something to do."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen) * torch.linspace(0.5, 3, 6)
    x[GLOBAL_BATCH // 2 :] += 4.0
    return x, torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def worker(rank: int, world: int, init_file: str, sync: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = build()
    ddp = DistributedDataParallel(model)
    pre = BNP(model, sync=sync, momentum=0.2, fast=True)  # fast falls back to the reference path here
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    shards = []
    for step in range(STEPS):
        x, y = global_batch(step)
        shards.append((x.chunk(world)[rank], y.chunk(world)[rank]))
    train(ddp, pre, opt, shards)
    torch.save({"params": [p.detach().clone() for p in model.parameters()],
                "stats": {n: pre.stats(n) for n in pre.names}}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_two_ranks(tmp_path, sync: bool):
    out = tmp_path / ("sync" if sync else "nosync")
    out.mkdir()
    mp.spawn(worker, args=(2, str(out / "init"), sync, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_synced_replicas_are_identical_and_match_single_process(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, sync=True)
    for a, b in zip(rank0["params"], rank1["params"]):
        assert torch.equal(a, b)
    model = build()
    pre = BNP(model, momentum=0.2)
    train(model, pre, torch.optim.SGD(model.parameters(), lr=0.05), [global_batch(s) for s in range(STEPS)])
    for a, b in zip(rank0["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for name in pre.names:
        torch.testing.assert_close(rank0["stats"][name].mean, pre.stats(name).mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank0["stats"][name].var, pre.stats(name).var, rtol=1e-5, atol=1e-6)
        assert rank0["stats"][name].batches == STEPS


def test_without_sync_replicas_drift_apart(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, sync=False)
    drift = max((a - b).abs().max().item() for a, b in zip(rank0["params"], rank1["params"]))
    assert drift > 1e-3, drift
    assert not torch.allclose(rank0["stats"]["0"].mean, rank1["stats"]["0"].mean)


def test_torchrun_runner_matches_single_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m bnp.train` shards each global batch over 2 processes and
    ends where one process with the same global batch ends (float tolerance)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    args = ["logger=none", "norm=bnp", "train.batch_size=16", "train.steps=40", "train.eval_every=20",
            "train.device=cpu", "model.width=32"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "bnp.train",
                          *args, f"out_root={tmp_path / 'ddp'}"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "bnp.train", *args, f"out_root={tmp_path / 'one'}"], cwd=root,
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    (a,) = (tmp_path / "ddp" / "runs").glob("*/summary.json")
    (b,) = (tmp_path / "one" / "runs").glob("*/summary.json")
    a, b = json.loads(a.read_text()), json.loads(b.read_text())
    assert a["status"] == b["status"] == "completed" and a["processes"] == 2 and b["processes"] == 1
    for key in ("final_val_loss", "final_test_loss", "final_train_loss", "prequential_acc"):
        assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(b[key])), (key, a[key], b[key])


def test_torchrun_ranks_agree_to_start_over_when_rank_0_cannot_resume(tmp_path):
    """metrics.jsonl lost the rows the checkpoint counts on: rank 0 (the one that reads it) starts
    the run over and the other ranks follow, instead of resuming from the checkpoint alone."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    args = ["logger=none", "norm=bnp", "train.batch_size=16", "train.steps=40", "train.eval_every=20",
            "train.device=cpu", "model.width=32", f"out_root={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "bnp.train", *args]
    first = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    done = json.loads((run_dir / "summary.json").read_text())
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "summary.json").unlink()  # an unfinished run whose checkpoint (step 40) outlived its metrics
    (run_dir / "metrics.jsonl").write_text("")
    again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "starting the run over" in again.stderr, again.stdout[-2000:] + again.stderr[-2000:]
    redone = json.loads((run_dir / "summary.json").read_text())
    assert redone["status"] == "completed" and redone["steps"] == 40
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(rows)
    for key in ("final_val_loss", "final_train_loss", "prequential_acc"):
        assert abs(redone[key] - done[key]) <= 1e-6 * max(1.0, abs(done[key])), (key, redone[key], done[key])
