"""BNP(fast=True): Linear layers whose backward returns the preconditioned gradients directly.

With Delta = dL/dh and a_hat = (a - mu) / (sigma2 + eps), ``G_tilde = Delta^T a_hat`` and
``g_tilde = Delta^T (1 - a_hat mu)``: the reference rule's numbers (to float rounding) without any
pass over G after backward. The first gradient-producing forward of a step goes this way; a second
one (gradient accumulation, a shared layer), an eval-mode backward, or torch.distributed hands the
step to the reference path, exactly (grads a fast backward already produced are converted back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from bnp.precondition import reference, sync
from bnp.precondition.layers import GradState, Layer

if TYPE_CHECKING:
    from bnp.precondition.preconditioner import BNP


class FastLinear(torch.autograd.Function):
    """``F.linear`` whose weight and bias gradients come out BNP-preconditioned."""

    @staticmethod
    def forward(ctx, x, weight, bias, pre: BNP, layer: Layer):
        ctx.pre, ctx.layer = pre, layer
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # under autocast, x and the weight may be wider than grad_out
            grad_x = grad_out.matmul(weight if weight.dtype == grad_out.dtype else weight.to(grad_out.dtype))
            if grad_x.dtype != x.dtype:
                grad_x = grad_x.to(x.dtype)
        grad_w, grad_b = weight_and_bias_grads(ctx.pre, ctx.layer, x, grad_out, ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b, None, None


class FastForward:
    """The forward of a Linear under ``BNP(fast=True)``. An object bound to (preconditioner, layer),
    not a closure, so that ``copy.deepcopy(model)`` yields layers that feed a copy of the
    preconditioner, never the original."""

    preconditions_layer = True  # layers.check_unclaimed

    def __init__(self, pre: BNP, layer: Layer):
        self.pre, self.layer = pre, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pre, layer = self.pre, self.layer
        weight = layer.weight
        training, grad = layer.module.training, torch.is_grad_enabled() and weight.requires_grad
        # dynamo cannot trace the Function's side effects (graph breaks): under torch.compile the
        # layer takes the reference path, which compiles into one graph; step() says so once
        if torch.compiler.is_compiling():
            pre.compiled_fallback = True
        elif training and grad and layer.state is GradState.FRESH and not sync.is_distributed():
            layer.state = GradState.IN_FLIGHT
            pre.running.collect(layer, x.detach())
            return FastLinear.apply(x, weight, layer.bias, pre, layer)
        if grad or (training and layer.state is GradState.PRECONDITIONED):
            # under torch.compile, a second gradient-producing forward this step, one in eval mode, or
            # new statistics after a fast backward used the old ones (before this input changes them)
            hand_to_reference(pre, layer)
        if training:
            pre.running.collect(layer, x.detach())
        return F.linear(x, weight, layer.bias)


def hand_to_reference(pre: BNP, layer: Layer) -> None:
    """This step of ``layer`` goes to the reference path; undo a fast backward's preconditioning."""
    if layer.state is GradState.REFERENCE:
        return
    was_preconditioned = layer.state is GradState.PRECONDITIONED
    layer.state = GradState.REFERENCE
    if was_preconditioned:
        reference.restore_raw(layer, pre.running)


def weight_and_bias_grads(pre: BNP, layer: Layer, x: torch.Tensor, grad_out: torch.Tensor,
                          need_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(G_tilde, g_tilde) from the layer's input and dL/dh, or the raw (G, g) during warmup and
    when the layer was handed to the reference path."""
    stats = pre.running
    if layer.pending is not None:  # the statistics include this batch, as in the reference order
        stats.fold(prepare=pre.warmup_left == 0)
    delta = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
    if delta.dtype != stats.dtype:
        delta = delta.to(stats.dtype)
    if stats.a_hat is not None and layer.state is not GradState.REFERENCE:  # prepared with the fold
        a, center = stats.a_hat[layer.index], True
        layer.state = GradState.PRECONDITIONED
    else:
        a, center = _own_a_hat(pre, layer, x)
    delta_t = delta.t()
    grad_w = delta_t * a if a.shape[0] == 1 else delta_t.mm(a)  # one sample: an outer product
    if grad_w.dtype != layer.weight.dtype:
        grad_w = grad_w.to(layer.weight.dtype)
    if not need_bias:
        return grad_w, None
    if center:  # Delta^T (1 - a_hat mu)
        grad_b = delta_t.mv(torch.addmv(stats.ones(a.shape[0]), a, layer.mean, alpha=-1))
    else:
        grad_b = delta.sum(0)
    return grad_w, grad_b if grad_b.dtype == layer.bias.dtype else grad_b.to(layer.bias.dtype)


def _own_a_hat(pre: BNP, layer: Layer, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """One layer's input as its weight gradient needs it: a_hat = (a - mu) / (sigma2 + eps) (less
    what center / scale turn off), or a itself during warmup and on the reference path; and whether
    it was centered."""
    stats = pre.running
    a = x if x.dim() == 2 else x.reshape(-1, layer.features)
    if a.dtype != stats.dtype:
        a = a.to(stats.dtype)
    precondition = layer.state is not GradState.REFERENCE and pre.warmup_left == 0 and layer.batches > 0
    center = precondition and stats.center and layer.trained_bias is not None
    if precondition:
        inv, shift = stats.derived()
        if shift is not None and center:
            a = torch.addcmul(shift[layer.index], a, inv[layer.index])
        elif inv is not None:
            a = a * inv[layer.index]
        elif center:
            a = a - layer.mean
        layer.state = GradState.PRECONDITIONED
    return a, center
