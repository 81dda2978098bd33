"""BNP under torch.distributed: every rank folds the same pooled statistics (the package's only
torch.distributed code), so all replicas apply the same preconditioner."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import distributed as dist

if TYPE_CHECKING:
    from bnp.precondition.stats import RunningStats


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def fold(stats: RunningStats) -> None:
    """Fold the pending inputs of every rank with one all-reduce (two on a layer's first batch).

    Each rank sums, per feature, its inputs and their squared deviations from a center c that all
    ranks share (the running mean; on the first batch the global batch mean, found by an extra
    all-reduce); with the pooled mean m and s = mean((a - c)^2), the spec's squared deviation from
    the updated mean mu' = c + alpha (m - c) is s - alpha (2 - alpha) (m - c)^2. Ranks may hold
    different batch sizes: sums are weighted by sample counts.
    """
    layers, n_feat, n_layers = stats.layers, stats.mean.numel(), len(stats.layers)
    rows = [stats.rows(layer) if layer.pending is not None else None for layer in layers]
    center = stats.mean.clone()
    if any(layer.batches == 0 and r is not None for layer, r in zip(layers, rows)):
        sums = stats.mean.new_zeros(n_feat + n_layers)
        for i, (layer, r) in enumerate(zip(layers, rows)):
            if r is not None:
                sums[layer.span] = r[0].sum(r[1])
                sums[n_feat + i] = r[0].numel() // layer.features
        dist.all_reduce(sums)
        for i, layer in enumerate(layers):
            if layer.batches == 0 and sums[n_feat + i] > 0:
                center[layer.span] = sums[layer.span] / sums[n_feat + i]
    buf = stats.mean.new_zeros(2 * n_feat + 2 * n_layers)  # sums, squared deviations, counts, samples
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
        alpha = stats.alpha(int(buf[2 * n_feat + n_layers + i].item()), layer.batches)  # from the global batch
        if layer.batches == 0:
            layer.mean.copy_(m)
            layer.var.copy_(s - (m - c).square())
        else:
            layer.mean.lerp_(m, alpha)
            layer.var.lerp_(s - alpha * (2 - alpha) * (m - c).square(), alpha)
        layer.batches += 1
