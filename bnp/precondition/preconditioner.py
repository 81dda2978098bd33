"""BNP: Batch Normalization Preconditioning of layer gradients (the package's facade).

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

The pieces: ``layers`` (what is tracked), ``stats`` (running statistics, the fold, derived values),
``sync`` (torch.distributed), ``reference`` (the rule on .grad after backward), ``fast`` (the rule
inside a Linear's backward).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bnp import options
from bnp.precondition import reference
from bnp.precondition.fast import FastForward
from bnp.precondition.layers import (UNSEEN, GradState, Layer, candidates, check_unclaimed, discover, matches, resolve_ends,
                                     skip_patterns, untracked)
from bnp.precondition.stats import LayerStats, RunningStats


# options that became gradient rules of their own (bnp.rules): what to write instead
_MOVED = {"clip": "bnp.Clip(model, clip=...)", "trust": "bnp.Trust(model, trust=...)",
          "output_scale": "bnp.OutputScale(model)"}


def _check_moved(moved: dict[str, Any]) -> None:
    for key in moved:
        if key not in _MOVED:
            raise TypeError(f"BNP: unexpected keyword argument {key!r}")
    if moved:
        rules = ", ".join(_MOVED[k] for k in moved)
        raise TypeError(f"BNP: {', '.join(moved)} is a gradient rule of its own now; chain it after BNP: "
                        f"bnp.Chain(bnp.BNP(model), {rules}), then chain.step() where pre.step() was")


_MHA_NOTE = (" (nn.MultiheadAttention is not supported: its packed in_proj_weight has query, key and value "
             "rows that see different inputs, and it uses out_proj's weight without calling out_proj)")


def _listing(modules: dict[str, tuple[str, list[str]]]) -> list[str]:
    """One 'module: Class (parameters)' entry per module."""
    return [f"{name or '(the model)'}: {kind} ({', '.join(params)})" for name, (kind, params) in modules.items()]


def _warn_untracked(model: nn.Module, left: dict[str, tuple[str, list[str]]], skip: tuple[str, ...]) -> None:
    """Warn once about weight matrices left to the plain optimizer that were not skipped on purpose
    (embeddings, attention projections, custom modules), so nobody believes they are preconditioned."""
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    skip = resolve_ends(list(candidates(model)), skip)
    unexpected = {
        name: (kind, names) for name, (kind, names) in left.items()
        if any(params[f"{name}.{p}" if name else p].dim() >= 2 for p in names)
        and not any(matches(pattern, name, modules[name]) for pattern in skip)
    }
    if unexpected:
        note = _MHA_NOTE if any(kind == "MultiheadAttention" for kind, _ in unexpected.values()) else ""
        warnings.warn(f"BNP leaves these weights to the plain optimizer: {'; '.join(_listing(unexpected))}{note}",
                      stacklevel=3)


@torch.compiler.disable
def _eager_step(pre: BNP) -> None:
    with torch.no_grad():
        pre._step()


class CollectInput:
    """Forward pre-hook of a tracked layer on the reference path. An object bound to
    (preconditioner, layer), so a deep copy of the model collects into its own copy."""

    preconditions_layer = True  # layers.check_unclaimed

    def __init__(self, pre: BNP, layer: Layer):
        self.pre, self.layer = pre, layer

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training and args:
            self.pre.running.collect(self.layer, args[0].detach())  # detached: no autograd graph


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
            e.g. ``("fc_out",)`` or ``("head.*", "Conv1d")``; ``"@first"`` / ``"@last"`` name the
            first / last Linear or Conv layer in model order. Each pattern must match a layer.
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
        moments: how batch moments are computed: "auto" (default: one pass, torch.var_mean, on
            CUDA; two plain passes, mean then squared deviation, on CPU, where they were 5-12x
            faster: results/bench/moments-cpu.md), "one_pass" or "two_pass". The results agree to float rounding.

    Variants of the statistics (opt-in, each off by default; the paper's BNP is the default):
        eps_relative: the variance floor of a layer is eps x the mean sigma2 of its input features
            (1 while they have no variance yet) instead of the absolute eps.
        average_start: the momentum of a layer's t-th batch is max(momentum, 1 / t): a cumulative
            average of the first 1 / momentum batches (BatchNorm's momentum=None), so the early
            statistics are not weighted towards the first batch. Not under CUDA-graph capture.

    Rescaling rules (the output-side scale, unit-wise clipping, the trust ratio) are objects of their
    own that chain after BNP: ``bnp.Chain(BNP(model), bnp.Clip(model))`` (bnp.rules).

    Statistics are collected by forward pre-hooks in training mode only, in float32 whatever the
    model's dtype (float64 for float64 models, also after a later ``model.double()``). ``step()``
    rewrites ``.grad`` in place; call it after ``backward()`` (after ``scaler.unscale_(optimizer)``
    with AMP), before ``optimizer.step()``; out of order (no gradient, no backward since the last
    training forward, after ``remove()``) it raises. One BNP per model: a second one raises.
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
        moments: str = "auto",
        eps_relative: bool = False,
        average_start: bool = False,
        **moved: Any,
    ):
        _check_moved(moved)
        if not isinstance(model, nn.Module):
            raise TypeError(f"BNP: model must be a torch.nn.Module, got {type(model).__name__}")
        options.check("BNP: ", momentum=momentum, eps=eps, warmup=warmup, moments=moments, center=center,
                      scale=scale, sync=sync, fast=fast, eps_relative=eps_relative, average_start=average_start)
        self.eps_relative, self.average_start = eps_relative, average_start
        self.momentum = None if momentum is None else float(momentum)
        self.eps = float(eps)
        self.warmup, self.center, self.scale, self.sync, self.fast = warmup, center, scale, sync, fast
        self.skip = skip_patterns(skip)
        self.steps = 0  # step() calls that had statistics and new gradients (what warmup counts)
        self.compiled_fallback = False  # fast layers ran under torch.compile (reference path instead)
        self._told_fallback = False
        self._layers = discover(model, self.skip)
        check_unclaimed(((layer.name, layer.module) for layer in self._layers), "BNP")
        self.removed = False
        self.untracked = untracked(model, self._layers)
        _warn_untracked(model, self.untracked, self.skip)
        self.running = RunningStats(self._layers, momentum=self.momentum, eps=self.eps, center=center, scale=scale,
                                    sync=sync, moments=moments, prepare_a_hat=fast, eps_relative=eps_relative,
                                    average_start=average_start)
        for layer in self._layers:
            if fast and layer.dense:
                layer.fast = True
                layer.module.forward = FastForward(self, layer)  # collects inputs itself
            else:
                layer.handle = layer.module.register_forward_pre_hook(CollectInput(self, layer))

    def step(self) -> None:
        """Replace (dL/dW, dL/db) of every tracked layer by the BNP-preconditioned gradient.

        Call it once per backward. A gradient that step() already preconditioned and that nothing
        has changed since is never preconditioned again; if no tracked layer has a new gradient,
        step() raises. Only calls with new gradients and statistics count towards ``warmup``
        (before the first training forward there are no statistics: gradients stay as they are)."""
        if torch.compiler.is_compiling():  # inside a torch.compile'd function: run eagerly, not traced
            return _eager_step(self)  # (host-side counters and gradient versions cannot be traced)
        with torch.no_grad():
            self._step()

    def _step(self) -> None:
        self._check_order()
        if self.compiled_fallback and not self._told_fallback:
            self._told_fallback = True
            warnings.warn("BNP(fast=True) under torch.compile: the Linear layers use the reference path "
                          "(step() preconditions their .grad; the same numbers), which compiles without "
                          "graph breaks", stacklevel=3)
        self.running.fold()
        with_grads = [layer for layer in self._layers if layer.weight.grad is not None]
        fresh = [layer for layer in with_grads if layer.has_new_grad()]
        if with_grads and not fresh:
            raise RuntimeError(
                "BNP.step(): the gradients have not changed since the last step() preconditioned them; "
                "call step() once per backward: forward, loss.backward(), pre.step(), optimizer.step()"
            )
        if fresh and any(layer.batches for layer in self._layers):  # else nothing to precondition with yet
            precondition = self.warmup_left == 0  # this step counts: is it past the warmup?
            self.steps += 1
            raw = [layer for layer in fresh if layer.batches and layer.preconditions_in_step]
            if precondition and raw:
                reference.precondition(raw, self.running)
        for layer in fresh:
            layer.mark_grad()
        for layer in self._layers:
            layer.state = GradState.FRESH
            layer.grad_at_forward = UNSEEN
        self.running.release()  # this step's temporaries; the statistics stay

    def _check_order(self) -> None:
        """Misuse raises before anything changes: step() after remove(), with no gradient at all, or
        between a training forward and its backward (the fast path would then precondition the
        next update and the reference path not: the two must not disagree silently)."""
        order = "forward, loss.backward(), pre.step(), optimizer.step()"
        if self.removed:
            raise RuntimeError("BNP.step(): this preconditioner was removed (remove() detached it from the "
                               "model); create a new BNP(model) to precondition again")
        if all(layer.weight.grad is None for layer in self._layers):
            raise RuntimeError(f"BNP.step(): no tracked layer has a gradient; call it after loss.backward(): {order}")
        forwarded = [layer for layer in self._layers if layer.grad_at_forward is not UNSEEN]
        if forwarded and not any(layer.backward_since_forward() for layer in forwarded):
            raise RuntimeError("BNP.step(): no gradient changed since the last training forward, so step() came "
                               f"before loss.backward(); call it after: {order}")

    # ------------------------------------------------------------------ CUDA graphs
    # A captured step records its kernels while its Python runs once; a replay runs the kernels only.
    # BNP's host-side counters (steps, batches per layer) must follow the replays, not the capture.
    def mark_grads(self) -> None:
        """Record the current gradients as this step's (a rule after BNP in a Chain edited them in
        place), so that a second step() without a new backward still raises."""
        for layer in self._layers:
            if layer.weight.grad is not None:
                layer.mark_grad()

    @property
    def warmup_left(self) -> int:
        """Counted steps still to leave gradients raw: the next counted step preconditions when 0
        (the one home of the warmup rule: step(), the fast backward and CUDA-graph capture ask it)."""
        return max(0, self.warmup - self.steps)

    @contextlib.contextmanager
    def recording(self):
        """Leave the host-side counters as they were: wrap the capture of a step in this."""
        if self.average_start:
            raise RuntimeError("BNP: average_start changes the momentum from step to step on the host, which a "
                               "captured CUDA graph would freeze; run it without graph capture")
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
        self.running.count_replays(steps)

    # ------------------------------------------------------------------ introspection & state
    @property
    def names(self) -> list[str]:
        """Qualified names of the tracked layers, in model order."""
        return [layer.name for layer in self._layers]

    def layer(self, name: str) -> Layer:
        """The tracked layer ``name`` (its module, shapes, ``fast`` and this step's gradient ``state``)."""
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise KeyError(f"BNP: no tracked layer named {name!r}; tracked: {self.names}")

    def stats(self, name: str) -> LayerStats:
        """Current running mean and variance of the inputs of layer ``name`` (copies)."""
        return self.running.of(self.layer(name))

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "layers": self.running.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layers = state["layers"]
        missing = sorted(set(self.names) - set(layers))
        unexpected = sorted(set(layers) - set(self.names))
        if missing or unexpected:
            raise KeyError(f"BNP.load_state_dict: missing layers {missing}, unexpected layers {unexpected}")
        self.running.load_state_dict(layers)
        self.steps = int(state["steps"])

    def remove(self) -> None:
        """Detach the forward hooks; the model is left exactly as it was (and step() then raises)."""
        self.removed = True
        self.running.fold()
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
        variants = {k: v for k, v in dict(eps_relative=self.eps_relative, average_start=self.average_start).items() if v}
        options += "".join(f", {k}={v}" for k, v in variants.items())
        layers = "".join(f"\n  {layer.describe()}" for layer in self._layers)
        left = "".join(f"\n  {entry}" for entry in _listing(self.untracked))
        left = f"\nleft to the optimizer ({len(self.untracked)} modules):{left}" if left else ""
        return f"BNP({options}, layers={len(self._layers)}):{layers}{left}"
