"""BNP's opt-in variants of its statistics, each checked exactly against an independent float64 formula
(the gradient rules that chain after BNP: tests/test_rules.py)."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP
from test_precondition import dense_rule, expand, skewed


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 2, 3)).double()


def train_step(model, pre, x, y):
    """One training forward (statistics) and backward, then step()."""
    model.train()
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    pre.step()


def batch_stats(a, mu=None, momentum=1.0, dims=(0,)):
    """The spec's recurrence for one batch, literally."""
    m_b = a.mean(dim=dims)
    new_mu = m_b if mu is None else (1 - momentum) * mu + momentum * m_b
    dev = ((a - expand(new_mu, a, dims)) ** 2).mean(dim=dims)
    return new_mu, dev


def inputs_of(model, x):
    """Each layer's input for x (float64), in model order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
             for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("fast", [False, True])
def test_relative_eps_uses_each_layers_mean_variance(fast):
    gen = torch.Generator().manual_seed(1)
    model = net()
    x, y = skewed(32, 6, gen=gen), torch.randn(32, 3, generator=gen, dtype=torch.float64)
    raw = copy.deepcopy(model)
    F.mse_loss(raw(x), y).backward()
    pre = BNP(model, eps=0.1, eps_relative=True, fast=fast)
    train_step(model, pre, x, y)
    for got, want, a in zip([model[0], model[2]], [raw[0], raw[2]], inputs_of(raw, x)):
        mu, var = batch_stats(a)
        d2 = var + 0.1 * var.mean()  # the layer's own variance scale sets the floor
        G_t, g_t = dense_rule(want.weight.grad, want.bias.grad, mu, d2)
        torch.testing.assert_close(got.weight.grad, G_t, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.bias.grad, g_t, rtol=1e-10, atol=1e-12)


def test_relative_eps_on_convolutions_and_before_any_variance():
    gen = torch.Generator().manual_seed(2)
    model = conv_net()
    x = skewed(4, 3, 7, 7, gen=gen)
    y = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    raw = copy.deepcopy(model)
    F.mse_loss(raw(x), y).backward()
    pre = BNP(model, eps=0.05, eps_relative=True)
    train_step(model, pre, x, y)
    layer, want, a = model[0], raw[0], inputs_of(raw, x)[0]
    mu, var = batch_stats(a, dims=(0, 2, 3))
    d2 = (var + 0.05 * var.mean()).view(1, -1, 1, 1)
    G_t = (want.weight.grad - want.bias.grad.view(-1, 1, 1, 1) * mu.view(1, -1, 1, 1)) / d2
    g_t = want.bias.grad - (G_t.sum((2, 3)) @ mu)
    torch.testing.assert_close(layer.weight.grad, G_t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, g_t, rtol=1e-10, atol=1e-12)

    # a single sample has no variance yet: the floor is 1 (only centering), not 0 (a division by 0)
    model, one = net(), skewed(1, 6, gen=gen)
    raw = copy.deepcopy(model)
    F.mse_loss(raw(one), torch.zeros(1, 3, dtype=torch.float64)).backward()
    pre = BNP(model, eps_relative=True)
    train_step(model, pre, one, torch.zeros(1, 3, dtype=torch.float64))
    G_t, _ = dense_rule(raw[0].weight.grad, raw[0].bias.grad, one[0], torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(model[0].weight.grad, G_t)


def test_average_start_is_a_cumulative_average_until_the_momentum_takes_over():
    gen = torch.Generator().manual_seed(3)
    layer = nn.Linear(4, 2).double()
    stream = [skewed(8, 4, gen=gen) for _ in range(7)]
    pre = BNP(layer, momentum=0.25, average_start=True)
    layer.train()
    with torch.no_grad():
        for x in stream[:4]:
            layer(x)
    # equal-size batches: after t <= 1/momentum batches the mean is the plain mean of the batch means
    torch.testing.assert_close(pre.stats("").mean, torch.stack([x.mean(0) for x in stream[:4]]).mean(0))
    with torch.no_grad():
        for x in stream[4:]:
            layer(x)
    mu = var = None
    for t, a in enumerate(stream, start=1):  # the recurrence with momentum max(0.25, 1/t)
        alpha = max(0.25, 1 / t)
        mu, dev = batch_stats(a, mu, alpha)
        var = dev if var is None else (1 - alpha) * var + alpha * dev
    got = pre.stats("")
    torch.testing.assert_close(got.mean, mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.var, var, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="graph"):
        with pre.recording():
            pass


def test_skip_first_and_last_layer_by_position():
    def model():
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))

    assert BNP(model(), skip=["@first"]).names == ["2", "4"]
    assert BNP(model(), skip=["@last"]).names == ["0", "2"]
    assert BNP(model(), skip=["@first", "@last"]).names == ["2"]


@pytest.mark.parametrize("kwargs, field", [({"eps_relative": 1}, "eps_relative"),
                                           ({"average_start": "yes"}, "average_start")])
def test_invalid_variant_options_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BNP(net(), **kwargs)


@pytest.mark.parametrize("key, value", [("momentum", 1.5), ("eps", 0.0), ("eps", float("inf")), ("warmup", -1)])
def test_the_library_and_the_config_accept_the_same_options(compose, tmp_path, key, value):
    """One record of what each option accepts (bnp/options.py): bnp.BNP and norm.<key> refuse alike."""
    from bnp.config import ConfigError
    from bnp.train import run

    with pytest.raises(ValueError, match=f"BNP: {key} must be"):
        BNP(net(), **{key: value})
    with pytest.raises(ConfigError, match=f"norm.{key}: must be"):
        run(compose("logger=none", "norm=bnp", f"norm.{key}={value}"), tmp_path)
