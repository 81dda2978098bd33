"""train.cuda_graph: after a short eager start, each training step is one replay of a captured step.

The captured step takes its batch at a device-side position in the epoch buffers, which the loop
refills in place each epoch, so a replay needs no host work; BNP's host-side counters follow the
replays through ``BNP.recording()`` / ``BNP.replayed()``. Everything else (evaluation, logging,
checkpoints) runs between replays as in eager mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bnp.loop import Trainer

EAGER_STEPS = 3  # eager steps before a capture (optimizer state, BNP statistics), plus BNP's warmup


def capture_cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Capture ``step`` as a CUDA graph (its Python runs once, now; its kernels on each replay)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


class GraphMode:
    """The graph-mode parts of a Trainer: the side stream of the eager start, the device-side batch
    position, the capture and the replayed step. ``capture`` turns a step function into a replay
    function: ``capture_cuda_graph`` on GPUs, a stand-in in the CPU tests."""

    def __init__(self, trainer: Trainer, capture: Callable | None = None):
        self.trainer, self.capture = trainer, capture or capture_cuda_graph
        device = trainer.device
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(trainer.local_batch, device=device)
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.replay: Callable[[], None] | None = None
        self.capture_at: int | None = None

    def start(self) -> None:
        """Where the eager start ends: a few steps from here, and after BNP's warmup."""
        pre, step = self.trainer.pre, self.trainer.step
        self.capture_at = step + EAGER_STEPS + (0 if pre is None else getattr(pre, "warmup_left", 0))

    def eager(self, update: Callable[[], None]) -> None:
        """An eager step before the capture: on a side stream, as CUDA graphs require."""
        if self.side is None:
            update()
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            update()
        torch.cuda.current_stream().wait_stream(self.side)

    def after_step(self) -> None:
        t = self.trainer
        if self.replay is None and self.capture_at <= t.step < t.total_steps:
            self._seat(t.step)
            with t.pre.recording() if t.pre is not None else contextlib.nullcontext():
                self.replay = self.capture(self._captured_step)

    def step(self) -> None:
        """One replayed training step."""
        t = self.trainer
        if t.step % t.steps_per_epoch == 0:
            self._seat(t.step)  # a new epoch: reshuffled buffers, position back to the start
        self.replay()
        if t.pre is not None:
            t.pre.replayed()

    def _captured_step(self) -> None:
        """The step that is captured: its batch comes from the device-side position."""
        t = self.trainer
        x_all, y_all = t.batches.buffers()
        index = self.position + self.offsets
        self.position.add_(t.batch_size)
        t.update(x_all.index_select(0, index), y_all.index_select(0, index), set_to_none=False)

    def _seat(self, step: int) -> None:
        """Point the captured step at ``step``'s batch (refilling the epoch buffers if it starts one)."""
        _, _, start = self.trainer.batches.start(step)
        self.position.fill_(start)
