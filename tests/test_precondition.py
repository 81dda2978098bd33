"""Exact properties of the BNP preconditioner (docs/bnp-method.md)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP

F64 = dict(rtol=1e-12, atol=1e-12)


def feed(model, x):
    """One training-mode forward pass: folds x into the statistics."""
    model.train()
    with torch.no_grad():
        model(x)


def grads_of(model, x, y):
    """Gradients of a fixed loss, computed in eval mode so the statistics stay frozen."""
    model.eval()
    model.zero_grad()
    F.mse_loss(model(x), y).backward()


def dense_rule(G, g, mu, d2):
    """The spec's formulas for one dense layer, written out literally."""
    G_t = (G - torch.outer(g, mu)) / d2
    return G_t, g - G_t @ mu


def skewed(*shape, gen):
    """Inputs that are badly scaled and off-center per feature / channel."""
    scale = torch.logspace(-1, 1, shape[1], dtype=torch.float64)
    offset = torch.linspace(-3, 5, shape[1], dtype=torch.float64)
    view = (1, -1) + (1,) * (len(shape) - 2)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale.view(view) + offset.view(view)


# ---------------------------------------------------------------- reparameterization identity
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv2d_grouped"])
def test_step_equals_sgd_on_normalized_inputs(kind):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(6, 4).double()
        x, stats_x = skewed(16, 6, gen=gen), skewed(32, 6, gen=gen)
        y = torch.randn(16, 4, dtype=torch.float64, generator=gen)
    else:
        groups = 2 if kind == "conv2d_grouped" else 1
        layer = nn.Conv2d(4, 6, 3, groups=groups).double()
        x, stats_x = skewed(5, 4, 7, 7, gen=gen), skewed(8, 4, 7, 7, gen=gen)
        y = torch.randn(5, 6, 5, 5, dtype=torch.float64, generator=gen)
    pre = BNP(layer, eps=0.05)
    feed(layer, stats_x)
    mean, var, _ = pre.stats("")
    assert mean.dtype == torch.float64
    d = (var + pre.eps).sqrt()
    lr = 0.1

    # BNP path: precondition, then plain SGD on (W, b)
    W0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    grads_of(layer, x, y)
    pre.step()
    W_bnp = W0 - lr * layer.weight.grad
    b_bnp = b0 - lr * layer.bias.grad

    # Reference: same layer acting on normalized inputs a_hat = (a - mu)/d with W_hat = W diag(d),
    # b_hat = b + W mu (identical outputs); one SGD step on (W_hat, b_hat), then map back.
    if kind == "linear":
        col = d.view(1, -1)
        x_hat = (x - mean) / d
        W_hat = (W0 * col).requires_grad_()
        b_hat = (b0 + W0 @ mean).requires_grad_()
        out = F.linear(x_hat, W_hat, b_hat)
    else:
        g = layer.groups
        cpg = 4 // g
        col = d.view(g, 1, cpg, 1, 1).expand(g, 6 // g, cpg, 1, 1).reshape(6, cpg, 1, 1)
        mu_w = mean.view(g, 1, cpg, 1, 1).expand(g, 6 // g, cpg, 1, 1).reshape(6, cpg, 1, 1)
        x_hat = (x - mean.view(1, -1, 1, 1)) / d.view(1, -1, 1, 1)
        W_hat = (W0 * col).requires_grad_()
        b_hat = (b0 + (W0 * mu_w).sum((1, 2, 3))).requires_grad_()
        out = F.conv2d(x_hat, W_hat, b_hat, groups=g)
    torch.testing.assert_close(out, layer(x))  # the reparameterization leaves outputs unchanged
    F.mse_loss(out, y).backward()
    W_hat_new = W_hat.detach() - lr * W_hat.grad
    b_hat_new = b_hat.detach() - lr * b_hat.grad
    W_ref = W_hat_new / col
    if kind == "linear":
        b_ref = b_hat_new - W_ref @ mean
    else:
        b_ref = b_hat_new - (W_ref * mu_w).sum((1, 2, 3))
    torch.testing.assert_close(W_bnp, W_ref, **F64)
    torch.testing.assert_close(b_bnp, b_ref, **F64)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_rule_is_dense_rule_on_unfolded_patches(groups):
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2), groups=groups, padding=1).double()
    pre = BNP(conv, eps=0.03)
    feed(conv, skewed(3, 4, 6, 6, gen=gen))
    grads_of(conv, skewed(3, 4, 6, 6, gen=gen), torch.randn(3, 6, 6, 7, dtype=torch.float64, generator=gen))
    G, g = conv.weight.grad.clone(), conv.bias.grad.clone()
    mean, var, _ = pre.stats("")
    pre.step()
    # dense rule per group on the flattened kernel; a patch entry (c, i, j) carries channel c's stats
    k, cpg, opg = 3 * 2, 4 // groups, 6 // groups
    for grp in range(groups):
        rows, chans = slice(grp * opg, (grp + 1) * opg), slice(grp * cpg, (grp + 1) * cpg)
        mu_patch = mean[chans].repeat_interleave(k)
        d2_patch = (var[chans] + pre.eps).repeat_interleave(k)
        G_ref, g_ref = dense_rule(G[rows].reshape(opg, -1), g[rows], mu_patch, d2_patch)
        torch.testing.assert_close(conv.weight.grad[rows].reshape(opg, -1), G_ref, **F64)
        torch.testing.assert_close(conv.bias.grad[rows], g_ref, **F64)


def test_linear_rule_literal_and_3d_inputs():
    torch.manual_seed(2)
    layer = nn.Linear(5, 3).double()
    pre = BNP(layer, eps=0.1)
    feed(layer, torch.randn(4, 7, 5, dtype=torch.float64) + 2)  # (batch, time, features)
    grads_of(layer, torch.randn(4, 7, 5, dtype=torch.float64), torch.randn(4, 7, 3, dtype=torch.float64))
    G, g = layer.weight.grad.clone(), layer.bias.grad.clone()
    mean, var, _ = pre.stats("")
    pre.step()
    G_ref, g_ref = dense_rule(G, g, mean, var + 0.1)
    torch.testing.assert_close(layer.weight.grad, G_ref, **F64)
    torch.testing.assert_close(layer.bias.grad, g_ref, **F64)


@pytest.mark.parametrize("center,scale", [(True, False), (False, True), (False, False)])
def test_center_and_scale_switches(center, scale):
    torch.manual_seed(3)
    layer = nn.Linear(5, 3).double()
    pre = BNP(layer, eps=0.1, center=center, scale=scale)
    feed(layer, torch.randn(9, 5, dtype=torch.float64) * 3 + 2)
    grads_of(layer, torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64))
    G, g = layer.weight.grad.clone(), layer.bias.grad.clone()
    mean, var, _ = pre.stats("")
    pre.step()
    mu = mean if center else torch.zeros_like(mean)
    d2 = var + 0.1 if scale else torch.ones_like(var)
    G_ref, g_ref = dense_rule(G, g, mu, d2)
    torch.testing.assert_close(layer.weight.grad, G_ref, **F64)
    torch.testing.assert_close(layer.bias.grad, g_ref, **F64)


def test_layer_without_bias_only_scales():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 4, bias=False).double(), nn.Tanh())
    conv = nn.Conv2d(3, 2, 3, bias=False).double()
    for layer, x in ((model, torch.randn(8, 5, dtype=torch.float64) + 3),
                     (conv, torch.randn(2, 3, 5, 5, dtype=torch.float64) * 4 - 1)):
        pre = BNP(layer, eps=0.2)
        feed(layer, x)
        layer.zero_grad()
        layer.train(False)
        layer(x).square().sum().backward()
        weight = next(layer.parameters())
        G = weight.grad.clone()
        name = pre.names[0]
        var = pre.stats(name).var
        pre.step()
        view = (1, -1) + (1,) * (G.dim() - 2)
        torch.testing.assert_close(weight.grad, G / (var + 0.2).view(view), **F64)


# ---------------------------------------------------------------- running statistics
def reference_stats(batches, momentum, dims):
    """The spec's recurrences in float64, written out literally."""
    mu = sigma2 = None
    for a in batches:
        a = a.double()
        m_b = a.mean(dim=dims)
        if mu is None:
            mu = m_b
            sigma2 = ((a - expand(mu, a, dims)) ** 2).mean(dim=dims)
        else:
            mu = (1 - momentum) * mu + momentum * m_b
            sigma2 = (1 - momentum) * sigma2 + momentum * ((a - expand(mu, a, dims)) ** 2).mean(dim=dims)
    return mu, sigma2


def expand(v, a, dims):
    shape = [1 if d in dims else s for d, s in enumerate(a.shape)]
    return v.view(shape)


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_statistics_follow_the_recurrences(batch, kind):
    torch.manual_seed(5)
    if kind == "linear":
        layer, dims = nn.Linear(7, 2), (0,)
        stream = [torch.randn(batch, 7) * torch.arange(1, 8) + 3 for _ in range(40)]
    else:
        layer, dims = nn.Conv2d(3, 2, 3), (0, 2, 3)
        stream = [torch.randn(batch, 3, 5, 5) * 2 - 1 for _ in range(40)]
    pre = BNP(layer, momentum=0.05)
    assert pre.stats("").batches == 0
    feed(layer, stream[0])
    first = pre.stats("")
    mu0, var0 = reference_stats(stream[:1], 0.05, dims)
    torch.testing.assert_close(first.mean.double(), mu0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first.var.double(), var0, rtol=1e-6, atol=1e-6)
    if kind == "linear" and batch == 1:
        assert torch.equal(first.var, torch.zeros(7))  # one value per feature: variance 0
    for x in stream[1:]:
        feed(layer, x)
    mu, var = reference_stats(stream, 0.05, dims)
    got = pre.stats("")
    assert got.batches == 40 and got.mean.dtype == torch.float32
    torch.testing.assert_close(got.mean.double(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.var.double(), var, rtol=1e-5, atol=1e-5)

    # evaluation mode never changes the statistics
    layer.eval()
    layer(stream[0] * 100)
    after = pre.stats("")
    assert torch.equal(after.mean, got.mean) and torch.equal(after.var, got.var) and after.batches == 40


@pytest.mark.parametrize("batch", [1, 16])
def test_statistics_in_a_training_loop_with_repeated_forwards(batch):
    """Grad-enabled forwards are folded lazily (all layers at once in step()); a second forward
    before step(), stats() in between and no_grad forwards must give the same recurrences."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2))
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 1, groups=1), nn.Flatten(), nn.Linear(4 * 9, 2))
    for net, shape in ((model, (batch, 5)), (conv, (batch, 2, 5, 5))):
        seen = {name: [] for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        for name, m in net.named_modules():
            if name in seen:
                m.register_forward_pre_hook(lambda mod, a, name=name: seen[name].append(a[0].detach().clone()))
        pre = BNP(net, momentum=0.2)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        for i in range(12):
            x = torch.randn(*shape) * 2 + 1
            if i % 4 == 3:
                with torch.no_grad():
                    net(x)  # folded at once
            net(x).sum().backward()
            if i % 3 == 1:
                net(x * 0.5).sum().backward()  # second forward before step()
            if i % 5 == 2:
                pre.stats(pre.names[0])
            pre.step()
            opt.step()
            opt.zero_grad()
        for name, inputs in seen.items():
            dims = (0,) if inputs[0].dim() == 2 else (0, 2, 3)
            mu, var = reference_stats(inputs, 0.2, dims)
            got = pre.stats(name)
            assert got.batches == len(inputs)
            torch.testing.assert_close(got.mean.double(), mu, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.var.double(), var, rtol=1e-5, atol=1e-5)


def test_unbatched_inputs_and_low_precision_inputs_keep_float32_stats():
    conv = nn.Conv2d(3, 2, 3).to(torch.bfloat16)
    pre = BNP(conv)
    x = torch.randn(3, 6, 6)
    conv(x.to(torch.bfloat16))  # unbatched (C, H, W)
    stats = pre.stats("")
    assert stats.mean.dtype == torch.float32 and stats.mean.shape == (3,)
    torch.testing.assert_close(stats.mean, x.to(torch.bfloat16).float().mean((1, 2)))


# ---------------------------------------------------------------- properties of P
def test_preconditioned_direction_is_a_descent_direction():
    torch.manual_seed(6)
    for layer, x in ((nn.Linear(10, 6), torch.randn(32, 10) * 5 + 10),
                     (nn.Conv2d(3, 4, 3, groups=1), torch.randn(4, 3, 6, 6) * 0.1 - 7)):
        pre = BNP(layer, eps=1e-3)
        feed(layer, x)
        for _ in range(20):
            G, g = torch.randn_like(layer.weight), torch.randn_like(layer.bias)
            layer.weight.grad, layer.bias.grad = G.clone(), g.clone()
            pre.steps = 0
            pre.step()
            inner = (G.double() * layer.weight.grad.double()).sum() + (g.double() * layer.bias.grad.double()).sum()
            assert inner > 0
            # <grad, P grad> = |U^T grad|^2 with U^T [w; b] = [D^-1/2 (w - b mu); b] per output row
            mean, var, _ = pre.stats(pre.names[0])
            view = (1, -1) + (1,) * (G.dim() - 2)
            Ut_w = (G.double() - g.double().view((-1,) + (1,) * (G.dim() - 1)) * mean.double().view(view)) / (
                var.double() + pre.eps
            ).sqrt().view(view)
            expected = Ut_w.square().sum() + g.double().square().sum()
            torch.testing.assert_close(inner, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- API behaviour
def mlp():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_skip_warmup_repr_remove():
    model = mlp()
    pre = BNP(model, skip=("4",), warmup=2)
    assert pre.names == ["0", "2"]
    assert "0: Linear(in=6)" in repr(pre) and "warmup=2" in repr(pre)
    x = torch.randn(5, 6) + 1
    grads = []
    for _ in range(3):
        model.zero_grad()
        model(x).sum().backward()
        before = [p.grad.clone() for p in model.parameters()]
        pre.step()
        grads.append([(b, p.grad) for b, p in zip(before, model.parameters())])
    for step in grads[:2]:  # warmup: untouched
        assert all(torch.equal(b, a) for b, a in step)
    last = grads[2]
    assert not torch.equal(*last[0]) and not torch.equal(*last[2])  # tracked layers changed
    assert torch.equal(*last[4]) and torch.equal(*last[5])  # skipped output layer untouched
    pre.remove()
    model(x * 10)
    assert pre.stats("0").batches == 3


@pytest.mark.parametrize("fast", [False, True])
def test_a_second_step_without_a_new_forward_is_refused(fast):
    model = mlp().double()
    pre = BNP(model, fast=fast)
    x = torch.randn(4, 6, dtype=torch.float64) + 1
    model(x).sum().backward()
    pre.step()
    once = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"have not changed since the last step\(\)"):
        pre.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(once, model.parameters()))  # not preconditioned twice
    model.zero_grad()
    model(x).sum().backward()
    pre.step()  # a new forward and backward: fine again
    model[0].weight.grad.mul_(2)  # so is a gradient edited in place (e.g. zero_grad(set_to_none=False))
    pre.step()
    assert pre.steps == 3


@pytest.mark.parametrize("fast", [False, True])
def test_steps_without_statistics_leave_grads_alone_and_keep_the_warmup(fast):
    model = mlp().double()
    plain = copy.deepcopy(model)  # the same network without BNP: its gradients are the raw ones
    pre = BNP(model, warmup=1, fast=fast)
    x = torch.randn(4, 6, dtype=torch.float64) + 1

    def step_and_compare():
        for net in (model, plain):
            net.zero_grad()
            net(x).sum().backward()
        pre.step()
        return torch.equal(model[0].weight.grad, plain[0].weight.grad)

    with pytest.raises(RuntimeError, match="no tracked layer has a gradient"):
        pre.step()  # before any forward or backward: misuse, and nothing counts towards warmup
    model.eval(), plain.eval()  # forward and backward without statistics
    assert step_and_compare() and pre.steps == 0
    model.train(), plain.train()
    assert step_and_compare() and pre.steps == 1  # the one warmup step
    assert not step_and_compare() and pre.steps == 2  # preconditioned


def test_skip_by_class_name_and_glob():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    assert BNP(model, skip="Conv2d").names == ["2"]
    assert BNP(model, skip=["[2-9]"]).names == ["0"]
    with pytest.raises(ValueError, match="nothing to precondition"):
        BNP(model, skip=["*"])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(momentum=0.0), "momentum"),
        (dict(momentum=1.5), "momentum"),
        (dict(momentum="0.1"), "momentum"),
        (dict(sync="yes"), "sync"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-3), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(warmup=-1), "warmup"),
        (dict(warmup=1.5), "warmup"),
        (dict(center="yes"), "center"),
        (dict(skip=("fc_out",)), "skip pattern 'fc_out' matches no layer"),
    ],
)
def test_invalid_options_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BNP(mlp(), **kwargs)


def test_non_module_and_model_without_layers():
    with pytest.raises(TypeError, match="nn.Module"):
        BNP(object())
    with pytest.raises(ValueError, match="nothing to precondition"):
        BNP(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to precondition"):
        BNP(frozen)


def train_steps(model, pre, opt, data, n):
    for i in range(n):
        x, y = data[i % len(data)]
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()


def test_state_dict_round_trip_gives_identical_next_steps():
    gen = torch.Generator().manual_seed(8)
    data = [(torch.randn(4, 6, generator=gen) * 3 + 1, torch.randint(0, 3, (4,), generator=gen)) for _ in range(10)]
    model = mlp()
    pre = BNP(model, momentum=0.2, warmup=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, pre, opt, data, 5)
    saved = copy.deepcopy((model.state_dict(), pre.state_dict(), opt.state_dict()))

    clone = mlp()
    clone_pre = BNP(clone, momentum=0.2, warmup=1)
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.05, momentum=0.9)
    clone.load_state_dict(saved[0])
    clone_pre.load_state_dict(saved[1])
    clone_opt.load_state_dict(saved[2])

    train_steps(model, pre, opt, data[5:], 3)
    train_steps(clone, clone_pre, clone_opt, data[5:], 3)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(pre.stats("2").var, clone_pre.stats("2").var)

    with pytest.raises(KeyError, match="missing layers"):
        BNP(mlp(), skip="4").load_state_dict(saved[1])


def test_bfloat16_model_and_cpu_amp_paths_run():
    gen = torch.Generator().manual_seed(9)
    data = [(torch.randn(8, 6, generator=gen) + 2, torch.randint(0, 3, (8,), generator=gen)) for _ in range(4)]

    model = mlp().to(torch.bfloat16)
    pre = BNP(model)
    x = data[0][0].to(torch.bfloat16)
    F.cross_entropy(model(x).float(), data[0][1]).backward()
    G, g = model[0].weight.grad.float().clone(), model[0].bias.grad.float().clone()
    pre.step()
    assert model[0].weight.grad.dtype == torch.bfloat16
    mean, var, _ = pre.stats("0")
    G_ref, g_ref = dense_rule(G, g, mean, var + pre.eps)
    torch.testing.assert_close(model[0].weight.grad.float(), G_ref, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(model[0].bias.grad.float(), g_ref, rtol=2e-2, atol=1e-2)

    model = mlp()
    pre = BNP(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for step in range(30):
        x, y = data[step % 4]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        pre.step()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-4:]) < sum(losses[:4])


def test_channels_last_conv_grads():
    torch.manual_seed(10)
    # float64: the two memory layouts sum in different orders, which float32 rounding would show
    conv = nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv).to(memory_format=torch.contiguous_format)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64) + 1
    outs = []
    for layer, inp in ((conv, x.to(memory_format=torch.channels_last)), (ref, x)):
        pre = BNP(layer)
        layer(inp).square().sum().backward()
        pre.step()
        outs.append((layer.weight.grad, layer.bias.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = mlp()
    gpu = copy.deepcopy(model).cuda()
    x, y = torch.randn(8, 6) + 2, torch.randint(0, 3, (8,))
    for m, dev in ((model, "cpu"), (gpu, "cuda")):
        pre = BNP(m)
        F.cross_entropy(m(x.to(dev)), y.to(dev)).backward()
        pre.step()
    for a, b in zip(model.parameters(), gpu.parameters()):
        torch.testing.assert_close(a.grad, b.grad.cpu(), rtol=1e-4, atol=1e-5)


def test_state_is_two_float32_vectors_per_tracked_input():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    pre = BNP(model)
    tensors = [v for v in vars(pre.running).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) == 2 * (3 + 8 * 4 * 4)
    assert all(t.dtype == torch.float32 for t in tensors)


@pytest.mark.parametrize("batch", [1, 16])
def test_one_pass_moments_match_the_two_pass_reference(batch):
    """The GPU path (torch.var_mean) gives the statistics of the exact two-pass path."""
    results = []
    for moments in ("two_pass", "one_pass"):
        torch.manual_seed(12)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
        pre = BNP(model, momentum=0.3, moments=moments)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for i in range(10):
            x = torch.randn(batch, 2, 6, 6) * 3 + 2
            if i == 4:
                with torch.no_grad():
                    model(x)  # the per-layer path
            model(x).sum().backward()
            pre.step()
            opt.step()
            opt.zero_grad()
        results.append({n: pre.stats(n) for n in pre.names})
    for name in results[0]:
        torch.testing.assert_close(results[1][name].mean, results[0][name].mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[1][name].var, results[0][name].var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,alpha", [(1, 0.01), (4, 0.04), (10, 0.1), (64, 0.1)])
def test_auto_momentum_is_min_of_bn_default_and_batch_over_100(batch, alpha):
    torch.manual_seed(13)
    layer = nn.Linear(5, 2)
    pre = BNP(layer)  # momentum=None: auto
    stream = [torch.randn(batch, 5) * 2 + 1 for _ in range(6)]
    for x in stream:
        feed(layer, x)
    mu, var = reference_stats(stream, alpha, (0,))
    torch.testing.assert_close(pre.stats("").mean.double(), mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pre.stats("").var.double(), var, rtol=1e-5, atol=1e-6)
    assert "momentum=auto" in repr(pre)


def test_parameters_left_to_the_optimizer_are_listed_and_warned_about():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.attn = nn.Embedding(10, 8), nn.MultiheadAttention(8, 2, batch_first=True)
            self.ln, self.fc, self.out = nn.LayerNorm(8), nn.Linear(8, 3), nn.Linear(3, 3)

        def forward(self, x):
            h = self.emb(x)
            return self.out(self.fc(self.ln(self.attn(h, h, h)[0])))

    with pytest.warns(UserWarning) as caught:
        pre = BNP(Net(), skip="out")
    (warning,) = caught
    text = str(warning.message)
    assert text.startswith("BNP leaves these weights to the plain optimizer: emb: Embedding (weight); "
                           "attn: MultiheadAttention (in_proj_weight, in_proj_bias); attn.out_proj:")
    assert "nn.MultiheadAttention is not supported" in text
    assert "ln:" not in text and "out:" not in text  # vectors, and a layer skipped on purpose
    assert pre.names == ["fc"]  # not attn.out_proj: MultiheadAttention never calls its forward
    listing = repr(pre).split("left to the optimizer (5 modules):")[1]
    for line in ("emb: Embedding (weight)", "ln: LayerNorm (weight, bias)", "out: Linear (weight, bias)"):
        assert line in listing
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model BNP covers entirely: no warning, nothing listed
        assert "left to the optimizer" not in repr(BNP(mlp()))
