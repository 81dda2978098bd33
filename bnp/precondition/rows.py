"""Per-unit rules applied to the preconditioned gradients, one output unit (a row of W with its bias
entry; an output channel of a convolution) at a time. Both are opt-in BNP options.

- Output-side scale (``output_scale``): BatchNorm's step on a unit's weights shrinks like
  gamma^2 / Var(h), h the unit's pre-activation, which makes it scale invariant; BNP's does not.
  This rule keeps a running variance v of every tracked unit's output (the same recurrence and
  momentum as the input statistics) and multiplies the unit's gradient row by 1 / (v + eps).
- Unit-wise adaptive clipping (``clip``, as NFNets' AGC): a unit's gradient row [G_i, g_i] is
  scaled down to clip x max(||[W_i, b_i]||, 1e-3) where it is longer.

One rule acts on a whole layer instead:

- Layer-wise trust ratio (``trust``, as LARS): the layer's gradient [G, g] is rescaled to length
  trust x max(||[W, b]||, 1e-3), so every layer moves by the same fraction of its weights per
  step (the evenness BatchNorm's scale invariance gives; BNP's preconditioning leaves some layers
  moving several times faster than others, results/cnn_momentum_variants/diagnostics.md).
"""

from __future__ import annotations

import torch

from bnp.precondition.layers import Layer
from bnp.precondition.stats import RunningStats

MIN_WEIGHT_NORM = 1e-3  # NFNets: units (layers) with (near) zero weights may still move this much


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


class OutputStats:
    """Running mean and variance of each tracked layer's outputs, per unit (forward hooks)."""

    def __init__(self, layers: list[Layer], stats: RunningStats):
        self.stats = stats
        self.mean: dict[str, torch.Tensor] = {}
        self.var: dict[str, torch.Tensor] = {}
        self.batches: dict[str, int] = {}
        self.handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in layers]

    def _hook(self, layer: Layer):
        def collect(module, args, output):
            if module.training:
                with torch.no_grad():
                    self.update(layer, output.detach())
        return collect

    def update(self, layer: Layer, h: torch.Tensor) -> None:
        """The input statistics' recurrence (first batch: mu = m_B), on the units of output ``h``."""
        h = h.to(self.stats.dtype)
        if layer.dense:
            h, dims = h.reshape(-1, h.shape[-1]), (0,)
        else:
            h = h if h.dim() == layer.spatial_dims + 2 else h.unsqueeze(0)
            dims = (0, *range(2, h.dim()))
        batches = self.batches.get(layer.name, 0)
        alpha = 1.0 if batches == 0 else self.stats.alpha(h.shape[0], batches)
        batch_mean = h.mean(dims)
        if batches == 0:
            self.mean[layer.name] = batch_mean.clone()
            self.var[layer.name] = torch.zeros_like(batch_mean)
        mean, var = self.mean[layer.name], self.var[layer.name]
        if mean.dtype != h.dtype or mean.device != h.device:  # the model was cast or moved
            mean = self.mean[layer.name] = mean.to(h)
            var = self.var[layer.name] = var.to(h)
        mean.lerp_(batch_mean, alpha)
        shape = (1, -1) if layer.dense else (1, -1, *(1,) * layer.spatial_dims)
        var.lerp_((h - mean.view(shape)).square().mean(dims), alpha)
        self.batches[layer.name] = batches + 1

    def scale(self, layer: Layer, eps: float) -> None:
        """Multiply the layer's gradient rows by 1 / (v + eps)."""
        if layer.name not in self.var:
            return
        factor = (self.var[layer.name] + eps).reciprocal()
        _rows(layer.weight.grad).mul_(factor.view(-1, 1).to(layer.weight.grad.dtype))
        if layer.trained_bias is not None and layer.trained_bias.grad is not None:
            layer.trained_bias.grad.mul_(factor.to(layer.trained_bias.grad.dtype))

    def state_dict(self) -> dict:
        return {"mean": {k: v.clone() for k, v in self.mean.items()},
                "var": {k: v.clone() for k, v in self.var.items()}, "batches": dict(self.batches)}

    def load_state_dict(self, state: dict) -> None:
        self.mean = {k: v.clone() for k, v in state["mean"].items()}
        self.var = {k: v.clone() for k, v in state["var"].items()}
        self.batches = dict(state["batches"])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _squared_norms(layer: Layer):
    """The layer's gradient rows G, its trained bias (None if it has none or no gradient, else one
    more column of each row), and each row's squared length of [G_i, g_i] and of [W_i, b_i]."""
    G = _rows(layer.weight.grad)
    bias = layer.trained_bias if layer.trained_bias is not None and layer.trained_bias.grad is not None else None
    grad_sq = G.square().sum(1)
    weight_sq = _rows(layer.weight.detach()).square().sum(1)
    if bias is not None:
        grad_sq = grad_sq + bias.grad.square()
        weight_sq = weight_sq + bias.detach().square()
    return G, bias, grad_sq, weight_sq


def _scale_rows(G: torch.Tensor, bias, factor: torch.Tensor) -> None:
    """Multiply each gradient row [G_i, g_i] by factor (one per row, or one for all)."""
    G.mul_(factor.view(-1, 1))
    if bias is not None:
        bias.grad.mul_(factor)


def clip_units(layer: Layer, clip: float) -> None:
    """Unit-wise adaptive gradient clipping: ||[G_i, g_i]|| <= clip * max(||[W_i, b_i]||, 1e-3)."""
    G, bias, grad_sq, weight_sq = _squared_norms(layer)
    limit = weight_sq.sqrt().clamp_min(MIN_WEIGHT_NORM) * clip
    _scale_rows(G, bias, (limit / grad_sq.sqrt().clamp_min(1e-30)).clamp_max(1.0))


def trust_layer(layer: Layer, trust: float) -> None:
    """Layer-wise trust ratio: ||[G, g]|| becomes trust * max(||[W, b]||, 1e-3) (a zero gradient stays zero)."""
    G, bias, grad_sq, weight_sq = _squared_norms(layer)
    limit = weight_sq.sum().sqrt().clamp_min(MIN_WEIGHT_NORM) * trust
    _scale_rows(G, bias, limit / grad_sq.sum().sqrt().clamp_min(1e-30))
