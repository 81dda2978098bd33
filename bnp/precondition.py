"""BNP: Batch Normalization Preconditioning of layer gradients.

For every tracked dense / convolutional layer ``h = W a + b`` the preconditioner keeps running
statistics (mean ``mu``, variance ``sigma2``) of the layer's *inputs* and, before the optimizer
step, replaces the gradients ``(G, g) = (dL/dW, dL/db)`` by

    G_tilde = (G - g mu^T) / (sigma2 + eps)
    g_tilde = g - G_tilde mu

which is exactly the gradient step the layer would take if its inputs were centered and scaled
(Lange, Helfrich & Ye, JMLR 2022; see docs/bnp-method.md). Convolutions use one mean / variance per
input channel, pooled over batch and space, repeated over the kernel window.

Usage::

    pre = BNP(model)
    loss.backward(); pre.step(); optimizer.step()

With ``fast=True`` the Linear layers get their preconditioned gradients straight from backward,
computed from the layer inputs: with Delta = dL/dh and a_hat = (a - mu) / (sigma2 + eps),
``G_tilde = Delta^T a_hat`` and ``g_tilde = Delta^T (1 - a_hat mu)``, the same numbers as the rule
above (to float rounding) without any pass over G after backward.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

TRACKED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
AUTO_WINDOW = 100  # momentum=None: min(0.1, batch / AUTO_WINDOW), >= ~100 samples in the statistics


class LayerStats(NamedTuple):
    """Running input statistics of one tracked layer (copies, float32 or float64)."""

    mean: torch.Tensor
    var: torch.Tensor
    batches: int  # training forward passes seen; 0 means not initialized yet


class _Layer:
    """One tracked module: where its statistics live in the flat buffers and how they map onto W."""

    def __init__(self, name: str, module: nn.Module, offset: int):
        weight = module.weight
        bias = getattr(module, "bias", None)
        self.name = name
        self.module = module
        self.weight = weight
        self.bias_param = bias if isinstance(bias, torch.Tensor) else None
        self.bias = self.bias_param if bias is not None and self.bias_param.requires_grad else None
        self.dense = isinstance(module, nn.Linear)
        self.groups = 1 if self.dense else module.groups
        self.features = module.in_features if self.dense else module.in_channels
        self.in_per_group = self.features // self.groups
        self.spatial_dims = weight.dim() - 2  # 0 for Linear
        # How W, b and the per-input-channel statistics line up for broadcasting:
        # Linear (out, in); Conv (out, in, kernel); grouped Conv (groups, out/g, in/g, kernel).
        if self.dense:
            self.shape_w, self.shape_b, self.shape_stats = (-1, self.features), (-1, 1), (1, -1)
        elif self.groups == 1:
            self.shape_w, self.shape_b, self.shape_stats = (weight.shape[0], self.features, -1), (-1, 1, 1), (1, -1, 1)
        else:
            self.shape_w = (self.groups, weight.shape[0] // self.groups, self.in_per_group, -1)
            self.shape_b, self.shape_stats = (self.groups, -1, 1, 1), (self.groups, 1, -1, 1)
        self.offset = offset
        self.batches = 0
        self.pending: torch.Tensor | None = None  # input recorded by the hook, not yet folded in
        self.handle = None
        # views into the flat buffers, set by BNP._bind
        self.mean = self.var = self.mean_w = None
        self.span = slice(offset, offset + self.features)
        # fast path (Linear layers with BNP(fast=True)), reset by every step()
        self.fast = False
        self.forwards = 0  # training or grad-enabled forwards since the last step()
        self.fast_grads = False  # a backward since the last step() left preconditioned grads
        self.deferred = False  # this step's grads are raw: step() preconditions them (reference path)
        self.grad_mark = None  # the weight gradient the last step() left, as (weak reference, version)

    def mark_grad(self) -> None:
        """Remember this weight gradient as preconditioned (a weak reference and its version)."""
        grad = self.weight.grad
        self.grad_mark = (weakref.ref(grad), grad._version)

    def has_new_grad(self) -> bool:
        """A weight gradient that step() has not preconditioned: a new tensor, or one edited in place
        since (autograd accumulating into it, zero_grad(set_to_none=False))."""
        grad, mark = self.weight.grad, self.grad_mark
        return mark is None or mark[0]() is not grad or mark[1] != grad._version

    def describe(self) -> str:
        kind = type(self.module).__name__
        extra = f", groups={self.groups}" if self.groups > 1 else ""
        bias = "" if self.bias is not None else ", no bias"
        return f"{self.name}: {kind}(in={self.features}{extra}{bias})"


def _check_options(momentum: Any, eps: Any, warmup: Any, center: Any, scale: Any) -> None:
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0 < momentum <= 1):
        raise ValueError(f"BNP: momentum must be None (auto) or a number in (0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"BNP: eps must be a finite number > 0, got {eps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"BNP: warmup must be an integer >= 0 (steps), got {warmup!r}")
    for label, value in (("center", center), ("scale", scale)):
        if not isinstance(value, bool):
            raise ValueError(f"BNP: {label} must be True or False, got {value!r}")


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Leaf Linear / Conv{1,2,3}d modules with a trainable weight, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, TRACKED_TYPES)
        and not any(True for _ in module.children())
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.requires_grad
    }


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(type(module).__name__, pattern)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _mean_square(d: torch.Tensor, dims: tuple[int, ...], in_place: bool) -> torch.Tensor:
    squares = d.square_() if in_place else d.square()
    return squares[0] if squares.shape[0] == 1 and dims == (0,) else squares.mean(dims)


class _FastLinear(torch.autograd.Function):
    """``F.linear`` whose weight and bias gradients come out BNP-preconditioned (``fast=True``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pre: "BNP", layer: _Layer):
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
        grad_w, grad_b = ctx.pre._input_side_grads(ctx.layer, x, grad_out, ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b, None, None


class _RecordInput:
    """Forward pre-hook of a tracked layer on the reference path. Like ``_FastForward``, an object
    bound to (preconditioner, layer), so a deep copy of the model records into its own copy."""

    def __init__(self, pre: "BNP", layer: _Layer):
        self.pre, self.layer = pre, layer

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training and args:
            self.pre._record(self.layer, args[0].detach())  # detached: no autograd graph is built


class _FastForward:
    """The forward of a Linear under ``BNP(fast=True)``: the first forward of a step goes through
    ``_FastLinear``; any further one before ``step()`` hands the step to the reference path.
    An object, not a closure, so that ``copy.deepcopy(model)`` yields a model whose layers feed a
    copy of the preconditioner, never the original."""

    def __init__(self, pre: "BNP", layer: _Layer):
        self.pre, self.layer = pre, layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        pre, layer = self.pre, self.layer
        module, weight = layer.module, layer.weight
        training, grad = module.training, torch.is_grad_enabled() and weight.requires_grad
        if training and grad and layer.forwards == 0 and not layer.deferred and not pre._distributed():
            layer.forwards = 1
            pre._record(layer, x.detach())
            return _FastLinear.apply(x, weight, layer.bias_param, pre, layer)
        if grad:  # a second gradient-producing forward this step, or one in eval mode
            pre._defer(layer)  # (before this input changes the statistics)
            layer.forwards += 1
        elif training and layer.fast_grads:  # new statistics after a fast backward used the old ones
            pre._defer(layer)
        if training:
            pre._record(layer, x.detach())
        return F.linear(x, weight, layer.bias_param)


class BNP:
    """Batch Normalization Preconditioner for every Linear / Conv layer of ``model``.

    Args (keyword-only):
        momentum: weight of the new batch in the running statistics (PyTorch BatchNorm
            convention), in (0, 1]; None (default) picks min(0.1, batch size / 100) for each
            batch: BatchNorm's 0.1 from batch size 10 up, and a window of about 100 samples
            below, which small batches and online learning need to keep the statistics stable.
        eps: variance floor added to the running variance before dividing; > 0.
        warmup: number of ``step()`` calls that leave gradients unchanged while statistics
            accumulate (useful at batch size 1, where the first variance is 0).
        center: subtract the running mean (needs a bias to absorb it; bias-free layers only scale).
        scale: divide by the running variance + eps.
        skip: module-name or class-name patterns (``fnmatch`` globs) of layers to leave alone,
            e.g. ``("fc_out",)`` or ``("head.*", "Conv1d")``. Each pattern must match a layer.
        sync: under ``torch.distributed`` (world size > 1), pool each step's input statistics
            over all ranks with one all-reduce, so every replica applies the same
            preconditioner. Turning it off lets replicas drift apart (for ablations only).
        fast: compute the preconditioned gradients of Linear layers inside backward, from the
            layer inputs, instead of rewriting ``.grad`` afterwards (about 3x less memory traffic
            per step, the bulk of BNP's cost at small batch sizes). Same numbers to float
            rounding. It assumes a tracked Linear's weight gradient comes only from that layer's
            own forward passes: keep weight penalties in the optimizer (``weight_decay``), not in
            the loss, and do not tie tracked weights to other modules. A layer run twice before
            ``step()`` (gradient accumulation, shared layers) falls back to the reference path for
            that step, exactly; so does training under ``torch.distributed`` (world size > 1).

    Statistics are collected by forward pre-hooks in training mode only, in float32 whatever the
    model's dtype (float64 for float64 models). ``step()`` rewrites ``.grad`` in place; call it
    after ``backward()`` (after ``scaler.unscale_(optimizer)`` with AMP), before ``optimizer.step()``.
    The step has no host syncs, so a whole training step can be captured as a CUDA graph: capture
    inside ``with pre.recording():`` and call ``pre.replayed()`` after each replay.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        momentum: float | None = None,
        eps: float = 1e-2,
        warmup: int = 0,
        center: bool = True,
        scale: bool = True,
        skip: str | Iterable[str] = (),
        sync: bool = True,
        fast: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"BNP: model must be a torch.nn.Module, got {type(model).__name__}")
        _check_options(momentum, eps, warmup, center, scale)
        for label, value in (("sync", sync), ("fast", fast)):
            if not isinstance(value, bool):
                raise ValueError(f"BNP: {label} must be True or False, got {value!r}")
        patterns = (skip,) if isinstance(skip, str) else tuple(skip)
        candidates = _candidates(model)
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"BNP: skip patterns must be strings, got {pattern!r}")
            if not any(_matches(pattern, n, m) for n, m in candidates.items()):
                raise ValueError(
                    f"BNP: skip pattern {pattern!r} matches no layer; "
                    f"layers that can be skipped: {sorted(candidates)}"
                )
        self.momentum = None if momentum is None else float(momentum)
        self.eps = float(eps)
        self.warmup = warmup
        self.center = center
        self.scale = scale
        self.skip = patterns
        self.sync = sync
        self.fast = fast
        self.steps = 0  # step() calls that had statistics and new gradients (what warmup counts)

        self._layers: list[_Layer] = []
        offset = 0
        for name, module in candidates.items():
            if any(_matches(p, name, module) for p in patterns):
                continue
            layer = _Layer(name, module, offset)
            layer.index = len(self._layers)
            offset += layer.features
            self._layers.append(layer)
        if not self._layers:
            raise ValueError(
                "BNP: nothing to precondition: the model has no Linear/Conv1d/2d/3d layer with a "
                f"trainable weight left after skip={list(patterns)}"
            )
        device = self._layers[0].module.weight.device
        # float32 statistics and arithmetic for every model dtype, float64 for float64 models
        wide = any(layer.module.weight.dtype == torch.float64 for layer in self._layers)
        dtype = torch.float64 if wide else torch.float32
        # All statistics live in two flat buffers (mean, var); each layer holds views into them.
        self._mean = torch.zeros(offset, dtype=dtype, device=device)
        self._var = torch.zeros(offset, dtype=dtype, device=device)
        self._sizes = [layer.features for layer in self._layers]
        self._all_dense = all(layer.dense for layer in self._layers)
        # per-step temporaries, recomputed after every fold: see _derived_stats and _fold_pending
        self._derived = None  # 1 / (sigma2 + eps) and -mu / (sigma2 + eps) per layer
        self._a_hat: tuple[torch.Tensor, ...] | None = None  # a fast backward's a_hat, per layer
        self._batched = fast and self._all_dense and center and scale and all(
            layer.bias is not None for layer in self._layers)  # a_hat of all layers in one op
        self._ones_cache: dict[int, torch.Tensor] = {}
        self._bind()
        for layer in self._layers:
            if fast and layer.dense:
                layer.fast = True
                layer.module.forward = _FastForward(self, layer)  # records inputs itself
            else:
                layer.handle = layer.module.register_forward_pre_hook(_RecordInput(self, layer))

    # ------------------------------------------------------------------ statistics
    def _bind(self) -> None:
        for layer in self._layers:
            layer.mean, layer.var = self._mean[layer.span], self._var[layer.span]
            layer.mean_w = layer.mean.view(layer.shape_stats)

    def _to(self, device: torch.device) -> None:
        self._mean = self._mean.to(device)
        self._var = self._var.to(device)
        self._ones_cache.clear()
        self._bind()

    # Statistics are folded in lazily: the hook only keeps a reference to the input (autograd keeps
    # it alive for the weight gradient anyway) and the next step() folds all layers at once, which
    # is exactly the per-forward recurrence but with a few flat ops instead of several per layer.
    # A second forward before step(), a forward without autograd (nothing then guards the input
    # against in-place edits), stats() and state_dict() fold first, so no order is ever changed.
    def _record(self, layer: _Layer, x: torch.Tensor) -> None:
        if layer.pending is not None:
            self._fold_now(layer)
        layer.pending = x
        if not torch.is_grad_enabled():
            self._fold_now(layer)

    def _fold_now(self, layer: _Layer) -> None:
        # under torch.distributed every fold is collective, over all layers at once
        if self._synced():
            self._fold_pending()
        else:
            self._fold(layer)

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _synced(self) -> bool:
        return self.sync and self._distributed()

    def _fold_pending(self, prepare: bool = False) -> None:
        """Fold every recorded input into the running statistics. With ``prepare`` (a fast
        backward of an all-dense model), also keep every layer's a_hat = (a - mu) / (sigma2 + eps),
        made from the deviations the fold computes anyway."""
        layers = [layer for layer in self._layers if layer.pending is not None]
        if not layers:
            return
        self._forget_derived()
        if layers[0].pending.device != self._mean.device:
            self._to(layers[0].pending.device)
        if self._synced():
            self._fold_synced()
            return
        rows = [self._rows(layer) for layer in layers]
        first = layers[0].batches == 0
        alpha = self._alpha(rows[0][0].shape[0])
        if (len(layers) < len(self._layers) or any((layer.batches == 0) != first for layer in layers)
                or any(self._alpha(x.shape[0]) != alpha for x, _ in rows)):
            for layer in layers:  # layers in different states: one at a time
                self._fold(layer)
            return
        if self._all_dense and len({x.shape[0] for x, _ in rows}) == 1:
            # every layer saw the same rows (an MLP): fold them side by side as one matrix
            rows = [(torch.cat([x for x, _ in rows], dim=1), (0,))]
        deviations = self._update(self._mean, self._var, rows, alpha, first, keep=prepare and len(rows) == 1)
        if deviations is not None:
            self._a_hat = deviations[0].div_(torch.add(self._var, self.eps)).split(self._sizes, dim=1)
        for layer in layers:
            layer.pending = None
            layer.batches += 1

    def _fold(self, layer: _Layer) -> None:
        """Fold one layer's pending input into its statistics."""
        if layer.pending.device != self._mean.device:
            self._to(layer.pending.device)
        self._forget_derived()
        row = self._rows(layer)
        layer.pending = None
        self._update(layer.mean, layer.var, [row], self._alpha(row[0].shape[0]), layer.batches == 0)
        layer.batches += 1

    def _update(self, mean: torch.Tensor, var: torch.Tensor, rows: list[tuple[torch.Tensor, tuple[int, ...]]],
                alpha: float, first: bool, keep: bool = False) -> list[torch.Tensor] | None:
        """The spec's recurrences, in place, for inputs ``rows`` [(x, dims to pool)] whose features,
        in order, are those of ``mean`` and ``var``:

            mu <- mu + alpha (m_B - mu);  sigma2 <- sigma2 + alpha (mean_B((a - mu)^2) - sigma2)

        with the updated mu (the first batch sets mu = m_B, alpha = 1). Returns the deviations
        a - mu of every row if ``keep``. On CPU: two plain passes (mean, then the deviations); on
        GPU one pass per input (torch.var_mean, Welford), with mean_B((a - mu)^2) = var_B + (m_B - mu)^2.
        """
        one_pass = self._one_pass(rows[0][0])
        if one_pass:
            moments = [torch.var_mean(x, dims, correction=0) for x, dims in rows]
            batch_mean = _joined([m for _, m in moments])
        else:  # a single dense row is its own mean
            batch_mean = _joined([x[0] if x.shape[0] == 1 and dims == (0,) else x.mean(dims) for x, dims in rows])
        mean.lerp_(batch_mean, 1.0 if first else alpha)  # weight 1 gives m_B exactly
        deviations = None
        if keep or not one_pass:
            means = (mean,) if len(rows) == 1 else mean.split([x.shape[1] for x, _ in rows])
            centered = (x - mu.view(-1, *(1,) * (x.dim() - 2)) for (x, _), mu in zip(rows, means))
            if keep:
                deviations = list(centered)
        if one_pass:
            diff = batch_mean - mean
            squared = _joined([v for v, _ in moments]).addcmul_(diff, diff)
        else:  # a generator unless kept: one temporary at a time (conv activations are large)
            squared = _joined([_mean_square(d, dims, in_place=not keep)
                               for d, (_, dims) in zip(deviations or centered, rows)])
        var.lerp_(squared, 1.0 if first else alpha)
        return deviations if keep else None

    def _rows(self, layer: _Layer) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The pending input in the statistics' dtype and the dims to pool: (rows, features) for
        Linear, (batch, channels, *spatial) for convolutions."""
        x = layer.pending
        if x.dtype != self._mean.dtype:
            x = x.to(self._mean.dtype)
        if not layer.dense:
            if x.dim() == layer.spatial_dims + 1:  # unbatched (C, *spatial)
                x = x.unsqueeze(0)
            return x, (0, *range(2, x.dim()))
        return (x if x.dim() == 2 else x.reshape(-1, layer.features)), (0,)

    def _fold_synced(self) -> None:
        """Fold the pending inputs of every rank with one all-reduce (two on a layer's first batch).

        Each rank sums, per feature, its inputs and their squared deviations from a center c that
        all ranks share (the running mean; on the first batch the global batch mean, found by an
        extra all-reduce); with the pooled mean m and s = mean((a - c)^2), the spec's squared
        deviation from the updated mean mu' = c + alpha (m - c) is s - alpha (2 - alpha) (m - c)^2.
        Ranks may hold different batch sizes: sums are weighted by sample counts.
        """
        layers, n_feat = self._layers, self._mean.numel()
        rows = [self._rows(layer) if layer.pending is not None else None for layer in layers]
        center = self._mean.clone()
        if any(layer.batches == 0 and r is not None for layer, r in zip(layers, rows)):
            sums = self._mean.new_zeros(n_feat + len(layers))
            for i, (layer, r) in enumerate(zip(layers, rows)):
                if r is not None:
                    sums[layer.span] = r[0].sum(r[1])
                    sums[n_feat + i] = r[0].numel() // layer.features
            dist.all_reduce(sums)
            for i, layer in enumerate(layers):
                if layer.batches == 0 and sums[n_feat + i] > 0:
                    sl = layer.span
                    center[sl] = sums[sl] / sums[n_feat + i]
        n_layers = len(layers)
        buf = self._mean.new_zeros(2 * n_feat + 2 * n_layers)  # sums, squared deviations, counts, samples
        for i, (layer, r) in enumerate(zip(layers, rows)):
            if r is not None:
                x, dims = r
                buf[2 * n_feat + n_layers + i] = x.shape[0]
                c = center[layer.span]
                buf[layer.span] = x.sum(dims)
                c = c.view(-1, *(1,) * (x.dim() - 2)) if not layer.dense else c
                buf[n_feat + layer.offset : n_feat + layer.offset + layer.features] = (x - c).square_().sum(dims)
                buf[2 * n_feat + i] = x.numel() // layer.features
        dist.all_reduce(buf)
        for i, layer in enumerate(layers):
            layer.pending = None
            count = buf[2 * n_feat + i]
            if count == 0:
                continue
            sl = layer.span
            m, s, c = buf[sl] / count, buf[n_feat + sl.start : n_feat + sl.stop] / count, center[sl]
            alpha = self._alpha(int(buf[2 * n_feat + n_layers + i].item()))  # from the global batch
            if layer.batches == 0:
                layer.mean.copy_(m)
                layer.var.copy_(s - (m - c).square())
            else:
                layer.mean.lerp_(m, alpha)
                layer.var.lerp_(s - alpha * (2 - alpha) * (m - c).square(), alpha)
            layer.batches += 1

    def _alpha(self, samples: int) -> float:
        """The momentum for a batch of ``samples`` samples (rows of a dense input, or images)."""
        return self.momentum if self.momentum is not None else min(0.1, samples / AUTO_WINDOW)

    @staticmethod
    def _one_pass(x: torch.Tensor) -> bool:
        """Batch moments in one pass (torch.var_mean, Welford) on GPUs; on CPU two plain passes
        (mean, then squared deviation) were 10-15x faster."""
        return x.is_cuda

    # ------------------------------------------------------------------ preconditioning
    @torch.no_grad()
    def step(self) -> None:
        """Replace (dL/dW, dL/db) of every tracked layer by the BNP-preconditioned gradient.

        Call it once per backward. A gradient that step() already preconditioned and that nothing
        has changed since is never preconditioned again; if no tracked layer has a new gradient,
        step() raises. Only calls with new gradients and statistics count towards ``warmup``
        (before the first training forward there are no statistics: gradients stay as they are)."""
        self._fold_pending()
        with_grads = [layer for layer in self._layers if layer.weight.grad is not None]
        fresh = [layer for layer in with_grads if layer.has_new_grad()]
        if with_grads and not fresh:
            raise RuntimeError(
                "BNP.step(): the gradients have not changed since the last step() preconditioned them; "
                "call step() once per backward: forward, loss.backward(), pre.step(), optimizer.step()"
            )
        if fresh and any(layer.batches for layer in self._layers):  # else nothing to precondition with yet
            self.steps += 1
        if self.steps > self.warmup:
            layers = [layer for layer in fresh if layer.batches and not (layer.fast_grads and not layer.deferred)]
            if layers:
                self._precondition_all(layers)
        for layer in fresh:
            layer.mark_grad()
        for layer in self._layers:
            layer.forwards, layer.fast_grads, layer.deferred = 0, False, False
        self._forget_derived()  # the persistent state stays (mean, var)

    def _forget_derived(self) -> None:
        self._derived = self._a_hat = None

    def _derived_stats(self) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Per layer (in order), 1 / (sigma2 + eps) and -mu / (sigma2 + eps) (None where scale /
        center is off): computed for all layers at once, once per step, and split into views."""
        if self._derived is None:
            inv = shift = None
            if self.scale:
                inv = torch.add(self._var, self.eps).reciprocal_()
                if self.center:
                    shift = (self._mean * inv).neg_().split(self._sizes)
                inv = inv.split(self._sizes)
            self._derived = (inv, shift)
        return self._derived

    def _ones(self, n: int) -> torch.Tensor:
        ones = self._ones_cache.get(n)  # emptied by _to(), so always on the statistics' device
        if ones is None:
            ones = self._ones_cache[n] = self._mean.new_ones(n)
        return ones

    def _input_side_grads(
        self, layer: _Layer, x: torch.Tensor, grad_out: torch.Tensor, need_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(G_tilde, g_tilde) of a fast Linear from its input and dL/dh, or the raw (G, g)
        during warmup and when the layer is deferred to the reference path."""
        if layer.pending is not None:  # the statistics include this batch, as in the reference order
            self._fold_pending(prepare=self._batched and self.steps >= self.warmup)
        dtype = self._mean.dtype
        delta = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
        if delta.dtype != dtype:
            delta = delta.to(dtype)
        if self._a_hat is not None and not layer.deferred:  # prepared with the fold, for all layers
            a, center = self._a_hat[layer.index], True
            layer.fast_grads = True
        else:
            a, center = self._own_a_hat(layer, x)
        delta_t = delta.t()
        grad_w = delta_t * a if a.shape[0] == 1 else delta_t.mm(a)  # one sample: an outer product
        if grad_w.dtype != layer.weight.dtype:
            grad_w = grad_w.to(layer.weight.dtype)
        if not need_bias:
            return grad_w, None
        if center:  # Delta^T (1 - a_hat mu)
            grad_b = delta_t.mv(torch.addmv(self._ones(a.shape[0]), a, layer.mean, alpha=-1))
        else:
            grad_b = delta.sum(0)
        bias = layer.bias_param
        return grad_w, grad_b if grad_b.dtype == bias.dtype else grad_b.to(bias.dtype)

    def _own_a_hat(self, layer: _Layer, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """One layer's input as its weight gradient needs it: a_hat = (a - mu) / (sigma2 + eps)
        (less what center / scale turn off), or a itself during warmup and when deferred; and
        whether it was centered."""
        dtype = self._mean.dtype
        a = x if x.dim() == 2 else x.reshape(-1, layer.features)
        if a.dtype != dtype:
            a = a.to(dtype)
        precondition = not layer.deferred and self.steps >= self.warmup and layer.batches > 0
        center = precondition and self.center and layer.bias is not None
        if precondition:
            inv, shift = self._derived_stats()
            if shift is not None and center:
                a = torch.addcmul(shift[layer.index], a, inv[layer.index])
            elif inv is not None:
                a = a * inv[layer.index]
            elif center:
                a = a - layer.mean
            layer.fast_grads = True
        return a, center

    @torch.no_grad()
    def _defer(self, layer: _Layer) -> None:
        """Hand this step of a fast layer to the reference path (a second forward before step()).
        Grads a fast backward already preconditioned are turned back into raw ones, exactly
        inverting the rule with the statistics it used (nothing has changed them since)."""
        if layer.deferred:
            return
        layer.deferred = True
        grad = layer.weight.grad
        if not layer.fast_grads or grad is None:
            return
        dtype = self._mean.dtype
        G = grad.to(dtype)
        bias_grad = layer.bias.grad if layer.bias is not None else None
        center = self.center and bias_grad is not None
        if center:
            g = bias_grad.to(dtype).addmv(G, layer.mean)  # g = g_tilde + G_tilde mu
            bias_grad.copy_(g)
        if self.scale:
            G = G * (layer.var + self.eps)
        if center:
            G = G.addr(g, layer.mean)  # G = G_tilde D2 + g mu^T
        grad.copy_(G)

    def _precondition_all(self, layers: list[_Layer]) -> None:
        """The reference rule for ``layers``: elementwise parts with foreach ops across layers."""
        dtype = self._mean.dtype
        inv = self._derived_stats()[0]
        work = []  # (layer, G in the statistics' dtype, G shaped like the statistics, g or None)
        for layer in layers:
            grad = layer.weight.grad
            # edit contiguous grads of the statistics' dtype in place, copy the others
            G = grad if grad.dtype == dtype and grad.is_contiguous() else grad.to(dtype, memory_format=torch.contiguous_format)
            bias_grad = layer.bias.grad if layer.bias is not None else None
            g = None
            if self.center and bias_grad is not None:
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
                self._correct_bias(layer, G, Gw, g)
                if g is not layer.bias.grad:
                    layer.bias.grad.copy_(g)
            if G is not layer.weight.grad:
                layer.weight.grad.copy_(G)

    @staticmethod
    def _correct_bias(layer: _Layer, G: torch.Tensor, Gw: torch.Tensor, g: torch.Tensor) -> None:
        """g_tilde = g - G_tilde mu; a kernel window shares its channel's mu, so sum it first."""
        if layer.dense:
            g.addmv_(G, layer.mean, alpha=-1)
        elif layer.groups == 1:
            g.addmv_(Gw.sum(2), layer.mean, alpha=-1)
        else:
            g.view(layer.shape_w[:2] + (1,)).baddbmm_(
                Gw.sum(3), layer.mean.view(layer.groups, layer.in_per_group, 1), alpha=-1
            )

    # ------------------------------------------------------------------ CUDA graphs
    # A captured step records its kernels while its Python runs once; a replay runs the kernels only.
    # BNP's host-side counters (steps, batches per layer) must follow the replays, not the capture.
    @contextlib.contextmanager
    def recording(self):
        """Leave the host-side counters as they were: wrap the capture of a step in this."""
        saved = self.steps, [layer.batches for layer in self._layers]
        try:
            yield
        finally:
            self.steps = saved[0]
            for layer, batches in zip(self._layers, saved[1]):
                layer.batches = batches

    def replayed(self, steps: int = 1) -> None:
        """Count ``steps`` replays of a captured step (each one forward per layer and one step())."""
        self.steps += steps
        for layer in self._layers:
            layer.batches += steps

    # ------------------------------------------------------------------ introspection & state
    @property
    def names(self) -> list[str]:
        """Qualified names of the tracked layers, in model order."""
        return [layer.name for layer in self._layers]

    def _layer(self, name: str) -> _Layer:
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise KeyError(f"BNP: no tracked layer named {name!r}; tracked: {self.names}")

    def stats(self, name: str) -> LayerStats:
        """Current running mean and variance of the inputs of layer ``name`` (copies)."""
        layer = self._layer(name)
        self._fold_pending()
        return LayerStats(layer.mean.clone(), layer.var.clone(), layer.batches)

    def state_dict(self) -> dict[str, Any]:
        self._fold_pending()
        return {
            "steps": self.steps,
            "layers": {
                layer.name: {"mean": layer.mean.clone(), "var": layer.var.clone(), "batches": layer.batches}
                for layer in self._layers
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layers = state["layers"]
        missing = sorted(set(self.names) - set(layers))
        unexpected = sorted(set(layers) - set(self.names))
        if missing or unexpected:
            raise KeyError(f"BNP.load_state_dict: missing layers {missing}, unexpected layers {unexpected}")
        self._fold_pending()  # inputs seen before loading belong to the replaced history
        for layer in self._layers:
            saved = layers[layer.name]
            if saved["mean"].shape != layer.mean.shape:
                raise ValueError(
                    f"BNP.load_state_dict: layer {layer.name!r} has {layer.features} input features, "
                    f"the saved state has {saved['mean'].numel()}"
                )
            layer.mean.copy_(saved["mean"])
            layer.var.copy_(saved["var"])
            layer.batches = int(saved["batches"])
        self.steps = int(state["steps"])
        self._forget_derived()

    def remove(self) -> None:
        """Detach the forward hooks; the model is left exactly as it was."""
        self._fold_pending()
        for layer in self._layers:
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
            if layer.fast and "forward" in vars(layer.module):
                del layer.module.forward  # back to the class's forward

    def __repr__(self) -> str:
        options = (
            f"momentum={'auto' if self.momentum is None else self.momentum}, eps={self.eps}, warmup={self.warmup}, "
            f"center={self.center}, scale={self.scale}, skip={list(self.skip)}, sync={self.sync}, fast={self.fast}"
        )
        layers = "".join(f"\n  {layer.describe()}" for layer in self._layers)
        return f"BNP({options}, layers={len(self._layers)}):{layers}"
