"""Gradient rules that compose: each acts on the ``.grad`` of a model's Linear / Conv layers after
``backward()`` and before ``optimizer.step()``, so any ``torch.optim`` optimizer takes the result.

A rule has one small interface: ``step()``, ``state_dict()`` / ``load_state_dict()`` and a ``repr``.
``BNP`` and ``FullCovariance`` are rules of this kind that precondition; the rules here rescale:

- ``OutputScale``: each output unit's gradient row times 1 / (v + eps), v the running variance of the
  unit's pre-activation (BatchNorm's gamma^2 / Var(h) step scale);
- ``Clip``: unit-wise adaptive gradient clipping (NFNets' AGC): a unit's row [G_i, g_i] is scaled
  down to at most clip x max(||[W_i, b_i]||, 1e-3);
- ``Trust``: the layer-wise trust ratio (LARS): a layer's whole gradient [G, g] is rescaled to
  trust x max(||[W, b]||, 1e-3), so every layer moves by the same fraction of its weights per plain
  SGD step (lr x trust).

``Chain(*rules)`` applies rules in the order given; the runner's order is the preconditioner, then
``OutputScale``, ``Clip``, ``Trust`` (``RULE_ORDER``). ``Clip`` and ``Trust`` keep no statistics and
work with or without BNP, on any model. A rule of one's own joins a chain by having ``step()``::

    rules = bnp.Chain(bnp.BNP(model), bnp.Clip(model, clip=1.0))
    loss.backward(); rules.step(); optimizer.step()
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from torch import nn

from bnp import options
from bnp.precondition.layers import candidates
from bnp.precondition.stats import momentum_for, pooled, recurrence

MIN_WEIGHT_NORM = 1e-3  # NFNets: units (layers) with (near) zero weights may still move this much
RULE_ORDER = ("outscale", "agc", "lars")  # the runner's order after the preconditioner (configs/grad)


class Unit(NamedTuple):
    """One Linear / Conv layer as a rescaling rule sees it: weight rows (one per output unit), bias."""

    name: str
    module: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None  # trained bias, or None

    @classmethod
    def all_of(cls, model: nn.Module) -> list[Unit]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"gradient rule: model must be a torch.nn.Module, got {type(model).__name__}")
        found = [cls(name, m, m.weight, m.bias if isinstance(getattr(m, "bias", None), torch.Tensor)
                     and m.bias.requires_grad else None) for name, m in candidates(model).items()]
        if not found:
            raise ValueError("gradient rule: the model has no Linear/Conv1d/2d/3d layer with a trainable weight")
        return found

    def rows(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """(G as rows, the bias or None, each row's squared length of [G_i, g_i] and of [W_i, b_i]);
        None when the weight has no gradient."""
        if self.weight.grad is None:
            return None
        G = self.weight.grad.reshape(self.weight.shape[0], -1)
        bias = self.bias if self.bias is not None and self.bias.grad is not None else None
        grad_sq = G.square().sum(1)
        weight_sq = self.weight.detach().reshape(self.weight.shape[0], -1).square().sum(1)
        if bias is not None:
            grad_sq = grad_sq + bias.grad.square()
            weight_sq = weight_sq + bias.detach().square()
        return G, bias, grad_sq, weight_sq


def _scale_rows(G: torch.Tensor, bias: torch.Tensor | None, factor: torch.Tensor) -> None:
    """Multiply each gradient row [G_i, g_i] by factor (one per row, or one for all); G is a view of .grad."""
    G.mul_(factor.view(-1, 1).to(G.dtype))
    if bias is not None:
        bias.grad.mul_(factor.to(bias.grad.dtype))


def _positive(who: str, label: str, value: Any) -> float:
    options.check_positive(f"{who}: ", label, value)
    return float(value)


class _RowScaling:
    """A rule without state that multiplies each Linear / Conv layer's gradient rows [G_i, g_i] by
    ``factor(squared row lengths of the gradient, of the weights)``; its one option is ``KEY``."""

    KEY = ""

    def __init__(self, model: nn.Module, value: float):
        setattr(self, self.KEY, _positive(type(self).__name__, self.KEY, value))
        self.units = Unit.all_of(model)

    def factor(self, grad_sq: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self) -> None:
        for unit in self.units:
            if (parts := unit.rows()) is not None:
                G, bias, grad_sq, weight_sq = parts
                _scale_rows(G, bias, self.factor(grad_sq, weight_sq))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.KEY}={getattr(self, self.KEY)}, layers={len(self.units)})"


class Clip(_RowScaling):
    """Unit-wise adaptive gradient clipping: ||[G_i, g_i]|| <= clip x max(||[W_i, b_i]||, 1e-3) for
    every output unit i of every Linear / Conv layer (NFNets' AGC)."""

    KEY = "clip"

    def __init__(self, model: nn.Module, clip: float = 1.0):
        super().__init__(model, clip)

    def factor(self, grad_sq: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
        limit = weight_sq.sqrt().clamp_min(MIN_WEIGHT_NORM) * self.clip
        return (limit / grad_sq.sqrt().clamp_min(1e-30)).clamp_max(1.0)


class Trust(_RowScaling):
    """Layer-wise trust ratio: ||[G, g]|| of every Linear / Conv layer becomes trust x max(||[W, b]||,
    1e-3) (a zero gradient stays zero), as LARS without its momentum."""

    KEY = "trust"

    def __init__(self, model: nn.Module, trust: float = 0.001):
        super().__init__(model, trust)

    def factor(self, grad_sq: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
        limit = weight_sq.sum().sqrt().clamp_min(MIN_WEIGHT_NORM) * self.trust
        return limit / grad_sq.sum().sqrt().clamp_min(1e-30)


class OutputScale:
    """Each output unit's gradient row times 1 / (v + eps), v the running variance of the unit's
    pre-activation, kept by forward hooks with BNP's recurrence and momentum (None: min(0.1,
    batch / 100)). Units whose layer has not run a training forward yet are left as they are."""

    def __init__(self, model: nn.Module, eps: float = 1e-2, momentum: float | None = None):
        options.check("OutputScale: ", momentum=momentum, eps=eps)
        self.eps, self.momentum = float(eps), momentum
        self.units = Unit.all_of(model)
        self.mean: dict[str, torch.Tensor] = {}
        self.var: dict[str, torch.Tensor] = {}
        self.batches: dict[str, int] = {}
        self.handles = [unit.module.register_forward_hook(self._hook(unit)) for unit in self.units]

    def _hook(self, unit: Unit):
        def collect(module, args, output):
            if module.training:
                with torch.no_grad():
                    self.update(unit, output.detach())
        return collect

    def update(self, unit: Unit, h: torch.Tensor) -> None:
        """Fold one training forward's output ``h`` into the unit statistics (float32, float64 models in float64)."""
        h, dims = pooled(h.to(torch.float64 if unit.weight.dtype == torch.float64 else torch.float32),
                         unit.weight.dim() - 2)
        batches = self.batches.get(unit.name, 0)
        if batches == 0 or self.mean[unit.name].dtype != h.dtype or self.mean[unit.name].device != h.device:
            self.mean[unit.name] = self.mean[unit.name].to(h) if batches else h.new_zeros(h.shape[1])
            self.var[unit.name] = self.var[unit.name].to(h) if batches else h.new_zeros(h.shape[1])
        recurrence(self.mean[unit.name], self.var[unit.name], [(h, dims)],
                   momentum_for(self.momentum, h.shape[0], batches), first=batches == 0, one_pass=False)
        self.batches[unit.name] = batches + 1

    @torch.no_grad()
    def step(self) -> None:
        for unit in self.units:
            if unit.weight.grad is None or unit.name not in self.var:
                continue
            factor = (self.var[unit.name] + self.eps).reciprocal()
            bias = unit.bias if unit.bias is not None and unit.bias.grad is not None else None
            _scale_rows(unit.weight.grad.reshape(unit.weight.shape[0], -1), bias, factor)

    @contextlib.contextmanager
    def recording(self):
        raise RuntimeError("OutputScale changes its momentum and first-batch rule on the host from step to step, "
                           "which a captured CUDA graph would freeze; run it without graph capture")
        yield  # pragma: no cover

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

    def __repr__(self) -> str:
        return f"OutputScale(eps={self.eps}, momentum={'auto' if self.momentum is None else self.momentum}, " \
               f"layers={len(self.units)})"


class Chain:
    """Gradient rules applied in order by one ``step()``; one ``state_dict`` for all of them."""

    def __init__(self, *rules: Any):
        if not rules:
            raise ValueError("Chain: give at least one rule, e.g. Chain(BNP(model), Clip(model))")
        for rule in rules:
            if not callable(getattr(rule, "step", None)):
                raise TypeError(f"Chain: every rule needs a step() method; {type(rule).__name__} has none")
        self.rules = list(rules)

    def step(self) -> None:
        for rule in self.rules:
            rule.step()
        for rule in self.rules:  # the later rules edited .grad in place: it is still this step's gradient
            if hasattr(rule, "mark_grads"):
                rule.mark_grads()

    def find(self, kind: type) -> Any:
        """The first rule that is a ``kind`` (e.g. ``chain.find(BNP)``), or None."""
        return next((rule for rule in self.rules if isinstance(rule, kind)), None)

    @property
    def warmup_left(self) -> int:
        """Steps until every rule acts (BNP's warmup); 0 when none waits."""
        return max((getattr(rule, "warmup_left", 0) for rule in self.rules), default=0)

    @contextlib.contextmanager
    def recording(self):
        """Every rule's recording() around the capture of a CUDA-graph step (bnp.graph)."""
        with contextlib.ExitStack() as stack:
            for rule in self.rules:
                if hasattr(rule, "recording"):
                    stack.enter_context(rule.recording())
            yield

    def replayed(self, steps: int = 1) -> None:
        for rule in self.rules:
            if hasattr(rule, "replayed"):
                rule.replayed(steps)

    def state_dict(self) -> dict:
        return {"rules": [type(rule).__name__ for rule in self.rules],
                "state": [rule.state_dict() if hasattr(rule, "state_dict") else {} for rule in self.rules]}

    def load_state_dict(self, state: dict) -> None:
        names = [type(rule).__name__ for rule in self.rules]
        if state.get("rules") != names:
            raise KeyError(f"Chain.load_state_dict: the saved chain is {state.get('rules')}, this one is {names}")
        for rule, saved in zip(self.rules, state["state"]):
            if hasattr(rule, "load_state_dict"):
                rule.load_state_dict(saved)

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        inner = "".join(f"\n  {line}" for rule in self.rules for line in repr(rule).splitlines())
        return f"Chain({len(self.rules)} rules, in order):{inner}"
