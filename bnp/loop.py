"""The training loop: plain PyTorch, testable without Hydra.

One loop for every model, normalization and batch size. The dataset lives on the device; each
epoch is one shuffled copy sliced into batches (the last incomplete batch is dropped). The host
syncs only at log and eval points. Checkpoints are written at every evaluation and on SIGINT /
SIGTERM (at a step boundary); resuming restores everything, including the position in the epoch,
the metric accumulators and the random generators, so a resumed CPU run ends with exactly the
metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from bnp import BNP, Chain
from bnp.config import TrainConfig
from bnp.data import Data, EpochBatches
from bnp import distributed
from bnp.analysis.diagnostics import Diagnostics
from bnp.graph import GraphMode
from bnp.log import RunLog


def plan(train_samples: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) for a training set of ``train_samples`` (incomplete last
    batches are dropped; ``cfg.steps`` overrides ``cfg.epochs``)."""
    steps_per_epoch = train_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={cfg.batch_size} is larger than the training set ({train_samples} samples)")
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    return steps_per_epoch, total


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal after saving a resumable checkpoint (``finished``: the signal
    came as the run ended, whose summary is written)."""

    def __init__(self, message: str, signum: int = signal.SIGINT, finished: bool = False):
        super().__init__(message)
        self.signum, self.finished = signum, finished

    def __reduce__(self):  # picklable with its fields (a job's exception may cross processes)
        return type(self), (str(self), self.signum, self.finished)


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (truncated, corrupt, or from another configuration)."""


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (BN uses running statistics, BNP hooks idle)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        with autocast():
            logits = model(x[i : i + batch_size])
        loss += F.cross_entropy(logits.float(), y[i : i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum()
    model.train(was_training)
    return loss.item() / len(x), correct.item() / len(x)


def _bnp_in(pre):
    """The BNP among the gradient rules (the diagnostics read its statistics), or None."""
    return pre if isinstance(pre, BNP) else pre.find(BNP) if isinstance(pre, Chain) else None


class Trainer:
    # the progress a checkpoint keeps: host-side values, and device-side sums (saved as numbers)
    PROGRESS = ("step", "train_seconds", "loss_count", "best_val_acc", "best_step", "test_at_best",
                "last_train_loss", "last_eval", "initial_loss")
    SUMS = ("loss_sum", "seen", "correct")

    def __init__(self, model, data: Data, optimizer, scheduler, pre, cfg: TrainConfig,
                 device: torch.device, log: RunLog, checkpoint: Path, precision: str = "fp32",
                 rank: int = 0, world: int = 1, capture: Callable | None = None):
        self.model, self.data, self.optimizer, self.scheduler, self.pre = model, data, optimizer, scheduler, pre
        self.cfg, self.device, self.log, self.checkpoint = cfg, device, log, Path(checkpoint)
        self.rank, self.world = rank, world
        # the module that trains: DDP averages gradients across processes; state comes from `model`
        self.net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.batch_size = cfg.batch_size  # global; each process takes batch_size / world of it
        self.local_batch = cfg.batch_size // world
        self.steps_per_epoch, self.total_steps = plan(len(data.train_x), cfg)
        self.eval_every = cfg.eval_every or max(1, self.steps_per_epoch // cfg.evals_per_epoch)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # CUDA graphs need autocast's cast cache off (a cached cast would outlive the capture)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=not cfg.cuda_graph)
                         ) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.batches = EpochBatches(data, cfg.seed, self.steps_per_epoch, self.batch_size, rank, world, device)
        # progress (all of it goes into the checkpoint)
        self.step = 0
        self.train_seconds = 0.0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # since the last log row
        self.loss_count = 0
        self.seen = torch.zeros((), dtype=torch.int64, device=device)  # prequential: samples predicted
        self.correct = torch.zeros((), dtype=torch.int64, device=device)  # ... and predicted right
        self.best_val_acc, self.best_step, self.test_at_best = -1.0, 0, None
        self.last_train_loss, self.last_eval = None, {}
        self.initial_loss = None  # the untrained model's validation loss: the divergence rule's scale
        self.status, self.reason = "running", None  # reason: why a run diverged
        self.stop_signal = None
        # train.cuda_graph (what it cannot do is refused by bnp.config.check_cuda_graph); ``capture``
        # replaces the CUDA capture (the CPU tests pass a stand-in)
        self.graph = GraphMode(self, capture) if cfg.cuda_graph else None
        # BNP's own instruments read its statistics; with another rule only the update ratios are measured
        self.diagnostics = Diagnostics(model, _bnp_in(pre)) if cfg.diagnostics else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "pre": self.pre.state_dict() if self.pre else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "aug_gen": self.batches.aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "progress": {**{name: getattr(self, name) for name in self.PROGRESS},
                         **{name: getattr(self, name).item() for name in self.SUMS}},
            "metrics_offset": self.log.offset(),
        }

    def save(self) -> None:
        if self.rank != 0:
            return
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.checkpoint)  # atomic: a kill never leaves a torn checkpoint

    def resume(self) -> bool:
        """Load the checkpoint if there is one; True if training continues from it. Without one (none
        written yet, or metrics.jsonl lost rows it counts on) the run starts over, its metrics too.
        Rank 0 decides for all ranks: it alone reads the metrics."""
        state = None
        if self.checkpoint.exists():
            try:
                state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
                offset = state["metrics_offset"]
            except Exception as err:
                raise self._unusable(err) from err
            try:
                self.log.truncate(offset)
            except ValueError as err:  # the rows before the checkpoint are gone: no run could end with them
                print(f"[bnp] warning: {err}, which {self.checkpoint.name} continues; starting the run over",
                      file=sys.stderr, flush=True)
                state = None
        if not distributed.from_rank0(state is not None):
            self.log.truncate(0)  # rows of an attempt killed before its first checkpoint
            return False
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.pre is not None:
                self.pre.load_state_dict(state["pre"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
            if "aug_gen" in state:  # the augmentation and torch streams go on where they stopped
                self.batches.aug_gen.set_state(state["aug_gen"].cpu())
                torch.set_rng_state(state["torch_rng"].cpu())
            p = state["progress"]
            for name in self.PROGRESS:
                if name in p:  # checkpoints from before the divergence rule have no initial_loss
                    setattr(self, name, p[name])
            for name in self.SUMS:
                getattr(self, name).fill_(p[name])
        except Exception as err:
            raise self._unusable(err) from err
        if self.initial_loss is None and self.step > 0:  # such an old checkpoint: the step-0 row has it
            self.initial_loss = distributed.from_rank0(self.log.initial_val_loss())
            if self.initial_loss is None:
                print(f"[bnp] warning: {self.checkpoint} and metrics.jsonl lack the untrained model's loss; "
                      "the divergence rule checks for NaN/inf only in this run", file=sys.stderr, flush=True)
        self.log.replay()  # W&B gets the rows before the checkpoint again (the killed session may lack them)
        return True

    def _unusable(self, err: Exception) -> CheckpointError:
        return CheckpointError(
            f"{self.checkpoint}: cannot resume from it ({type(err).__name__}: {first_line(err)[:200]}); it is "
            f"truncated, corrupt or from another configuration. Delete it to start this run over (rm "
            f"{self.checkpoint}), or redo the run with train.rerun=true")

    # ------------------------------------------------------------------ training
    def train_step(self) -> None:
        """One training step: eager, or a replay of the captured step in graph mode."""
        if self.diagnostics is not None and self._logs(self.step + 1):
            self.diagnostics.before_update()
        if self.graph is not None and self.graph.replay is not None:
            self.graph.step()
        elif self.graph is not None:
            self.graph.eager(lambda: self.update(*self.batches(self.step)))
        else:
            self.update(*self.batches(self.step))
        self.loss_count += 1
        self.scheduler.step()

    def update(self, x: torch.Tensor, y: torch.Tensor, set_to_none: bool = True) -> None:
        """The device work of one step: forward, metrics, backward, BNP, optimizer."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        with self.autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
        # prequential (predict, then train): these predictions come before this step's update
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)
        self.loss_sum += loss.detach()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.pre is not None:
            self.pre.step()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _log_train(self, samples_per_s: float) -> str | None:
        """Write a train row; returns why the run diverged, or None while it is healthy."""
        loss_sum, correct, seen = distributed.summed(self.loss_sum, self.correct, self.seen)  # over processes
        loss = loss_sum.item() / max(1, self.loss_count * self.world)
        self.loss_sum.zero_()
        self.loss_count = 0
        self.last_train_loss = loss
        row = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "train_loss": loss,
               "lr": float(self.optimizer.param_groups[0]["lr"]), "samples_per_s": samples_per_s * self.world,
               "prequential_acc": correct.item() / max(1, seen.item())}
        if self.diagnostics is not None:
            row.update(self.diagnostics.measure())
        self.log.log(row)
        return self._divergence(loss)

    def _divergence(self, loss: float) -> str | None:
        """The divergence rule: a non-finite loss or parameter, or a blow-up of the train loss (its
        mean over the log interval) past train.diverge_factor x the untrained model's loss."""
        if not math.isfinite(loss):
            return f"train loss is {loss}"
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        if not finite.item():
            return self._nonfinite("parameters", {name: p for name, p in self.model.named_parameters()})
        factor, start = self.cfg.diverge_factor, self.initial_loss
        if factor is not None and start is not None and loss > factor * start:
            return (f"train loss {loss:.3g} > {factor:g} x the untrained model's validation loss {start:.3g} "
                    f"(train.diverge_factor)")
        return None

    @staticmethod
    def _nonfinite(kind: str, tensors: dict[str, torch.Tensor | None]) -> str | None:
        """``non-finite <kind>: <the first three names>`` for those of ``tensors`` with a NaN/inf, else None."""
        bad = [name for name, t in tensors.items() if t is not None and not t.detach().isfinite().all()]
        return f"non-finite {kind}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else None

    def _evaluate(self) -> str | None:
        d, bs = self.data, self.cfg.eval_batch_size
        val_loss, val_acc = evaluate(self.model, d.val_x, d.val_y, bs, self.autocast)
        test_loss, test_acc = evaluate(self.model, d.test_x, d.test_y, bs, self.autocast)
        self.last_eval = {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc}
        self.log.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **self.last_eval})
        if self.step == 0:
            self.initial_loss = val_loss
        if val_acc > self.best_val_acc:
            self.best_val_acc, self.best_step, self.test_at_best = val_acc, self.step, test_acc
        return None if math.isfinite(val_loss) else f"validation loss is {val_loss}"

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self, progress=None) -> dict:
        """Train to ``total_steps`` (from wherever the state is); returns the summary fields."""
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # only the main thread may install handlers
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.model.train()
        try:
            self._run(progress)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return self.summary()

    def _run(self, progress) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        if self.step == 0 and self.initial_loss is None:  # not resumed from the step-0 checkpoint
            self._evaluate()  # the untrained model, step 0: the divergence rule's scale
            self.save()  # so a run stopped before its first evaluation resumes with it
            if progress is not None:
                progress(self)
        tick, samples = time.perf_counter(), 0
        if self.graph is not None:
            self.graph.start()
        while self.step < self.total_steps:
            try:
                self.train_step()
            except (RuntimeError, ValueError) as err:  # torch.linalg.LinAlgError is a RuntimeError
                # an optimizer that factors its statistics (Shampoo's SVD) can raise on a blow-up before the
                # next train row sees it: by the divergence rule (the loss so far in this log interval, the
                # parameters, and here the gradients too) that run diverged, it did not fail
                why = self._divergence(self.loss_sum.item() / (self.loss_count + 1)) or self._nonfinite("gradients", {name: p.grad for name, p in self.model.named_parameters()})
                if why is None:
                    raise
                self.status = "diverged"
                self.reason = f"step {self.step + 1}: {why}; the step raised {type(err).__name__}: " \
                              f"{str(err).splitlines()[0][:120]}"
                return
            self.step += 1
            samples += self.local_batch
            if self.graph is not None:
                self.graph.after_step()
            at_eval = self.at_eval(self.step)
            at_log = self._logs(self.step)
            if at_log or at_eval or self.stop_signal is not None:
                sync()
                now = time.perf_counter()
                self.train_seconds += now - tick
                reason = self._log_train(samples / max(now - tick, 1e-9)) if at_log else None
                if reason is None and at_eval:
                    reason = self._evaluate()
                if reason is not None:
                    self.status, self.reason = "diverged", f"step {self.step}: {reason}"
                    return
                if at_eval or self.stop_signal is not None:
                    self.save()
                if progress is not None:
                    progress(self)
                if self.stop_signal is not None:
                    name = signal.Signals(self.stop_signal).name
                    raise Interrupted(f"by {name} at step {self.step}/{self.total_steps}, checkpoint saved",
                                      self.stop_signal)
                tick, samples = time.perf_counter(), 0
        self.status = "completed"

    def _logs(self, step: int) -> bool:
        """Whether ``step`` ends with a train row (every evaluation gets a fresh one)."""
        return self.at_eval(step) or step % self.cfg.log_every == 0

    def at_eval(self, step: int) -> bool:
        """Whether ``step`` ends with an evaluation (and a checkpoint)."""
        return step % self.eval_every == 0 or step == self.total_steps

    def summary(self) -> dict:
        correct, seen = (t.item() for t in distributed.summed(self.correct, self.seen))
        return {
            "status": self.status,
            **({"reason": self.reason} if self.reason else {}),
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "final_train_loss": self.last_train_loss,
            **{f"final_{k}": v for k, v in self.last_eval.items()},
            "best_val_acc": self.best_val_acc if self.best_val_acc >= 0 else None,
            "best_step": self.best_step,
            "test_acc_at_best_val": self.test_at_best,
            "prequential_acc": correct / seen if seen else None,
            "samples_seen": seen,
            "wall_time_s": self.train_seconds,
            "samples_per_s": seen / self.train_seconds if self.train_seconds > 0 else None,
        }
