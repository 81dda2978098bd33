"""Per-layer instruments of a training run, for finding out why one blows up or lags.

At each log step (``train.diagnostics=true`` adds them to the train rows of metrics.jsonl, prefixed
``diag/``), for every Linear / Conv layer (BNP's tracked layers under norm=bnp):

- ``update_ratio``: ||W_after - W_before|| / ||W_before|| of that step's optimizer update (the
  quantity AGC and LARS bound; BatchNorm keeps it small as weights grow);
and under BNP, from its running input statistics (the first two only when BNP scales, none of them
when it neither centers nor scales):
- ``max_inv_d2``: the largest 1 / (sigma2 + eps), the most a gradient entry is multiplied by;
- ``floor_share``: the share of input features whose sigma2 is below the floor eps (where the floor,
  not the data, sets the step);
- ``mean_drift`` / ``var_drift``: ||new - old|| / ||old|| of the running mean / variance since the
  previous log step (how fast the preconditioner moves).

Each quantity also gets its maximum over layers (``diag/<quantity>/max``).
"""

from __future__ import annotations

import torch
from torch import nn

from bnp.precondition.layers import candidates


class Diagnostics:
    def __init__(self, model: nn.Module, pre=None):
        self.pre = pre
        self.layers = {layer.name: layer.module for layer in pre._layers} if pre is not None else candidates(model)
        self._before: dict[str, torch.Tensor] | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def before_update(self) -> None:
        """Remember the weights before the optimizer step of a step that will be logged."""
        self._before = {name: m.weight.detach().clone() for name, m in self.layers.items()}

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """The ``diag/`` metrics after the step that ``before_update`` preceded."""
        out: dict[str, float] = {}
        if self._before is not None:
            for name, module in self.layers.items():
                old = self._before[name]
                out[f"diag/update_ratio/{name}"] = ((module.weight - old).norm() / old.norm().clamp_min(1e-30)).item()
            self._before = None
        if self.pre is not None and (self.pre.center or self.pre.scale):  # else the statistics act on nothing
            running = self.pre.running
            running.fold()
            if self.pre.scale:  # the divisor sigma2 + eps exists only when BNP scales
                d2 = running.denominator()
                floor = d2 - running.var
                for layer in self.pre._layers:
                    s = layer.span
                    out[f"diag/max_inv_d2/{layer.name}"] = d2[s].min().reciprocal().item()
                    out[f"diag/floor_share/{layer.name}"] = (running.var[s] < floor[s]).float().mean().item()
            if self._stats is not None:
                old_mean, old_var = self._stats
                for layer in self.pre._layers:
                    s = layer.span
                    out[f"diag/mean_drift/{layer.name}"] = _drift(running.mean[s], old_mean[s])
                    out[f"diag/var_drift/{layer.name}"] = _drift(running.var[s], old_var[s])
            self._stats = (running.mean.clone(), running.var.clone())
        for quantity in ("update_ratio", "max_inv_d2", "floor_share", "mean_drift", "var_drift"):
            values = [v for k, v in out.items() if k.startswith(f"diag/{quantity}/")]
            if values:
                out[f"diag/{quantity}/max"] = max(values)
        return out


def _drift(new: torch.Tensor, old: torch.Tensor) -> float:
    return ((new - old).norm() / old.norm().clamp_min(1e-30)).item()
