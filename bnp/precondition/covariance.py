"""The full-covariance counterpart of BNP: what BNP's diagonal leaves on the table.

For a layer ``h = W a + b`` with running mean ``mu`` and running covariance ``Sigma`` of its inputs
and ``C = (Sigma + eps I)^-1``, the gradients are replaced by

    G_tilde = (G - g mu^T) C        g_tilde = g - G_tilde mu

which is plain gradient descent on the same layer with whitened inputs ``A (a - mu)``, ``A^T A = C``:
BNP's reparameterization (docs/bnp-method.md) with the full matrix where BNP keeps its diagonal
(``diag(Sigma)``). K-FAC's input factor is this matrix, uncentered and without an output factor.
A Conv2d is the dense layer of its input patches (``F.unfold``: in_channels x kh x kw features, the
weight's own order). The statistics follow BNP's recurrences with outer products in place of
squares; the inverse (a Cholesky factorization, O(n^3)) is refreshed every ``refresh`` steps and
used as it is in between. Layers with more than ``max_features`` input features, grouped or
non-2d convolutions are left to the optimizer (``repr`` lists them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bnp import options
from bnp.precondition.layers import candidates, check_unclaimed, matches, resolve_ends, skip_patterns
from bnp.precondition.stats import momentum_for


class _Layer:
    """One tracked layer: its patches' shape, running mean and covariance, and the cached inverse."""

    preconditions_layer = True  # its hook marks the layer taken (layers.check_unclaimed)

    def __init__(self, name: str, module: nn.Module, alpha):
        self.name, self.module, self.alpha = name, module, alpha  # alpha(samples): the momentum
        self.dense = isinstance(module, nn.Linear)
        self.features = module.weight[0].numel()  # in_features, or in_channels x kh x kw
        bias = module.bias
        self.bias = bias if isinstance(bias, torch.Tensor) and bias.requires_grad else None
        self.mean = self.cov = self.inverse = None
        self.batches = 0
        self.pending: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._collect)

    def _collect(self, module: nn.Module, args: tuple) -> None:
        if module.training and args:
            if self.pending is not None:  # a second forward before step(): fold the first now
                self.fold()
            self.pending = args[0].detach()

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The input as (rows, features) and the number of samples it holds (images for a conv)."""
        if self.dense:
            return x.reshape(-1, self.features), x.reshape(-1, self.features).shape[0]
        m = self.module
        x = x if x.dim() == 4 else x.unsqueeze(0)
        patches = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, features, positions)
        return patches.transpose(1, 2).reshape(-1, self.features), x.shape[0]

    def fold(self) -> None:
        """The spec's recurrences with outer products: mu <- mu + alpha (m_B - mu), then
        Sigma <- Sigma + alpha (mean_B((a - mu)(a - mu)^T) - Sigma); the first batch sets both."""
        x, self.pending = self.pending, None
        dtype = torch.float64 if self.module.weight.dtype == torch.float64 else torch.float32
        a, samples = self.rows(x.to(dtype))
        if self.mean is None or self.mean.dtype != dtype or self.mean.device != a.device:
            self.mean = a.new_zeros(self.features) if self.mean is None else self.mean.to(a)
            self.cov = a.new_zeros(self.features, self.features) if self.cov is None else self.cov.to(a)
            self.inverse = None if self.inverse is None else self.inverse.to(a)
        alpha = 1.0 if self.batches == 0 else self.alpha(samples)
        self.mean.lerp_(a.mean(0), alpha)
        d = a - self.mean
        self.cov.lerp_(d.T @ d / a.shape[0], alpha)
        self.batches += 1

    def invert(self, eps: float) -> None:
        shifted = self.cov + eps * torch.eye(self.features, dtype=self.cov.dtype, device=self.cov.device)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if info.item() == 0:
            self.inverse = torch.cholesky_inverse(factor)
        elif shifted.isfinite().all():  # positive definite in exact arithmetic, not after float rounding
            values, vectors = torch.linalg.eigh(shifted)
            self.inverse = (vectors / values.clamp_min(eps)) @ vectors.T
        else:  # inputs that blew up: NaN gradients, which the runner's divergence rule reports
            self.inverse = torch.full_like(shifted, math.nan)

    def precondition(self) -> None:
        grad = self.module.weight.grad
        G = grad.reshape(grad.shape[0], -1).to(self.inverse.dtype)
        g = self.bias.grad.to(self.inverse.dtype) if self.bias is not None and self.bias.grad is not None else None
        if g is not None:
            G = G - torch.outer(g, self.mean)
        G_tilde = G @ self.inverse
        grad.copy_(G_tilde.view_as(grad))
        if g is not None:
            self.bias.grad.copy_(g - G_tilde @ self.mean)


class FullCovariance:
    """Precondition every Linear / Conv2d layer's gradient by its inputs' inverse running covariance.

    Args (keyword-only): ``momentum`` (None: BNP's auto rule, min(0.1, batch / 100)), ``eps`` (added
    to the diagonal, > 0), ``refresh`` (steps between inversions, >= 1), ``skip`` (BNP's patterns:
    module names, class names, ``@first``, ``@last``), ``max_features`` (larger layers are left alone).
    Use it like BNP: ``loss.backward(); pre.step(); optimizer.step()``.
    """

    def __init__(self, model: nn.Module, *, momentum: float | None = None, eps: float = 1e-2, refresh: int = 10,
                 skip: str | Iterable[str] = (), max_features: int = 4096):
        options.check("FullCovariance: ", momentum=momentum, eps=eps)
        for label, value in (("refresh", refresh), ("max_features", max_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FullCovariance: {label} must be an integer >= 1, got {value!r}")
        self.momentum, self.eps, self.refresh, self.max_features = momentum, float(eps), refresh, max_features
        found = candidates(model)
        self.skip = resolve_ends(list(found), skip_patterns(skip))
        for pattern in self.skip:
            if not any(matches(pattern, n, m) for n, m in found.items()):
                raise ValueError(f"FullCovariance: skip pattern {pattern!r} matches no layer; layers: {sorted(found)}")
        self.left: dict[str, str] = {}  # layers this rule leaves to the optimizer, and why
        self._layers: list[_Layer] = []
        why = {name: self._unsupported(name, module) for name, module in found.items()}
        check_unclaimed(((n, m) for n, m in found.items() if not why[n]), "FullCovariance")
        for name, module in found.items():
            if why[name]:
                self.left[name] = why[name]
            else:
                self._layers.append(_Layer(name, module, self._alpha))
        if not self._layers:
            raise ValueError(f"FullCovariance: nothing to precondition; left alone: {self.left}")
        self.steps = 0
        self.removed = False

    def _unsupported(self, name: str, module: nn.Module) -> str | None:
        if any(matches(p, name, module) for p in self.skip):
            return "skipped"
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return f"{type(module).__name__}: only Linear and Conv2d"
        if isinstance(module, nn.Conv2d) and (module.groups > 1 or module.padding_mode != "zeros"):
            return "grouped or non-zero-padded Conv2d"
        features = module.weight[0].numel()
        if features > self.max_features:
            return f"{features} input features > max_features={self.max_features}"
        return None

    def _alpha(self, samples: int) -> float:
        return momentum_for(self.momentum, samples)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    @torch.no_grad()
    def step(self) -> None:
        """Fold this step's inputs, refresh the inverses every ``refresh`` steps, and rewrite the
        gradients of every layer that has statistics (before the first training forward: none)."""
        if self.removed:
            raise RuntimeError("FullCovariance.step(): it was removed (remove()); create a new one to precondition")
        if all(layer.module.weight.grad is None for layer in self._layers):
            raise RuntimeError("FullCovariance.step(): no tracked layer has a gradient; call it after "
                               "loss.backward(): forward, loss.backward(), pre.step(), optimizer.step()")
        for layer in self._layers:
            if layer.pending is not None:
                layer.fold()
        ready = [layer for layer in self._layers if layer.batches > 0]
        if not ready:
            return
        if self.steps % self.refresh == 0 or any(layer.inverse is None for layer in ready):
            for layer in ready:
                layer.invert(self.eps)
        self.steps += 1
        for layer in ready:
            if layer.module.weight.grad is not None:
                layer.precondition()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (the inverses too: they may be stale)."""
        return {"steps": self.steps, "layers": {
            layer.name: {"mean": layer.mean, "cov": layer.cov, "inverse": layer.inverse, "batches": layer.batches}
            for layer in self._layers}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["layers"]
        if set(saved) != set(self.names):
            raise KeyError(f"FullCovariance.load_state_dict: layers {sorted(saved)} != tracked {self.names}")
        for layer in self._layers:
            entry = saved[layer.name]
            layer.mean, layer.cov, layer.inverse = (None if entry[k] is None else entry[k].clone()
                                                    for k in ("mean", "cov", "inverse"))
            layer.batches, layer.pending = int(entry["batches"]), None
        self.steps = int(state["steps"])

    def remove(self) -> None:
        self.removed = True
        for layer in self._layers:
            layer.handle.remove()

    def __repr__(self) -> str:
        options = (f"momentum={'auto' if self.momentum is None else self.momentum}, eps={self.eps}, "
                   f"refresh={self.refresh}, max_features={self.max_features}")
        tracked = "".join(f"\n  {layer.name}: {type(layer.module).__name__}({layer.features} features)"
                          for layer in self._layers)
        left = "".join(f"\n  {name}: {why}" for name, why in self.left.items())
        return f"FullCovariance({options}, layers={len(self._layers)}):{tracked}" + (
            f"\nleft to the optimizer:{left}" if left else "")
