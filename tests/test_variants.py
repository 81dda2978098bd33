"""BNP's opt-in variants, each checked exactly against an independent float64 formula."""

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


@pytest.mark.parametrize("fast", [False, True])
def test_output_scale_divides_each_units_row_by_its_output_variance(fast):
    gen = torch.Generator().manual_seed(4)
    model, plain_model = net(), net()
    plain = BNP(plain_model, eps=0.02, fast=fast)
    pre = BNP(model, eps=0.02, output_scale=True, fast=fast)
    batches = [(skewed(16, 6, gen=gen), torch.randn(16, 3, generator=gen, dtype=torch.float64)) for _ in range(3)]
    outputs = {0: [], 2: []}
    for x, y in batches:
        model.eval()  # an eval-mode probe leaves every statistic alone
        with torch.no_grad():  # each layer's pre-activations on this batch (the weights stay fixed,
            h0 = model[0](x)    # so both models see the same inputs and statistics)
            outputs[0].append(h0)
            outputs[2].append(model[2](torch.tanh(h0)))
        train_step(model, pre, x, y)
        train_step(plain_model, plain, x, y)
    for i in (0, 2):
        mu = v = None
        for t, h in enumerate(outputs[i]):
            alpha = 1.0 if t == 0 else min(0.1, 16 / 100)
            mu, dev = batch_stats(h, mu, alpha)
            v = dev if v is None else (1 - alpha) * v + alpha * dev
        factor = 1 / (v + 0.02)
        # the last step's grads: the plain BNP grads of the same weights, row i times factor[i]
        torch.testing.assert_close(model[i].bias.grad, plain_model[i].bias.grad * factor, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(model[i].weight.grad, plain_model[i].weight.grad * factor[:, None],
                                   rtol=1e-9, atol=1e-12)


def test_output_scale_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    model = net()
    pre = BNP(model, output_scale=True)
    x, y = skewed(8, 6, gen=gen), torch.zeros(8, 3, dtype=torch.float64)
    train_step(model, pre, x, y)
    twin = net()  # a deep copy would carry a copy of the preconditioner along
    twin.load_state_dict(model.state_dict())
    other = BNP(twin, output_scale=True)
    other.load_state_dict(pre.state_dict())
    assert all(torch.equal(pre.outputs.var[k], other.outputs.var[k]) for k in pre.outputs.var)


def test_unit_wise_clipping_limits_each_units_gradient_to_a_share_of_its_weights():
    gen = torch.Generator().manual_seed(6)
    model, plain_model = net(), net()
    with torch.no_grad():
        model[0].weight[0].zero_()  # a unit with zero weights may still move 1e-3 * clip
        model[0].bias[0] = 0
        plain_model.load_state_dict(model.state_dict())
    pre, plain = BNP(model, clip=0.05), BNP(plain_model)
    x, y = skewed(32, 6, gen=gen), 10 * torch.randn(32, 3, generator=gen, dtype=torch.float64)
    train_step(model, pre, x, y)
    train_step(plain_model, plain, x, y)
    clipped = 0
    for got, want in ((model[0], plain_model[0]), (model[2], plain_model[2])):
        G_t, g_t, n = agc_formula(want.weight, want.bias, want.weight.grad, want.bias.grad, 0.05)
        clipped += n
        torch.testing.assert_close(got.weight.grad, G_t, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got.bias.grad, g_t, rtol=1e-12, atol=1e-15)
    assert clipped >= 2  # the test exercises the clipping, not only the pass-through
    assert torch.cat([model[0].weight.grad[0], model[0].bias.grad[:1]]).norm() <= 0.05 * 1e-3 * (1 + 1e-12)


def agc_formula(weight, bias, G, g, clip):
    """NFNets' unit-wise clipping of the gradient rows [G_i, g_i], written out in float64."""
    rows = lambda t: t.reshape(t.shape[0], -1)
    grad_norm = torch.cat([rows(G), g[:, None]], 1).norm(dim=1)
    weight_norm = torch.cat([rows(weight), bias[:, None]], 1).detach().norm(dim=1)
    limit = clip * torch.clamp(weight_norm, min=1e-3)
    factor = torch.where(grad_norm > limit, limit / grad_norm, torch.ones_like(grad_norm))
    return G * factor.view(-1, *(1,) * (G.dim() - 1)), g * factor, int((factor < 1).sum())


@pytest.mark.parametrize("make, fast", [(net, False), (net, True), (conv_net, False)])
def test_clipping_without_preconditioning_is_agc_on_the_raw_gradients(make, fast):
    """configs/norm/agc.yaml, the control for bnp_agc: center and scale off leave the plain gradient,
    which is then clipped; compared with a model that had no BNP at all."""
    gen = torch.Generator().manual_seed(7)
    model, raw = make(), make()
    if make is net:
        x, y = skewed(32, 6, gen=gen), 10 * torch.randn(32, 3, generator=gen, dtype=torch.float64)
    else:
        x, y = skewed(4, 3, 7, 7, gen=gen), 10 * torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    pre = BNP(model, center=False, scale=False, clip=0.05, fast=fast)
    for _ in range(2):  # the second step runs with statistics from the first
        train_step(model, pre, x, y)
        raw.zero_grad()
        F.mse_loss(raw(x), y).backward()
        clipped = 0
        for got, want in zip([m for m in model if m.__class__ is not nn.Tanh], [m for m in raw if m.__class__ is not nn.Tanh]):
            G_t, g_t, n = agc_formula(want.weight, want.bias, want.weight.grad, want.bias.grad, 0.05)
            clipped += n
            torch.testing.assert_close(got.weight.grad, G_t, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(got.bias.grad, g_t, rtol=1e-12, atol=1e-15)
        assert clipped >= 2  # the clipping is exercised, not only the pass-through
        with torch.no_grad():  # the same plain SGD step on both, so the second step compares again
            for a, b in zip(model.parameters(), raw.parameters()):
                a.sub_(0.01 * a.grad)
                b.copy_(a)


def trust_formula(weight, bias, G, g, trust):
    """LARS' layer-wise rescaling of the whole gradient [G, g], written out in float64."""
    grad_norm = torch.cat([G.flatten(), g]).norm()
    weight_norm = torch.cat([weight.detach().flatten(), bias.detach()]).norm()
    factor = trust * torch.clamp(weight_norm, min=1e-3) / grad_norm
    return G * factor, g * factor


@pytest.mark.parametrize("make, fast", [(net, False), (net, True), (conv_net, False)])
def test_trust_ratio_rescales_each_layers_preconditioned_gradient_to_a_share_of_its_weights(make, fast):
    """bnp_lars: BNP's preconditioned gradient, then each layer's [G, g] rescaled to length
    trust x ||[W, b]||; a layer with zero weights moves trust x 1e-3."""
    gen = torch.Generator().manual_seed(8)
    model = make()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    plain_model = copy.deepcopy(model)
    if make is net:
        x, y = skewed(32, 6, gen=gen), torch.randn(32, 3, generator=gen, dtype=torch.float64)
    else:
        x, y = skewed(4, 3, 7, 7, gen=gen), torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    pre, plain = BNP(model, trust=0.02, fast=fast), BNP(plain_model, fast=fast)
    for _ in range(2):  # the second step runs on moved weights and two batches' statistics
        train_step(model, pre, x, y)
        train_step(plain_model, plain, x, y)
        for got, want in ((model[0], plain_model[0]), (model[2], plain_model[2])):
            G_t, g_t = trust_formula(want.weight, want.bias, want.weight.grad, want.bias.grad, 0.02)
            torch.testing.assert_close(got.weight.grad, G_t, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(got.bias.grad, g_t, rtol=1e-12, atol=1e-15)
        with torch.no_grad():
            length = torch.cat([model[2].weight.grad.flatten(), model[2].bias.grad]).norm()
            weights = torch.cat([model[2].weight.flatten(), model[2].bias]).norm()
            torch.testing.assert_close(length, 0.02 * weights, rtol=1e-12, atol=0)
            for a, b in zip(model.parameters(), plain_model.parameters()):  # the same step on both
                a.sub_(0.1 * a.grad)
                b.copy_(a)
    first = torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad]).norm()  # weights still < 1e-3 long
    torch.testing.assert_close(first, torch.tensor(0.02 * 1e-3, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("fast", [False, True])
def test_trust_ratio_without_preconditioning_is_lars_on_the_raw_gradients(fast):
    """configs/norm/lars.yaml, the control for bnp_lars, against a model that had no BNP at all."""
    gen = torch.Generator().manual_seed(9)
    model, raw = net(), net()
    x, y = skewed(32, 6, gen=gen), torch.randn(32, 3, generator=gen, dtype=torch.float64)
    pre = BNP(model, center=False, scale=False, trust=0.02, fast=fast)
    train_step(model, pre, x, y)
    F.mse_loss(raw(x), y).backward()
    for got, want in ((model[0], raw[0]), (model[2], raw[2])):
        G_t, g_t = trust_formula(want.weight, want.bias, want.weight.grad, want.bias.grad, 0.02)
        torch.testing.assert_close(got.weight.grad, G_t, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got.bias.grad, g_t, rtol=1e-12, atol=1e-15)


def test_skip_first_and_last_layer_by_position():
    def model():
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))

    assert BNP(model(), skip=["@first"]).names == ["2", "4"]
    assert BNP(model(), skip=["@last"]).names == ["0", "2"]
    assert BNP(model(), skip=["@first", "@last"]).names == ["2"]


@pytest.mark.parametrize("kwargs, field", [({"clip": 0}, "clip"), ({"clip": True}, "clip"),
                                           ({"trust": -1.0}, "trust"), ({"trust": float("inf")}, "trust"),
                                           ({"eps_relative": 1}, "eps_relative"),
                                           ({"average_start": "yes"}, "average_start"),
                                           ({"output_scale": None}, "output_scale")])
def test_invalid_variant_options_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BNP(net(), **kwargs)
