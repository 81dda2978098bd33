"""bnp: Batch Normalization Preconditioning (Lange, Helfrich & Ye, JMLR 2022) and experiments."""

from bnp.precondition import BNP, FullCovariance, LayerStats

__all__ = ["BNP", "FullCovariance", "LayerStats"]
__version__ = "0.1.0"
