"""Exact properties of the Hessian analysis (claim 5)."""

import pytest
import torch
from torch import nn

from bnp.analysis.hessian import apply_u, lanczos, layer_conditioning, layer_loss, spectrum, u_matrix
from torch.func import hessian

F64 = dict(rtol=1e-10, atol=1e-10)


def least_squares(out, target):
    return 0.5 * (out - target).square().sum(1).mean()


def skewed_inputs(n_samples, features, gen):
    scale = torch.logspace(-1, 1, features, dtype=torch.float64)
    return torch.randn(n_samples, features, generator=gen, dtype=torch.float64) * scale + torch.linspace(-2, 4, features,
                                                                                                            dtype=torch.float64)


def test_least_squares_hessian_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    x, target = skewed_inputs(40, 5, gen), torch.randn(40, 3, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    f, theta0 = layer_loss(model, "0", x, target, least_squares)
    H = hessian(f)(theta0)
    augmented = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    A = augmented.T @ augmented / 40  # per output row: E[[a; 1][a; 1]^T]
    torch.testing.assert_close(H, torch.kron(torch.eye(3, dtype=torch.float64), A), **F64)


def test_preconditioned_condition_number_is_that_of_normalized_second_moments():
    gen = torch.Generator().manual_seed(1)
    x, target = skewed_inputs(64, 6, gen), torch.randn(64, 2, generator=gen, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 2)).double()
    result = layer_conditioning(model, "0", x, target, eps=0.05, loss_fn=least_squares)
    # derived: U^T H U = I (x) E[[a_hat; 1][a_hat; 1]^T] with a_hat = (a - mu) / sqrt(sigma2 + eps)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    a_hat = torch.cat([(x - mean) / (var + 0.05).sqrt(), torch.ones(64, 1, dtype=torch.float64)], 1)
    M = a_hat.T @ a_hat / 64
    eig = torch.linalg.eigvalsh(M)
    assert result.preconditioned.cond == pytest.approx((eig.max() / eig.min()).item(), rel=1e-10)
    assert result.preconditioned.zeros == 0 and result.plain.zeros == 0
    # and the badly scaled, off-center inputs make the plain problem far worse conditioned
    assert result.improvement > 100


def test_u_operator_matches_the_matrix():
    gen = torch.Generator().manual_seed(2)
    mean, var = torch.randn(4, generator=gen, dtype=torch.float64), torch.rand(4, generator=gen, dtype=torch.float64)
    U = torch.kron(torch.eye(3, dtype=torch.float64), u_matrix(mean, var, 0.1))
    v = torch.randn(15, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(apply_u(v, mean, var, 0.1), U @ v, **F64)
    torch.testing.assert_close(apply_u(v, mean, var, 0.1, transpose=True), U.T @ v, **F64)


def test_lanczos_agrees_with_exact_eigenvalues():
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    eig = torch.cat([torch.logspace(-3, 2, 59, dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64)])
    A = Q @ torch.diag(eig) @ Q.T
    full = lanczos(lambda v: A @ v, 60, 60)
    torch.testing.assert_close(full, torch.sort(eig).values, rtol=1e-8, atol=1e-8)
    partial = lanczos(lambda v: A @ v, 60, 30)
    assert partial.max().item() == pytest.approx(100.0, rel=1e-8)
    assert partial.min().item() == pytest.approx(-5.0, rel=1e-8)


def test_lanczos_path_agrees_with_exact_path_on_a_network_layer():
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = skewed_inputs(50, 6, gen), torch.randint(0, 3, (50,), generator=gen)
    for layer in ("0", "2"):
        exact = layer_conditioning(model, layer, x, y)
        approx = layer_conditioning(model, layer, x, y, max_exact=0, lanczos_steps=200)
        for a, b in ((exact.plain, approx.plain), (exact.preconditioned, approx.preconditioned)):
            assert b.lambda_max == pytest.approx(a.lambda_max, rel=1e-6)
            assert b.lambda_min_nonzero == pytest.approx(a.lambda_min_nonzero, rel=1e-4)
            assert "lanczos" in b.method and a.method == "exact"


def test_softmax_output_layer_null_space_is_reported():
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = skewed_inputs(30, 4, gen), torch.randint(0, 3, (30,), generator=gen)
    result = layer_conditioning(model, "2", x, y)
    # adding one vector to every row of [W | b] leaves softmax unchanged: >= n + 1 = 6 zero eigenvalues
    assert result.plain.zeros >= 6 and result.preconditioned.zeros >= 6
    assert result.plain.negatives == 0  # cross-entropy is convex in the last layer
    assert spectrum(torch.tensor([0.0, 1e-12, 2.0, -4.0])).cond == pytest.approx(2.0)


def test_the_callers_model_is_untouched_and_only_linear_layers():
    model = nn.Sequential(nn.Linear(3, 2))
    layer_conditioning(model, "0", torch.randn(5, 3), torch.randint(0, 2, (5,)))
    assert model[0].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="nn.Linear"):
        layer_conditioning(nn.Sequential(nn.Conv1d(1, 1, 1)), "0", torch.randn(2, 1, 3), torch.zeros(2, dtype=torch.long))


def test_analysis_never_feeds_a_training_hook():
    from bnp import BNP

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).train()
    pre = BNP(model)
    model(torch.randn(8, 4))
    before = {n: pre.stats(n) for n in pre.names}
    for max_exact in (10_000, 0):
        layer_conditioning(model, "0", torch.randn(16, 4) * 9 + 5, torch.randint(0, 3, (16,)), max_exact=max_exact,
                           lanczos_steps=10)
    assert model.training
    for n in pre.names:
        assert torch.equal(pre.stats(n).mean, before[n].mean) and pre.stats(n).batches == before[n].batches
