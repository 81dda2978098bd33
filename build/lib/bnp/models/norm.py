"""Normalization-layer factory shared by all models.

``none`` and ``bnp`` build no normalization layer (BNP changes the update, not the model).
``ln`` is LayerNorm over the features of a dense layer and GroupNorm(1, C) for conv layers
(normalizes each sample over all channels and positions, the usual conv analogue of LayerNorm).
``gn`` is GroupNorm with up to 32 groups (the largest divisor of C that is <= 32).
"""

from torch import nn

NORMS = ("none", "bn", "bnp", "ln", "gn")


def _groups(channels: int, most: int = 32) -> int:
    return max(g for g in range(1, min(most, channels) + 1) if channels % g == 0)


def make_norm(norm: str, features: int, conv: bool) -> list[nn.Module]:
    """The norm layers placed after a dense (conv=False) or conv (conv=True) layer of ``features``:
    an empty list for ``none`` / ``bnp`` (no Identity modules, which would cost a call each step)."""
    if norm in ("none", "bnp"):
        return []
    if norm == "bn":
        return [nn.BatchNorm2d(features) if conv else nn.BatchNorm1d(features)]
    if norm == "ln":
        return [nn.GroupNorm(1, features) if conv else nn.LayerNorm(features)]
    if norm == "gn":
        return [nn.GroupNorm(_groups(features), features)]
    raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
