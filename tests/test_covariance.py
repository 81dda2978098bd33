"""The full-covariance rule (bnp.FullCovariance) against direct formulas in float64."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP, FullCovariance
from bnp.train import run
from conftest import TINY, train_steps as train


def correlated(n: int, features: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs with correlated, off-center, unevenly scaled features (what a diagonal cannot undo)."""
    mix = torch.randn(features, features, generator=gen, dtype=torch.float64)
    return torch.randn(n, features, generator=gen, dtype=torch.float64) @ mix + torch.linspace(-2, 3, features,
                                                                                              dtype=torch.float64)


def running(batches: list[torch.Tensor], momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec's recurrences with outer products, written out: the first batch sets mu and Sigma."""
    mu = batches[0].mean(0)
    sigma = (batches[0] - mu).T @ (batches[0] - mu) / len(batches[0])
    for a in batches[1:]:
        mu = (1 - momentum) * mu + momentum * a.mean(0)
        sigma = (1 - momentum) * sigma + momentum * (a - mu).T @ (a - mu) / len(a)
    return mu, sigma


def rule(G: torch.Tensor, g: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, eps: float):
    C = torch.linalg.inv(sigma + eps * torch.eye(len(mu), dtype=sigma.dtype))
    G_tilde = (G - torch.outer(g, mu)) @ C
    return G_tilde, g - G_tilde @ mu


def test_dense_layers_get_the_inverse_covariance_rule():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    raw = copy.deepcopy(model)
    pre = FullCovariance(model, momentum=0.3, eps=0.05, refresh=1)
    batches = [correlated(16, 6, gen) for _ in range(3)]
    y = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    for x in batches:
        for net in (model, raw):
            net.zero_grad()
            F.mse_loss(net(x), y).backward()
        pre.step()
    hidden = [torch.tanh(raw[0](x)).detach() for x in batches]
    for got, want, inputs in ((model[0], raw[0], batches), (model[2], raw[2], hidden)):
        G_t, g_t = rule(want.weight.grad, want.bias.grad, *running(inputs, 0.3), 0.05)
        torch.testing.assert_close(got.weight.grad, G_t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.bias.grad, g_t, rtol=1e-10, atol=1e-12)


def test_one_step_is_plain_sgd_on_whitened_inputs():
    """The reparameterization: W = W_hat A, b = b_hat - W_hat A mu with A the symmetric (Sigma + eps
    I)^(-1/2); an SGD step on (W_hat, b_hat), mapped back, is the preconditioned step on (W, b)."""
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(4, 2).double()
    x, y = correlated(32, 4, gen), torch.randn(32, 2, generator=gen, dtype=torch.float64)
    pre = FullCovariance(layer, eps=0.1)
    F.mse_loss(layer(x), y).backward()
    pre.step()
    lr = 0.1
    W_new, b_new = layer.weight - lr * layer.weight.grad, layer.bias - lr * layer.bias.grad
    mu, sigma = running([x], 1.0)
    vals, vecs = torch.linalg.eigh(sigma + 0.1 * torch.eye(4, dtype=torch.float64))
    A = vecs @ torch.diag(vals.rsqrt()) @ vecs.T
    W_hat = (layer.weight @ torch.linalg.inv(A)).detach().requires_grad_()
    b_hat = (layer.bias + layer.weight @ mu).detach().requires_grad_()
    F.mse_loss((x - mu) @ A.T @ W_hat.T + b_hat, y).backward()
    with torch.no_grad():
        W_hat -= lr * W_hat.grad
        b_hat -= lr * b_hat.grad
    torch.testing.assert_close(W_new, W_hat @ A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b_new, b_hat - W_hat @ A @ mu, rtol=1e-10, atol=1e-12)


def test_convolutions_are_the_dense_rule_on_their_patches():
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    raw = copy.deepcopy(conv)
    pre = FullCovariance(conv, momentum=0.5, eps=0.02, refresh=1)
    batches = [torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64) * 2 + 1 for _ in range(2)]
    for x in batches:
        for net in (conv, raw):
            net.zero_grad()
            net(x).square().mean().backward()
        pre.step()
    patches = [F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18) for x in batches]
    G_t, g_t = rule(raw.weight.grad.view(3, -1), raw.bias.grad, *running(patches, 0.5), 0.02)
    torch.testing.assert_close(conv.weight.grad, G_t.view_as(conv.weight), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(conv.bias.grad, g_t, rtol=1e-10, atol=1e-12)


def test_the_inverse_is_refreshed_every_refresh_steps():
    """refresh=2: the second step uses the inverse of the first step's statistics."""
    gen = torch.Generator().manual_seed(3)
    layer = nn.Linear(3, 1, bias=False).double()
    pre = FullCovariance(layer, momentum=0.5, eps=0.1, refresh=2)
    batches = [correlated(8, 3, gen) for _ in range(3)]
    for i, x in enumerate(batches):
        layer.zero_grad()
        layer(x).sum().backward()
        raw = x.sum(0, keepdim=True)  # dL/dW of a sum
        pre.step()
        statistics = running(batches[: 1 if i == 1 else i + 1], 0.5)[1]
        want = raw @ torch.linalg.inv(statistics + 0.1 * torch.eye(3, dtype=torch.float64))
        torch.testing.assert_close(layer.weight.grad, want, rtol=1e-10, atol=1e-12)


def test_state_dict_resumes_exactly_and_misuse_raises():
    gen = torch.Generator().manual_seed(4)
    data = [(correlated(8, 4, gen).float(), torch.randint(0, 2, (8,), generator=gen)) for _ in range(6)]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    pre, opt = FullCovariance(model, refresh=4), torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, pre, opt, data[:3])
    twin.load_state_dict(model.state_dict())
    twin_pre, twin_opt = FullCovariance(twin, refresh=4), torch.optim.SGD(twin.parameters(), lr=0.1)
    twin_pre.load_state_dict(pre.state_dict())
    train(model, pre, opt, data[3:])
    train(twin, twin_pre, twin_opt, data[3:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert "0: Linear(4 features)" in repr(pre) and "refresh=4" in repr(pre)
    pre.remove()
    with pytest.raises(RuntimeError, match="removed"):
        pre.step()
    with pytest.raises(RuntimeError, match="no tracked layer has a gradient"):
        FullCovariance(nn.Linear(2, 2)).step()
    for bad in (dict(eps=0), dict(refresh=0), dict(momentum=2.0), dict(skip=["nope"])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FullCovariance(nn.Linear(2, 2), **bad)
    wide = FullCovariance(nn.Sequential(nn.Linear(50, 2), nn.Linear(2, 2)), max_features=10)
    assert wide.names == ["1"] and "50 input features > max_features=10" in repr(wide)


def test_on_uncorrelated_inputs_the_full_rule_is_bnp():
    """With one feature per layer there is no correlation to undo: the full rule equals BNP."""
    gen = torch.Generator().manual_seed(5)
    full, diag = nn.Linear(1, 3).double(), nn.Linear(1, 3).double()
    diag.load_state_dict(full.state_dict())
    pres = FullCovariance(full, momentum=0.2, refresh=1), BNP(diag, momentum=0.2)
    for _ in range(3):
        x = torch.randn(8, 1, generator=gen, dtype=torch.float64) * 3 + 2
        for layer, pre in zip((full, diag), pres):
            layer.zero_grad()
            layer(x).square().sum().backward()
            pre.step()
        torch.testing.assert_close(full.weight.grad, diag.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(full.bias.grad, diag.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", [["model=mlp", "model.width=16"], ["model=cnn", "model.channels=[4,8]",
                                                                      "model.convs_per_stage=1", "model.head=fc"]])
def test_the_runner_trains_with_norm_bnp_full(compose, tmp_path, model):
    summary = run(compose(*TINY, *model, "norm=bnp_full", "train.steps=6", "norm.refresh=2"), tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 6


def test_the_full_rule_refuses_the_diagonal_options(compose, tmp_path):
    from bnp.config import ConfigError

    with pytest.raises(ConfigError, match=r"norm.covariance: must be 'diagonal' with the BNP options \['eps_relative'\]"):
        run(compose(*TINY, "norm=bnp_full", "norm.eps_relative=true"), tmp_path)
    with pytest.raises(ConfigError, match="norm.refresh: must be an integer >= 1"):
        run(compose(*TINY, "norm=bnp_full", "norm.refresh=0"), tmp_path / "b")


def test_inputs_that_blew_up_give_nan_gradients_not_an_exception():
    """A non-finite covariance cannot be factorized: the step makes the gradients NaN, which the
    runner's divergence rule reports, instead of stopping the run with a linear-algebra error."""
    layer = nn.Linear(3, 2)
    pre = FullCovariance(layer, refresh=1)
    x = torch.tensor([[1.0, float("inf"), 0.0], [0.0, 1.0, 2.0]])
    layer(x).sum().backward()
    pre.step()
    assert layer.weight.grad.isnan().all()
