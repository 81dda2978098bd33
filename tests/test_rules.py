"""Gradient rules that chain after BNP or stand alone (bnp.rules): each checked exactly against an
independent float64 formula; the chain's order, state and errors; the runner's grad group, and
norm=bnp grad=agc against runs of the earlier bnp_agc norm variant (tests/data/legacy_rule_runs.json)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bnp import BNP, Chain, Clip, OutputScale, Trust
from bnp.train import run
from test_precondition import skewed
from test_variants import batch_stats, conv_net, net, train_step


@pytest.mark.parametrize("fast", [False, True])
def test_output_scale_divides_each_units_row_by_its_output_variance(fast):
    gen = torch.Generator().manual_seed(4)
    model, plain_model = net(), net()
    plain = BNP(plain_model, eps=0.02, fast=fast)
    pre = Chain(BNP(model, eps=0.02, fast=fast), OutputScale(model, eps=0.02))
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
    pre = Chain(BNP(model), OutputScale(model))
    x, y = skewed(8, 6, gen=gen), torch.zeros(8, 3, dtype=torch.float64)
    train_step(model, pre, x, y)
    twin = net()  # a deep copy would carry a copy of the preconditioner along
    twin.load_state_dict(model.state_dict())
    other = Chain(BNP(twin), OutputScale(twin))
    other.load_state_dict(pre.state_dict())
    scale, twin_scale = pre.find(OutputScale), other.find(OutputScale)
    assert scale.var and all(torch.equal(scale.var[k], twin_scale.var[k]) for k in scale.var)
    assert torch.equal(pre.find(BNP).stats("0").var, other.find(BNP).stats("0").var)
    with pytest.raises(KeyError, match="the saved chain is"):
        Chain(BNP(net())).load_state_dict(pre.state_dict())


def test_unit_wise_clipping_limits_each_units_gradient_to_a_share_of_its_weights():
    gen = torch.Generator().manual_seed(6)
    model, plain_model = net(), net()
    with torch.no_grad():
        model[0].weight[0].zero_()  # a unit with zero weights may still move 1e-3 * clip
        model[0].bias[0] = 0
        plain_model.load_state_dict(model.state_dict())
    pre, plain = Chain(BNP(model), Clip(model, clip=0.05)), BNP(plain_model)
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


@pytest.mark.parametrize("make", [net, conv_net])
def test_clipping_without_preconditioning_is_agc_on_the_raw_gradients(make):
    """grad=agc with norm=none, the control for bnp+agc: the plain gradient, clipped; compared with a
    model that had no rule at all."""
    gen = torch.Generator().manual_seed(7)
    model, raw = make(), make()
    if make is net:
        x, y = skewed(32, 6, gen=gen), 10 * torch.randn(32, 3, generator=gen, dtype=torch.float64)
    else:
        x, y = skewed(4, 3, 7, 7, gen=gen), 10 * torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    pre = Clip(model, clip=0.05)
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
    """bnp+lars: BNP's preconditioned gradient, then each layer's [G, g] rescaled to length
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
    pre, plain = Chain(BNP(model, fast=fast), Trust(model, trust=0.02)), BNP(plain_model, fast=fast)
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


def test_trust_ratio_without_preconditioning_is_lars_on_the_raw_gradients():
    """grad=lars with norm=none, the control for bnp+lars, against a model that had no rule at all."""
    gen = torch.Generator().manual_seed(9)
    model, raw = net(), net()
    x, y = skewed(32, 6, gen=gen), torch.randn(32, 3, generator=gen, dtype=torch.float64)
    pre = Trust(model, trust=0.02)
    train_step(model, pre, x, y)
    F.mse_loss(raw(x), y).backward()
    for got, want in ((model[0], raw[0]), (model[2], raw[2])):
        G_t, g_t = trust_formula(want.weight, want.bias, want.weight.grad, want.bias.grad, 0.02)
        torch.testing.assert_close(got.weight.grad, G_t, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got.bias.grad, g_t, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rule, kwargs, field", [(Clip, {"clip": 0}, "clip"), (Clip, {"clip": True}, "clip"),
                                                 (Trust, {"trust": -1.0}, "trust"),
                                                 (Trust, {"trust": float("inf")}, "trust"),
                                                 (OutputScale, {"eps": 0}, "eps"),
                                                 (OutputScale, {"momentum": 2.0}, "momentum")])
def test_invalid_rule_options_name_the_argument(rule, kwargs, field):
    with pytest.raises(ValueError, match=f"{rule.__name__}: {field}"):
        rule(net(), **kwargs)


@pytest.mark.parametrize("moved, rule", [("clip", "bnp.Clip"), ("trust", "bnp.Trust"), ("output_scale", "bnp.OutputScale")])
def test_bnp_points_moved_options_to_their_rules(moved, rule):
    with pytest.raises(TypeError, match=rf"{moved} is a gradient rule of its own now.*bnp.Chain\(bnp.BNP\(model\), {rule}"):
        BNP(net(), **{moved: 1.0})
    with pytest.raises(TypeError, match="unexpected keyword argument 'clipp'"):
        BNP(net(), clipp=1.0)


def test_chain_applies_rules_in_order_and_takes_a_users_own_rule():
    """Clip then Trust is the trust formula on the clipped gradient, Trust then Clip the clip formula
    on the rescaled one (and the two differ); a rule of one's own joins by having step()."""
    gen = torch.Generator().manual_seed(11)
    x, y = skewed(16, 6, gen=gen), 10 * torch.randn(16, 3, generator=gen, dtype=torch.float64)
    raw = net()
    F.mse_loss(raw(x), y).backward()
    W, b = raw[0].weight, raw[0].bias
    clipped = agc_formula(W, b, W.grad, b.grad, 0.05)[:2]
    trusted = trust_formula(W, b, W.grad, b.grad, 0.5)
    want = {"clip,trust": trust_formula(W, b, *clipped, 0.5)[0], "trust,clip": agc_formula(W, b, *trusted, 0.05)[0]}
    for order, expected in want.items():
        model = net()
        rules = {"clip": lambda: Clip(model, clip=0.05), "trust": lambda: Trust(model, trust=0.5)}
        train_step(model, Chain(*(rules[name]() for name in order.split(","))), x, y)
        torch.testing.assert_close(model[0].weight.grad, expected, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(want["clip,trust"], want["trust,clip"])

    class Halve:
        def __init__(self, model):
            self.model = model

        def step(self):
            for p in self.model.parameters():
                p.grad.mul_(0.5)

    model, plain = net(), net()
    train_step(model, Chain(BNP(model), Halve(model)), x, y)
    train_step(plain, BNP(plain), x, y)
    torch.testing.assert_close(model[2].weight.grad, 0.5 * plain[2].weight.grad, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="every rule needs a step"):
        Chain(object())
    assert "Clip(clip=0.05" in repr(Chain(BNP(model := net()), Clip(model, clip=0.05)))


def test_clipping_and_trust_collect_nothing_and_act_on_any_model():
    """Clip and Trust on a BatchNorm CNN: no hooks, only the Linear / Conv layers' gradients change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    rules = Chain(Clip(model, clip=1e-3), Trust(model, trust=0.01))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model(torch.randn(5, 1, 8, 8, dtype=torch.float64)).square().sum().backward()
    bn_grad = model[1].weight.grad.clone()
    rules.step()
    assert torch.equal(model[1].weight.grad, bn_grad)
    length = torch.cat([model[4].weight.grad.flatten(), model[4].bias.grad]).norm()
    torch.testing.assert_close(length, 0.01 * torch.cat([model[4].weight.flatten(), model[4].bias]).norm().detach(),
                               rtol=1e-12, atol=0)
    assert rules.state_dict() == {"rules": ["Clip", "Trust"], "state": [{}, {}]}


LEGACY = json.loads((Path(__file__).parent / "data" / "legacy_rule_runs.json").read_text())
LEGACY_RUN = ["data=digits", "train.steps=60", "train.eval_every=30", "train.log_every=10", "logger=none",
              "train.threads=1", "train.device=cpu"]


@pytest.mark.parametrize("case", LEGACY["runs"], ids=lambda case: case["variant"])
def test_grad_rules_reproduce_runs_of_the_earlier_norm_variants(compose, tmp_path, case):
    """norm=bnp grad=agc is the earlier norm=bnp_agc (and norm=none grad=agc the earlier agc, norm=bnp
    grad=lars bnp_lars): the same losses, logged every 10 of 60 steps, as runs of the earlier code.
    float32 training: another CPU's summation order moves a loss in its 6th-7th digit, and 60 SGD
    steps on digits amplify that little, so rtol 1e-4 separates rounding from a changed rule."""
    summary = run(compose(*LEGACY_RUN, *case["overrides"]), tmp_path)
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    got = {key: [r[key] for r in rows if key in r] for key in ("train_loss", "val_loss")}
    for key in got:
        assert got[key] == pytest.approx(case[key], rel=1e-4), key


@pytest.mark.parametrize("overrides", [["norm=none", "grad=agc", "optim.lr=0.3"], ["norm=bn", "grad=[agc]", "optim.lr=0.1"],
                                       ["norm=gn", "grad=lars", "optim.lr=10"],
                                       ["norm=bnp", "grad=[outscale,agc,lars]", "optim.lr=10"]])
def test_the_runner_trains_with_gradient_rules_on_any_norm(compose, tmp_path, overrides):
    summary = run(compose("data=digits", "train.steps=150", "train.eval_every=150", "logger=none", "train.threads=1",
                          "train.device=cpu", *overrides), tmp_path)
    assert summary["status"] == "completed" and summary["best_val_acc"] > 0.8, summary


def test_grad_group_errors_name_the_field(compose, tmp_path):
    from bnp.config import ConfigError

    with pytest.raises(ConfigError, match=r"grad.agc.clip: must be a finite number > 0, got 0.0"):
        run(compose(*LEGACY_RUN, "grad=agc", "grad.agc.clip=0"), tmp_path)
    with pytest.raises(ConfigError, match=r"grad.lars.trust: must be a finite number > 0"):
        run(compose(*LEGACY_RUN, "grad=lars", "grad.lars.trust=-1"), tmp_path)


def test_a_second_chain_step_without_a_backward_raises():
    """The rules after BNP edit .grad in place; the chain still knows it is this step's gradient."""
    gen = torch.Generator().manual_seed(12)
    model = net()
    rules = Chain(BNP(model), Clip(model, clip=0.05))
    train_step(model, rules, skewed(16, 6, gen=gen), torch.randn(16, 3, generator=gen, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="have not changed since the last step"):
        rules.step()


def test_bracketing_records_of_earlier_variant_names_read_under_the_new_names(tmp_path):
    from bnp.choice import read_extensions

    (tmp_path / "bracket.json").write_text(json.dumps({"fashion_mnist|resnet20|bnp_agc|8|sgd": {"low": 0, "high": 2,
                                                                                              "cap": 2}}))
    assert read_extensions(tmp_path) == {"fashion_mnist|resnet20|bnp+agc|8|sgd": {"low": 0, "high": 2, "cap": 2}}


def test_earlier_overrides_are_repeated_under_the_grids_spelling():
    from bnp.sweep import current_names

    assert current_names(["norm=bnp_agc", "optim.lr=0.1"]) == ["norm=bnp", "grad=agc", "optim.lr=0.1"]
    assert current_names(["norm=lars"]) == ["norm=none", "grad=lars"]


def test_an_interrupted_run_with_a_chain_resumes_to_the_uninterrupted_metrics(compose, tmp_path):
    """Stopped at a checkpoint, a run of BNP, the output-side scale and clipping resumes with every
    rule's state (BNP's and OutputScale's statistics) and ends where an uninterrupted run ends."""
    overrides = [*LEGACY_RUN, "norm=bnp", "grad=[outscale,agc]", "optim.lr=0.3"]  # checkpoints at each evaluation (30)
    run(compose(*overrides), tmp_path / "whole")

    def stop_at_40(trainer):
        if trainer.step == 40:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(compose(*overrides), tmp_path / "split", progress=stop_at_40)
    assert run(compose(*overrides), tmp_path / "split")["status"] == "completed"
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "split")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # noqa: E731
    assert strip(rows[1]) == strip(rows[0])
