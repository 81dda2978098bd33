"""Counting the compute kernels of a piece of PyTorch code.

Under a whole-step CUDA graph a training step costs about its kernel count (launch overhead is
gone, and at small batch sizes each kernel is tiny), so the count is a device-free measure of
what a method adds to a step.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view  # views and detach only make new tensor metadata
        return func(*args, **(kwargs or {}))


def count_kernels(fn: Callable[[], object]) -> int:
    """Run ``fn()`` once and return the number of aten operators it dispatched, views excluded."""
    with _Counter() as counter:
        fn()
    return counter.count
