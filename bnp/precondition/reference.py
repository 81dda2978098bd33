"""The reference rule: rewrite the raw (G, g) of tracked layers after backward, with foreach ops
across layers, and its exact inverse (to hand a fast layer's step back to this path)."""

from __future__ import annotations

import torch

from bnp.precondition.layers import Layer
from bnp.precondition.stats import RunningStats


def precondition(layers: list[Layer], stats: RunningStats) -> None:
    """G_tilde = (G - g mu^T) / (sigma2 + eps), g_tilde = g - G_tilde mu, in place, for ``layers``."""
    dtype = stats.dtype
    inv = stats.derived()[0]
    work = []  # (layer, G in the statistics' dtype, G shaped like the statistics, g or None)
    for layer in layers:
        grad = layer.weight.grad
        # edit contiguous grads of the statistics' dtype in place, copy the others
        G = grad if grad.dtype == dtype and grad.is_contiguous() else grad.to(dtype, memory_format=torch.contiguous_format)
        bias_grad = layer.trained_bias.grad if layer.trained_bias is not None else None
        g = None
        if stats.center and bias_grad is not None:
            g = bias_grad if bias_grad.dtype == dtype else bias_grad.to(dtype)
        work.append((layer, G, G if layer.dense else G.view(layer.shape_w), g))
    centered = [w for w in work if w[3] is not None]
    if centered:  # G - g mu^T
        torch._foreach_addcmul_(
            [Gw for _, _, Gw, _ in centered],
            [g.view(layer.shape_b) for layer, _, _, g in centered],
            [layer.mean_w for layer, _, _, _ in centered],
            value=-1,
        )
    if inv is not None:  # / (sigma2 + eps)
        torch._foreach_mul_(
            [Gw for _, _, Gw, _ in work],
            [inv[l.index] if l.dense else inv[l.index].view(l.shape_stats) for l, _, _, _ in work],
        )
    for layer, G, Gw, g in work:
        if g is not None:
            _correct_bias(layer, G, Gw, g)
            if g is not layer.trained_bias.grad:
                layer.trained_bias.grad.copy_(g)
        if G is not layer.weight.grad:
            layer.weight.grad.copy_(G)


def _correct_bias(layer: Layer, G: torch.Tensor, Gw: torch.Tensor, g: torch.Tensor) -> None:
    """g_tilde = g - G_tilde mu; a kernel window shares its channel's mu, so sum it first."""
    if layer.dense:
        g.addmv_(G, layer.mean, alpha=-1)
    elif layer.groups == 1:
        g.addmv_(Gw.sum(2), layer.mean, alpha=-1)
    else:
        g.view(layer.shape_w[:2] + (1,)).baddbmm_(
            Gw.sum(3), layer.mean.view(layer.groups, layer.in_per_group, 1), alpha=-1
        )


@torch.no_grad()
def restore_raw(layer: Layer, stats: RunningStats) -> None:
    """Turn a dense layer's preconditioned grads back into raw ones, inverting the rule exactly with
    the statistics it used (nothing has changed them since)."""
    grad = layer.weight.grad
    if grad is None:
        return
    G = grad.to(stats.dtype)
    bias_grad = layer.trained_bias.grad if layer.trained_bias is not None else None
    center = stats.center and bias_grad is not None
    if center:
        g = bias_grad.to(stats.dtype).addmv(G, layer.mean)  # g = g_tilde + G_tilde mu
        bias_grad.copy_(g)
    if stats.scale:
        G = G * stats.denominator()[layer.span]
    if center:
        G = G.addr(g, layer.mean)  # G = G_tilde D2 + g mu^T
    grad.copy_(G)
