"""train.cuda_graph: each step after a short eager start is one replay of a captured step.

CPU has no CUDA graphs, so the CPU tests swap the capture for a stand-in whose replay runs the
captured step's kernels eagerly and, like a real replay, none of its host-side bookkeeping. What
they check is everything around the capture: the device-side batch position, the epoch buffers
refilled in place, the counters kept by the host, evaluation, logging and checkpoints in between.
The CUDA test at the end runs the real capture where a GPU is present.
"""

import contextlib

import pytest
import torch

from bnp.config import ConfigError, check_cuda_graph, validate
from bnp.log import read_metrics
from bnp.train import run
from conftest import TINY

RUN = [*TINY, "model=mlp", "model.depth=2", "model.width=16", "train.steps=30", "train.eval_every=10",
       "train.log_every=5", "optim.lr=0.01"]


class StandIn:
    """A capture for CPU: the replay runs the captured step's kernels eagerly and, like a real
    replay, none of its host-side bookkeeping. Records the step at which each capture happened."""

    def __init__(self):
        self.captured_at = []

    def __call__(self, step):
        trainer = step.__self__.trainer
        self.captured_at.append(trainer.step)

        def replay():
            with trainer.pre.recording() if trainer.pre is not None else contextlib.nullcontext():
                step()  # a replay runs kernels only: BNP's Python-side counts stay put

        return replay


@pytest.fixture
def cpu_graphs():
    return StandIn()


@pytest.mark.parametrize("overrides", [
    ["norm=bnp", "train.batch_size=1"],  # online learning, the fast path
    ["norm=bnp", "norm.fast=false", "norm.warmup=5"],  # reference path; capture after BNP's warmup
    ["norm=bn", "optim.momentum=0.9"],
    ["norm=ln", "optim.momentum=0.9", "optim.nesterov=true"],
    ["norm=bnp", "train.precision=bf16"],  # autocast without its cast cache, as capture needs
    ["norm=bnp", "grad=agc"],  # a Chain: BNP then unit-wise clipping, captured together
    ["norm=bn", "grad=[agc,lars]"],  # rules without BNP
])  # Adam's capturable step runs on GPUs only: see the CUDA test
def test_graph_mode_trains_exactly_like_eager_steps(compose, tmp_path, cpu_graphs, overrides):
    eager = run(compose(*RUN, *overrides), tmp_path / "eager")
    graphed = run(compose(*RUN, *overrides, "train.cuda_graph=true"), tmp_path / "graph", capture=cpu_graphs)
    assert graphed["status"] == eager["status"] == "completed"
    warmup = 5 if "norm.warmup=5" in overrides else 0
    assert cpu_graphs.captured_at == [3 + warmup]  # captured once, after the eager start
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "graph" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "eager" / "metrics.jsonl"))
    states = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("eager", "graph")]
    drop_time = lambda p: {k: v for k, v in p.items() if k != "train_seconds"}  # noqa: E731
    assert drop_time(states[0]["progress"]) == drop_time(states[1]["progress"])
    for key, value in states[0]["model"].items():
        assert torch.equal(states[1]["model"][key], value), key
    bnp_states = [bnp_state(s["pre"]) for s in states]
    if bnp_states[0] is not None:  # BNP's counts follow the replays
        assert bnp_states[1]["steps"] == bnp_states[0]["steps"] == 30
        for name, layer in bnp_states[0]["layers"].items():
            assert bnp_states[1]["layers"][name]["batches"] == layer["batches"]
            assert torch.equal(bnp_states[1]["layers"][name]["var"], layer["var"])


def bnp_state(pre: dict | None) -> dict | None:
    """BNP's state in a checkpoint: the preconditioner's own, or its entry in a Chain's."""
    if pre is None or "rules" not in pre:
        return pre
    return next((state for name, state in zip(pre["rules"], pre["state"]) if name == "BNP"), None)


def test_epochs_are_reshuffled_under_replays(compose, tmp_path, cpu_graphs):
    """30 steps of batch 4 over a 40-sample training set: three epochs, each in its own order."""
    run(compose(*RUN, "train.batch_size=4", "norm=bnp"), tmp_path / "eager")
    run(compose(*RUN, "train.batch_size=4", "norm=bnp", "train.cuda_graph=true"), tmp_path / "graph",
        capture=cpu_graphs)
    rows = [read_metrics(tmp_path / d / "metrics.jsonl") for d in ("eager", "graph")]
    assert [r.get("train_loss") for r in rows[0]] == [r.get("train_loss") for r in rows[1]]


def test_cuda_graph_config_errors_name_the_field(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"train.cuda_graph: needs a CUDA device \(train.device resolved to 'cpu'\)"):
        run(compose(*RUN, "train.cuda_graph=true"), tmp_path)
    cuda = torch.device("cuda")
    cases = {
        "optim.schedule=cosine": "optim.name='sgd' reads its lr on the host, so it needs optim.schedule='constant'",
        "train.precision=fp16": "not with train.precision='fp16'",
        "data.augment=true": "not with data augmentation",
    }
    for override, message in cases.items():
        cfg = validate(compose(*RUN, override, "train.cuda_graph=true"))
        with pytest.raises(ConfigError, match="train.cuda_graph: " + message.replace("(", r"\(")):
            check_cuda_graph(cfg, cuda)
    with pytest.raises(ConfigError, match=r"train.cuda_graph: not with several processes \(2\)"):
        check_cuda_graph(validate(compose(*RUN, "train.cuda_graph=true")), cuda, world=2)
    check_cuda_graph(validate(compose(*RUN, "optim=adamw", "optim.schedule=cosine")), cuda)  # allowed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overrides", [["norm=bnp", "train.batch_size=1"], ["norm=bnp", "optim=adam", "optim.schedule=cosine"],
                                       ["norm=bnp", "train.precision=bf16"]])
def test_real_cuda_graph_run_matches_eager_on_the_gpu(compose, tmp_path, overrides):
    device = [o for o in RUN if not o.startswith("train.device")] + ["train.device=cuda"]
    eager = run(compose(*device, *overrides), tmp_path / "eager")
    graphed = run(compose(*device, *overrides, "train.cuda_graph=true"), tmp_path / "graph")
    assert graphed["status"] == eager["status"] == "completed"
    for a, b in zip(read_metrics(tmp_path / "eager" / "metrics.jsonl"), read_metrics(tmp_path / "graph" / "metrics.jsonl")):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_interrupted_graph_run_resumes_to_the_uninterrupted_metrics(compose, tmp_path, cpu_graphs):
    """Stopped at step 20 (a checkpoint), the rerun starts eager again, captures anew, and ends
    exactly where an uninterrupted run ends."""
    overrides = [*RUN, "norm=bnp", "train.batch_size=2", "train.cuda_graph=true"]
    run(compose(*overrides), tmp_path / "whole", capture=cpu_graphs)

    def stop_at_20(trainer):
        if trainer.step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(compose(*overrides), tmp_path / "split", progress=stop_at_20, capture=cpu_graphs)
    resumed = run(compose(*overrides), tmp_path / "split", capture=cpu_graphs)
    assert resumed["status"] == "completed" and cpu_graphs.captured_at == [3, 3, 23]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "split" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "whole" / "metrics.jsonl"))


def test_compiled_model_trains_like_the_eager_one(compose, tmp_path):
    """train.compile=true with norm.fast=true: BNP's fast layers take the reference path under
    torch.compile (one warning), and training matches eager to float32 rounding."""
    overrides = [*RUN, "norm=bnp", "norm.fast=true", "train.steps=20"]
    eager = run(compose(*overrides), tmp_path / "eager")
    with pytest.warns(UserWarning, match=r"BNP\(fast=True\) under torch.compile"):
        compiled = run(compose(*overrides, "train.compile=true"), tmp_path / "compiled")
    assert compiled["status"] == eager["status"] == "completed"
    rows = [read_metrics(tmp_path / d / "metrics.jsonl") for d in ("eager", "compiled")]
    for a, b in zip(*rows):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_fast_path_under_torch_compile_has_no_graph_breaks():
    from torch import nn

    from bnp import BNP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    BNP(model, fast=True)
    explained = torch._dynamo.explain(model)(torch.randn(4, 12))
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_a_compiled_training_step_with_the_fast_path_equals_eager():
    """forward, backward, pre.step() and the optimizer in one torch.compile'd function (step() itself
    runs eagerly: torch.compiler.disable)."""
    import copy

    from torch import nn
    from torch.nn import functional as F

    from bnp import BNP

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 12) * 3 + 1, torch.randint(0, 3, (8,))
    trained = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        pre, opt = BNP(model, fast=True), torch.optim.SGD(model.parameters(), lr=0.05)

        def step(inputs):
            opt.zero_grad()
            F.cross_entropy(model(inputs), y).backward()
            pre.step()
            opt.step()

        run_step = torch.compile(step) if compiled else step
        with pytest.warns(UserWarning, match="under torch.compile") if compiled else contextlib.nullcontext():
            for i in range(5):
                run_step(x + i)
        trained.append(model)
    for a, b in zip(*(m.parameters() for m in trained)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
