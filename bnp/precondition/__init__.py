"""The BNP preconditioner, one module per piece of state:

- ``layers``: which modules are tracked (skip patterns) and each layer's shapes and gradient state;
- ``stats``: the running statistics in flat buffers, pending inputs, the fold, derived values;
- ``sync``: pooling the statistics over ranks under torch.distributed (one all-reduce per step);
- ``reference``: the rule applied to .grad after backward (foreach ops across layers);
- ``fast``: the rule inside a Linear's backward (``BNP(fast=True)``);
- ``preconditioner``: ``BNP`` itself: options, wiring, ``step()``, state, CUDA-graph counters;
- ``covariance``: ``FullCovariance``, the full-matrix counterpart (what the diagonal leaves out).
"""

from bnp.precondition.covariance import FullCovariance
from bnp.precondition.preconditioner import BNP
from bnp.precondition.stats import LayerStats

__all__ = ["BNP", "FullCovariance", "LayerStats"]
