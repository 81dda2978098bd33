"""Model zoo: every model takes the normalization kind and builds its own norm layers."""

from bnp.models.cnn import CNN
from bnp.models.mlp import MLP
from bnp.models.norm import NORMS, make_norm

__all__ = ["CNN", "MLP", "NORMS", "make_norm"]
