"""BNP(fast=True) computes Linear gradients inside backward; it must equal the reference path."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP
from bnp.kernels import count_kernels
from bnp.precondition.layers import GradState

F64 = dict(rtol=1e-10, atol=1e-12)


class Unsqueeze(nn.Module):
    def forward(self, x):
        return x.unsqueeze(-2)


def conv_net(dtype=torch.float64):
    """Linear layers around a Conv1d (which stays on the reference path under fast=True)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), Unsqueeze(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 3)
    ).to(dtype)


def batches(n, batch, features=6, gen_seed=1, dtype=torch.float64, extra_dims=()):
    gen = torch.Generator().manual_seed(gen_seed)
    scale = torch.logspace(-1, 1, features, dtype=dtype)
    return [
        (
            torch.randn(batch, *extra_dims, features, generator=gen, dtype=dtype) * scale + 2,
            torch.randint(0, 3, (batch, *extra_dims), generator=gen),
        )
        for _ in range(n)
    ]


def loss_of(model, x, y):
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def train(model, pre, data, *, lr=0.05, accumulate=1, order="interleaved", watch=None):
    """SGD with momentum; ``accumulate`` forwards per step, backward after each or after all;
    ``watch(pre)`` runs after each step's backward passes, before ``pre.step()``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for i in range(0, len(data), accumulate):
        opt.zero_grad()
        chunk = data[i : i + accumulate]
        if order == "interleaved":
            for x, y in chunk:
                loss_of(model, x, y).backward()
        else:  # all forwards first, one backward of the summed loss
            sum(loss_of(model, x, y) for x, y in chunk).backward()
        if watch is not None:
            watch(pre)
        pre.step()
        opt.step()
    return model


def assert_same_training(build, data, tol=F64, watch=None, **options):
    train_kw = {k: options.pop(k) for k in ("accumulate", "order") if k in options}
    reference, fast = build(), build()
    ref_pre, fast_pre = BNP(reference, **options), BNP(fast, fast=True, **options)
    train(reference, ref_pre, data, **train_kw)
    train(fast, fast_pre, data, watch=watch, **train_kw)
    for (name, a), b in zip(reference.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b, a, **tol, msg=lambda m: f"{name}: {m}")
    for name in ref_pre.names:
        torch.testing.assert_close(fast_pre.stats(name).var, ref_pre.stats(name).var, **tol)
    return fast_pre


@pytest.mark.parametrize("batch", [1, 8])
def test_fast_training_equals_reference(batch):
    pre = assert_same_training(conv_net, batches(12, batch))
    assert [pre.layer(name).fast for name in pre.names] == [True, False, True]


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


PRE, RAW, REF = GradState.PRECONDITIONED, GradState.IN_FLIGHT, GradState.REFERENCE


@pytest.mark.parametrize(
    "batch,extra_dims,options,states",
    [
        (1, (), {}, [PRE] * 8),
        (8, (), {}, [PRE] * 8),
        (4, (5,), {}, [PRE] * 8),  # sequence inputs: rows are batch x positions
        (1, (), {"warmup": 3, "momentum": 0.3}, [RAW] * 3 + [PRE] * 5),  # raw grads during warmup
        (2, (), {"accumulate": 3}, [REF] * 3),  # the first backward is fast, then handed over
        (2, (), {"accumulate": 3, "order": "together"}, [REF] * 3),  # handed over before backward
    ],
)
def test_all_dense_model_prepares_every_a_hat_with_the_fold(batch, extra_dims, options, states):
    """An MLP with biases gets a_hat of all layers from one op, computed with the statistics fold;
    layers fall back exactly where the batched one does not apply (warmup, the reference path)."""
    seen = []

    def watch(pre):  # after each step's backward: every layer's state, and whether a_hat was prepared
        layer_states = {pre.layer(name).state for name in pre.names}
        assert len(layer_states) == 1
        seen.append(layer_states.pop())
        assert (pre.running.a_hat is not None) == (seen[-1] is PRE) or seen[-1] is REF

    pre = assert_same_training(mlp, batches(8, batch, extra_dims=extra_dims), watch=watch, **options)
    assert pre.running.prepare_a_hat and seen == states


@pytest.mark.parametrize("batch", [1, 8])
def test_prepared_a_hat_with_one_pass_moments(batch):
    """The GPU's moment path (torch.var_mean) also yields the deviations a_hat is made from."""
    pre = assert_same_training(mlp, batches(8, batch), moments="one_pass")
    assert pre.running.prepare_a_hat


def test_fast_with_sequence_inputs_and_bias_free_layers():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3)).double()

    assert_same_training(build, batches(6, 4, extra_dims=(5,)))


def test_fast_with_frozen_bias_only_scales():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        model[0].bias.requires_grad_(False)
        return model

    assert_same_training(build, batches(6, 4))


@pytest.mark.parametrize("center,scale", [(True, False), (False, True), (False, False)])
def test_fast_center_and_scale_switches(center, scale):
    assert_same_training(conv_net, batches(6, 4), center=center, scale=scale)


def test_fast_warmup_and_fixed_momentum():
    assert_same_training(conv_net, batches(8, 1), warmup=3, momentum=0.3)


@pytest.mark.parametrize("order", ["interleaved", "together"])
def test_two_forwards_per_step_fall_back_to_the_reference_exactly(order):
    assert_same_training(conv_net, batches(12, 2), accumulate=3, order=order)


def test_a_layer_used_twice_in_one_forward():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.shared, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x)))))))

    assert_same_training(lambda: Twice().double(), batches(6, 4))


def test_eval_mode_backward_is_preconditioned_on_the_reference_path():
    data = batches(3, 4)
    reference, fast = conv_net(), conv_net()
    ref_pre, fast_pre = BNP(reference), BNP(fast, fast=True)
    for model, pre in ((reference, ref_pre), (fast, fast_pre)):
        train(model, pre, data[:2])
        model.eval()  # statistics frozen, gradients still preconditioned
        loss_of(model, *data[2]).backward()
        pre.step()
    for a, b in zip(reference.parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **F64)


def test_input_gradients_match():
    reference, fast = conv_net(), conv_net()
    BNP(reference), BNP(fast, fast=True)
    x, y = batches(1, 5)[0]
    grads = []
    for model in (reference, fast):
        xr = x.clone().requires_grad_()
        loss_of(model, xr, y).backward()
        grads.append(xr.grad)
    torch.testing.assert_close(grads[1], grads[0], **F64)


@pytest.mark.parametrize("batch", [1, 8])
def test_fast_float32_grads_are_as_close_to_float64_as_the_reference_path(batch):
    """Per step, with the parameters held fixed (training would let rounding differences grow
    chaotically, and how fast depends on the CPU), every float32 gradient of both paths must be
    within 2048 u (u = 2^-24) of the float64 reference, normwise. Measured: up to 230 u for the fast
    path and 135 u for the reference path (the float32 forward and backward through the tanh and the
    convolution, amplified by 1 / (sigma2 + eps) <= 1 / eps = 100)."""
    u = 2.0**-24
    m64 = conv_net(torch.float64)
    nets = {"fast": conv_net(torch.float32), "reference": conv_net(torch.float32)}
    pres = {"fast": BNP(nets["fast"], fast=True), "reference": BNP(nets["reference"]), "f64": BNP(m64)}
    for step, (x, y) in enumerate(batches(20, batch)):
        for key, model in (*nets.items(), ("f64", m64)):
            model.zero_grad()
            loss_of(model, x if key == "f64" else x.float(), y).backward()
            pres[key].step()
        if step == 0 and batch == 1:
            continue  # the first sample is its own mean: the exact gradient is 0, float32 leaves rounding
        for key, model in nets.items():
            for (name, exact), p in zip(m64.named_parameters(), model.parameters()):
                error = (p.grad.double() - exact.grad).norm() / exact.grad.norm()
                assert error <= 2048 * u, (key, step, name, error.item() / u)


def test_fast_cpu_amp_and_bfloat16_model_match_the_reference_loosely():
    data = batches(10, 8, dtype=torch.float32)
    results = []
    for fast in (False, True):
        model = conv_net(torch.float32)
        pre = BNP(model, fast=fast)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in data:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(model, x, y)
            loss.backward()
            pre.step()
            opt.step()
        results.append(model)
    for a, b in zip(*(m.parameters() for m in results)):
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)

    models = [conv_net(torch.bfloat16), conv_net(torch.bfloat16)]
    pres = [BNP(models[0]), BNP(models[1], fast=True)]
    x, y = data[0]
    for model, pre in zip(models, pres):
        loss_of(model, x.to(torch.bfloat16), y).float().backward()
        pre.step()
        assert model[0].weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(models[1][0].weight.grad.float(), models[0][0].weight.grad.float(), rtol=5e-2, atol=5e-2)


def test_state_dict_round_trip_remove_and_repr():
    data = batches(8, 2)
    model = conv_net()
    pre = BNP(model, fast=True)
    train(model, pre, data[:4])
    clone = conv_net()
    clone.load_state_dict(model.state_dict())
    clone_pre = BNP(clone, fast=True)
    clone_pre.load_state_dict(copy.deepcopy(pre.state_dict()))
    train(model, pre, data[4:])
    train(clone, clone_pre, data[4:])  # (fresh optimizers: momentum restarts in both alike)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    assert "fast=True" in repr(clone_pre)
    pre.remove()  # the model is plain again
    assert "forward" not in vars(model[0])
    model.train()
    model(data[0][0])
    assert pre.stats("0").batches == 8  # the removed hooks saw nothing more
    with pytest.raises(ValueError, match="fast must be True or False"):
        BNP(conv_net(), fast="yes")


def test_deepcopy_of_a_fast_model_is_bound_to_the_copy():
    data = batches(4, 2)
    model = conv_net()
    pre = BNP(model, fast=True)
    train(model, pre, data[:2])
    twin = copy.deepcopy(model)
    twin_pre = twin[0].forward.pre  # the copy carries its own preconditioner
    assert twin_pre is not pre and twin_pre.layer("0").module is twin[0]
    train(model, pre, data[2:])
    train(twin, twin_pre, data[2:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert twin.double()(data[0][0]).dtype == torch.float64


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_fast_on_cuda_matches_the_reference_on_cpu():
    data = batches(10, 4, dtype=torch.float32)
    reference, fast = conv_net(torch.float32), conv_net(torch.float32).cuda()
    ref_pre, fast_pre = BNP(reference), BNP(fast, fast=True)
    train(reference, ref_pre, data)
    train(fast, fast_pre, [(x.cuda(), y.cuda()) for x, y in data])
    for a, b in zip(reference.parameters(), fast.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_whole_step_cuda_graph_replays_the_eager_step():
    """Capture forward, backward, BNP and SGD in one CUDA graph; replays equal eager steps."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    data_x = (torch.randn(64, 6, generator=gen) * 2 + 1).to(device)
    data_y = torch.randint(0, 3, (64,), generator=gen).to(device)

    def setup():
        model = conv_net(torch.float32).to(device)
        pre = BNP(model, fast=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        position = torch.zeros((), dtype=torch.long, device=device)

        def step():
            index = position + torch.arange(2, device=device)
            position.add_(2).remainder_(62)
            opt.zero_grad(set_to_none=False)
            loss_of(model, data_x.index_select(0, index), data_y.index_select(0, index)).backward()
            pre.step()
            opt.step()

        return model, pre, step

    eager_model, _, eager_step = setup()
    model, pre, step = setup()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(5):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        eager_step()
    for _ in range(30):
        eager_step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("when", ["before_forward", "after_backward"])
def test_no_grad_training_forwards_fold_and_stay_exact(when):
    """A forward under no_grad in training mode is a training batch (folded at once). Before the
    step's forward the fast path still applies; after a fast backward the step falls back."""
    data = batches(6, 2)
    extra = batches(6, 3, gen_seed=7)
    models = [conv_net(), conv_net()]
    pres = [BNP(models[0]), BNP(models[1], fast=True)]
    for model, pre in zip(models, pres):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for (x, y), (x_extra, _) in zip(data, extra):
            opt.zero_grad()
            if when == "before_forward":
                with torch.no_grad():
                    model(x_extra)
            loss_of(model, x, y).backward()
            if when == "after_backward":
                with torch.no_grad():
                    model(x_extra)
            if pre is pres[1]:
                assert (pre.layer("0").state is GradState.REFERENCE) == (when == "after_backward")
            pre.step()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b, a, **F64)


def kernels_per_step(layers, batch, bnp):
    torch.manual_seed(0)
    widths = [12] + [10] * (layers - 1) + [3]
    modules = []
    for n_in, n_out in zip(widths, widths[1:]):
        modules += [nn.Linear(n_in, n_out), nn.ReLU()]
    model = nn.Sequential(*modules[:-1])
    pre = BNP(model, fast=True) if bnp else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, foreach=True)
    x, y = torch.randn(batch, 12), torch.randint(0, 3, (batch,))

    def step():
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        if pre is not None:
            pre.step()
        opt.step()

    for _ in range(3):  # statistics initialized, nothing lazy left
        step()
    return count_kernels(step)


@pytest.mark.parametrize("batch,shared", [(1, 7), (8, 9)])
def test_fast_step_adds_few_kernels_shared_by_all_layers(batch, shared):
    """Under a whole-step CUDA graph every kernel costs about the same, so BNP's cost there is its
    kernel count: one fold for all layers (mean, deviations, both recurrences, a_hat = deviation /
    (sigma2 + eps)) and one kernel per layer over the native Linear backward (g_tilde =
    Delta^T (1 - a_hat mu) takes two kernels where g = Delta^T 1 takes one)."""
    extra = {n: kernels_per_step(n, batch, True) - kernels_per_step(n, batch, False) for n in (2, 6)}
    per_layer = (extra[6] - extra[2]) / 4
    assert per_layer <= 1
    assert extra[2] - 2 * per_layer <= shared


def test_recording_keeps_counters_and_replayed_advances_them():
    """A graph capture runs the step's Python once (recording: counters stay); a replay runs none
    of it (replayed: counters advance as if the step had run)."""
    model = mlp()
    pre = BNP(model, fast=True)
    x, y = batches(1, 4)[0]
    for _ in range(2):
        loss_of(model, x, y).backward()
        pre.step()
    with pre.recording():
        loss_of(model, x, y).backward()
        pre.step()
    assert pre.steps == 2 and {pre.stats(n).batches for n in pre.names} == {2}
    pre.replayed(3)
    assert pre.steps == 5 and {pre.stats(n).batches for n in pre.names} == {5}
