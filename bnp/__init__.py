"""bnp: Batch Normalization Preconditioning (Lange, Helfrich & Ye, JMLR 2022) and experiments."""

from bnp.precondition import BNP, FullCovariance, LayerStats
from bnp.rules import Chain, Clip, OutputScale, Trust

__all__ = ["BNP", "Chain", "Clip", "FullCovariance", "LayerStats", "OutputScale", "Trust"]
__version__ = "0.1.0"
