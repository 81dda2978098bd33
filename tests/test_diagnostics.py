"""bnp.analysis.diagnostics: each instrument equals its formula, and runs log them."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP
from bnp.analysis.diagnostics import Diagnostics
from bnp.train import run
from conftest import TINY


def test_instruments_equal_their_formulas():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    pre = BNP(model, eps=0.05)
    diag = Diagnostics(model, pre)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 5, dtype=torch.float64) * torch.tensor([1.0, 0.01, 2.0, 0.1, 1.0], dtype=torch.float64)
    y = torch.randint(0, 3, (16,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        before = [m.weight.detach().clone() for m in (model[0], model[2])]
        diag.before_update()
        opt.step()
        return before

    step()
    first = diag.measure()
    assert "diag/mean_drift/0" not in first  # drift needs a previous log step
    stats0 = [pre.stats(n) for n in pre.names]
    before = step()
    out = diag.measure()
    for name, module, w0 in zip(pre.names, (model[0], model[2]), before):
        ratio = ((module.weight.detach() - w0).norm() / w0.norm()).item()
        assert out[f"diag/update_ratio/{name}"] == pytest.approx(ratio, rel=1e-12)
        stats = pre.stats(name)
        assert out[f"diag/max_inv_d2/{name}"] == pytest.approx(1 / (stats.var.min().item() + 0.05), rel=1e-6)
        assert out[f"diag/floor_share/{name}"] == pytest.approx((stats.var < 0.05).double().mean().item())
        old = stats0[pre.names.index(name)]
        assert out[f"diag/var_drift/{name}"] == pytest.approx(
            ((stats.var - old.var).norm() / old.var.norm()).item(), rel=1e-6)
    assert out["diag/floor_share/0"] >= 0.2  # the feature scaled by 0.01 sits below the floor
    assert out["diag/update_ratio/max"] == max(out["diag/update_ratio/0"], out["diag/update_ratio/2"])


@pytest.mark.parametrize("center, scale, expected", [(True, False, {"update_ratio", "mean_drift", "var_drift"}),
                                                      (False, False, {"update_ratio"})])
def test_statistics_instruments_only_where_the_statistics_act(center, scale, expected):
    """Without scaling there is no sigma2 + eps to report; without centering or scaling the
    statistics change nothing, so only the update ratio is measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    pre = BNP(model, center=center, scale=scale)
    diag = Diagnostics(model, pre)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(16, 5)), torch.randint(0, 3, (16,))).backward()
        pre.step()
        diag.before_update()
        opt.step()
        out = diag.measure()
    assert {key.split("/")[1] for key in out} == expected


@pytest.mark.parametrize("norm", ["bnp", "bn"])
def test_runs_log_the_instruments_when_asked(compose, tmp_path, norm):
    cfg = compose(*TINY, "data=synthetic", f"norm={norm}", "train.steps=12", "train.log_every=4",
                  "train.eval_every=12", "train.diagnostics=true", "model.depth=1", "model.width=8")
    run(cfg, tmp_path / norm, in_sweep=True)
    rows = [json.loads(line) for line in (tmp_path / norm / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    assert len(train_rows) == 3 and all(r["diag/update_ratio/max"] > 0 for r in train_rows)
    assert all(("diag/max_inv_d2/max" in r) == (norm == "bnp") for r in train_rows)


def test_plot_script_draws_the_instruments_of_runs(compose, tmp_path):
    import importlib.util
    from pathlib import Path

    dirs = []
    for norm in ("bnp", "bn"):
        cfg = compose(*TINY, "data=synthetic", f"norm={norm}", "train.steps=8", "train.log_every=4",
                      "train.eval_every=8", "train.diagnostics=true", "model.depth=1", "model.width=8")
        run(cfg, tmp_path / norm, in_sweep=True)
        dirs.append(str(tmp_path / norm))
    path = Path(__file__).resolve().parent.parent / "scripts" / "plot_diagnostics.py"
    spec = importlib.util.spec_from_file_location("plot_diagnostics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([*dirs, "--out", str(tmp_path / "fig.png"), "--labels", "bnp,bn", "--table", str(tmp_path / "t.md")])
    assert "| bnp " in (tmp_path / "t.md").read_text() and "update_ratio median" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and (tmp_path / "fig_layers.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        module.main([dirs[0], "--out", str(tmp_path / "x.png"), "--labels", "a,b"])
