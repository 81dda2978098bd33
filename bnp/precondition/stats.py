"""Running input statistics of every tracked layer, in two flat buffers shared by all layers.

The forward only keeps a reference to each layer's input (autograd keeps it alive for the weight
gradient anyway); the fold then applies the spec's recurrences to every pending input with a few
flat operations instead of several per layer. A second forward before the fold, a forward without
autograd (nothing then guards the input against in-place edits), ``stats()`` and ``state_dict()``
fold first, so the statistics always equal the per-forward recurrences of docs/bnp-method.md.
Values derived from the statistics (1 / (sigma2 + eps), -mu / (sigma2 + eps), a fast backward's
a_hat) are made here and dropped here whenever the statistics change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bnp.precondition import sync
from bnp.precondition.layers import Layer

AUTO_WINDOW = 100  # momentum=None: min(0.1, batch / AUTO_WINDOW), >= ~100 samples in the statistics


class LayerStats(NamedTuple):
    """Running input statistics of one tracked layer (copies, float32 or float64)."""

    mean: torch.Tensor
    var: torch.Tensor
    batches: int  # training forward passes seen; 0 means not initialized yet


def stats_dtype(layers: list[Layer]) -> torch.dtype:
    """float32 statistics and arithmetic for every model dtype, float64 for float64 models."""
    return torch.float64 if any(layer.weight.dtype == torch.float64 for layer in layers) else torch.float32


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _mean_square(d: torch.Tensor, dims: tuple[int, ...], in_place: bool) -> torch.Tensor:
    squares = d.square_() if in_place else d.square()
    return squares[0] if squares.shape[0] == 1 and dims == (0,) else squares.mean(dims)


def pooled(x: torch.Tensor, spatial_dims: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A layer's input (or output) and the dims its per-feature statistics pool over: (rows,
    features) for a dense layer (``spatial_dims`` 0), (batch, channels, *spatial) for a convolution
    (an unbatched (channels, *spatial) input gains its batch dim)."""
    if spatial_dims == 0:
        return (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])), (0,)
    if x.dim() == spatial_dims + 1:
        x = x.unsqueeze(0)
    return x, (0, *range(2, x.dim()))


def momentum_for(momentum: float | None, samples: int, batches: int = 0, average_start: bool = False) -> float:
    """The weight of a batch of ``samples`` samples (rows of a dense input, or images) folded after
    ``batches`` earlier ones: ``momentum``, or with None min(0.1, samples / 100). With
    ``average_start`` it is at least 1 / (batches + 1): a cumulative average of the batches until the
    momentum takes over (BatchNorm's momentum=None for the first 1 / momentum batches), so early
    statistics are not biased towards the first."""
    alpha = momentum if momentum is not None else min(0.1, samples / AUTO_WINDOW)
    return max(alpha, 1.0 / (batches + 1)) if average_start else alpha


def recurrence(mean: torch.Tensor, var: torch.Tensor, rows: list[tuple[torch.Tensor, tuple[int, ...]]],
               alpha: float, first: bool, one_pass: bool, keep: bool = False) -> list[torch.Tensor] | None:
    """The spec's recurrences, in place, for inputs ``rows`` [(x, dims to pool)] whose features,
    in order, are those of ``mean`` and ``var`` (the one home of this rule: BNP's input statistics
    and OutputScale's output statistics; bnp.precondition.sync pools the same rule over ranks):

        mu <- mu + alpha (m_B - mu);  sigma2 <- sigma2 + alpha (mean_B((a - mu)^2) - sigma2)

    with the updated mu (the first batch sets mu = m_B, alpha = 1). Returns the deviations
    a - mu of every row if ``keep``. Two plain passes (mean, then the deviations), or one pass
    per input (torch.var_mean, Welford) with mean_B((a - mu)^2) = var_B + (m_B - mu)^2.
    """
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


class RunningStats:
    """mean and var of every tracked layer's input features, and each layer's pending input."""

    def __init__(self, layers: list[Layer], *, momentum: float | None, eps: float, center: bool, scale: bool,
                 sync: bool, moments: str, prepare_a_hat: bool, eps_relative: bool = False,
                 average_start: bool = False):
        self.layers, self.momentum, self.eps = layers, momentum, eps
        self.eps_relative, self.average_start = eps_relative, average_start
        self.center, self.scale, self.sync, self.moments = center, scale, sync, moments
        device = layers[0].weight.device
        self.dtype = stats_dtype(layers)
        features = sum(layer.features for layer in layers)
        self.mean = torch.zeros(features, dtype=self.dtype, device=device)
        self.var = torch.zeros(features, dtype=self.dtype, device=device)
        self.sizes = [layer.features for layer in layers]
        self.all_dense = all(layer.dense for layer in layers)
        # a fast backward of an all-dense model with biases takes every layer's a_hat from the fold
        self.prepare_a_hat = prepare_a_hat and self.all_dense and center and scale and all(
            layer.trained_bias is not None for layer in layers)
        self._derived = None  # (1 / (sigma2 + eps), -mu / (sigma2 + eps)) per layer, or None
        self.a_hat: tuple[torch.Tensor, ...] | None = None  # prepared by the fold, per layer
        self._ones: dict[int, torch.Tensor] = {}
        self._bind()

    # ------------------------------------------------------------------ buffers
    def _bind(self) -> None:
        for layer in self.layers:
            layer.mean, layer.var = self.mean[layer.span], self.var[layer.span]
            layer.mean_w = layer.mean.view(layer.shape_stats)

    def _changed(self) -> None:
        """The statistics changed: what was derived from them is stale."""
        self._derived = self.a_hat = None

    def _follow(self, device: torch.device) -> None:
        """Move the buffers to the device of the inputs and the dtype of the model (the model was
        moved, or cast with e.g. ``model.double()``)."""
        dtype = stats_dtype(self.layers)
        if device != self.mean.device or dtype != self.dtype:
            self.dtype = dtype
            self.mean, self.var = self.mean.to(device, dtype), self.var.to(device, dtype)
            self._ones.clear()
            self._bind()
            self._changed()

    def ones(self, n: int) -> torch.Tensor:
        ones = self._ones.get(n)
        if ones is None:
            ones = self._ones[n] = self.mean.new_ones(n)
        return ones

    def release(self) -> None:
        """Drop this step's temporaries (end of step())."""
        self._changed()

    # ------------------------------------------------------------------ derived values
    def denominator(self) -> torch.Tensor:
        """sigma2 + eps for every feature of every layer. With ``eps_relative`` the floor of a layer
        is eps x the mean of its features' sigma2 (1 while that mean is 0: no scaling before the
        layer's inputs vary), so it follows each layer's own variance scale."""
        if not self.eps_relative:
            return torch.add(self.var, self.eps)
        scales = torch.stack([v.mean() for v in self.var.split(self.sizes)])
        floors = torch.where(scales > 0, scales * self.eps, torch.ones_like(scales))
        return self.var + floors.repeat_interleave(self._sizes_on(floors.device), output_size=self.var.numel())

    def _sizes_on(self, device: torch.device) -> torch.Tensor:
        sizes = getattr(self, "_sizes_tensor", None)
        if sizes is None or sizes.device != device:
            sizes = self._sizes_tensor = torch.tensor(self.sizes, device=device)
        return sizes

    def derived(self) -> tuple[tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Per layer (in order), 1 / (sigma2 + eps) and -mu / (sigma2 + eps) (None where scale /
        center is off): computed for all layers at once, until the statistics change."""
        if self._derived is None:
            inv = shift = None
            if self.scale:
                inv = self.denominator().reciprocal_()
                if self.center:
                    shift = (self.mean * inv).neg_().split(self.sizes)
                inv = inv.split(self.sizes)
            self._derived = (inv, shift)
        return self._derived

    # ------------------------------------------------------------------ collecting inputs
    def collect(self, layer: Layer, x: torch.Tensor) -> None:
        """A training forward of ``layer`` saw ``x`` (detached): keep it for the next fold."""
        layer.saw_forward()
        if layer.pending is not None:
            self._fold_early(layer)
        layer.pending = x
        if not torch.is_grad_enabled():
            self._fold_early(layer)

    def _fold_early(self, layer: Layer) -> None:
        # under torch.distributed every fold is collective, over all layers at once
        if self.synced():
            self.fold()
        else:
            self._fold_one(layer)

    def synced(self) -> bool:
        return self.sync and sync.is_distributed()

    def alpha(self, samples: int, batches: int = 0) -> float:
        """The momentum for a batch of ``samples`` samples folded after ``batches`` earlier ones."""
        return momentum_for(self.momentum, samples, batches, self.average_start)

    def rows(self, layer: Layer) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The pending input in the statistics' dtype and the dims to pool: (rows, features) for
        Linear, (batch, channels, *spatial) for convolutions."""
        x = layer.pending
        return pooled(x if x.dtype == self.dtype else x.to(self.dtype), layer.spatial_dims)

    # ------------------------------------------------------------------ folding
    def fold(self, prepare: bool = False) -> None:
        """Fold every pending input into the statistics. With ``prepare`` (a fast backward, when
        ``prepare_a_hat``), also keep every layer's a_hat = (a - mu) / (sigma2 + eps), made from the
        deviations the fold computes anyway."""
        layers = [layer for layer in self.layers if layer.pending is not None]
        if not layers:
            return
        self._follow(layers[0].pending.device)
        self._changed()
        if self.synced():
            sync.fold(self)
            return
        rows = [self.rows(layer) for layer in layers]
        first = layers[0].batches == 0
        alpha = self.alpha(rows[0][0].shape[0], layers[0].batches)
        if (len(layers) < len(self.layers) or any((layer.batches == 0) != first for layer in layers)
                or any(self.alpha(x.shape[0], layer.batches) != alpha for (x, _), layer in zip(rows, layers))):
            for layer in layers:  # layers in different states: one at a time
                self._fold_one(layer)
            return
        if self.all_dense and len({x.shape[0] for x, _ in rows}) == 1:
            # every layer saw the same rows (an MLP): fold them side by side as one matrix
            rows = [(torch.cat([x for x, _ in rows], dim=1), (0,))]
        keep = prepare and self.prepare_a_hat and len(rows) == 1
        deviations = self._recurrences(self.mean, self.var, rows, alpha, first, keep=keep)
        if deviations is not None:
            self.a_hat = deviations[0].div_(self.denominator()).split(self.sizes, dim=1)
        for layer in layers:
            layer.pending = None
            layer.batches += 1

    def _fold_one(self, layer: Layer) -> None:
        self._follow(layer.pending.device)
        self._changed()
        row = self.rows(layer)
        layer.pending = None
        self._recurrences(layer.mean, layer.var, [row], self.alpha(row[0].shape[0], layer.batches), layer.batches == 0)
        layer.batches += 1

    def _moments_in_one_pass(self, x: torch.Tensor) -> bool:
        """Batch moments in one pass (torch.var_mean, Welford) on GPUs by default; on CPU two plain
        passes (mean, then squared deviation) were 5-12x faster (results/bench/moments-cpu.md)."""
        return x.is_cuda if self.moments == "auto" else self.moments == "one_pass"

    def _recurrences(self, mean: torch.Tensor, var: torch.Tensor, rows: list[tuple[torch.Tensor, tuple[int, ...]]],
                     alpha: float, first: bool, keep: bool = False) -> list[torch.Tensor] | None:
        return recurrence(mean, var, rows, alpha, first, self._moments_in_one_pass(rows[0][0]), keep)

    # ------------------------------------------------------------------ CUDA graph replays
    def count_replays(self, steps: int) -> None:
        """Each replay of a captured step folded one batch into every layer."""
        for layer in self.layers:
            layer.batches += steps

    # ------------------------------------------------------------------ state
    def of(self, layer: Layer) -> LayerStats:
        self.fold()
        return LayerStats(layer.mean.clone(), layer.var.clone(), layer.batches)

    def state_dict(self) -> dict[str, dict]:
        self.fold()
        return {layer.name: {"mean": layer.mean.clone(), "var": layer.var.clone(), "batches": layer.batches}
                for layer in self.layers}

    def load_state_dict(self, saved: dict[str, dict]) -> None:
        self.fold()  # inputs seen before loading belong to the replaced history
        for layer in self.layers:
            entry = saved[layer.name]
            if entry["mean"].shape != layer.mean.shape:
                raise ValueError(
                    f"BNP.load_state_dict: layer {layer.name!r} has {layer.features} input features, "
                    f"the saved state has {entry['mean'].numel()}"
                )
            layer.mean.copy_(entry["mean"])
            layer.var.copy_(entry["var"])
            layer.batches = int(entry["batches"])
        self._changed()
