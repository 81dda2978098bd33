"""BNP helps plain SGD on badly scaled, off-center inputs (each method at its best learning rate)."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP

LR_GRID = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)


def make_problem(n=512, features=16, classes=4, seed=0):
    """A fixed teacher on well-conditioned features, observed through a bad affine map."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, features, generator=gen)
    teacher = torch.randn(features, classes, generator=gen)
    y = (z @ teacher + 0.1 * torch.randn(n, classes, generator=gen)).argmax(1)
    scale = torch.logspace(-1.5, 1.5, features)  # feature scales span 3 decades
    offset = torch.linspace(2, 8, features)  # and sit far from 0
    return z * scale + offset, y


def final_loss(x, y, batch_size, steps, lr, use_bnp, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    pre = BNP(model) if use_bnp else None
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        start = (step * batch_size) % len(x)
        idx = order[start : start + batch_size]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if pre is not None:
            pre.step()
        opt.step()
    with torch.no_grad():
        loss = F.cross_entropy(model.eval()(x), y).item()
    return loss if math.isfinite(loss) else math.inf


@pytest.mark.parametrize("batch_size,steps", [(1, 1500), (32, 300)])
def test_bnp_beats_plain_sgd_each_at_its_best_lr(batch_size, steps):
    x, y = make_problem()
    best = {
        use_bnp: min(final_loss(x, y, batch_size, steps, lr, use_bnp) for lr in LR_GRID)
        for use_bnp in (False, True)
    }
    print(f"batch {batch_size}: best loss plain SGD {best[False]:.4f}, SGD+BNP {best[True]:.4f}")
    assert best[True] < best[False]
