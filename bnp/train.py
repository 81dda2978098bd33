"""The runner: ``python -m bnp.train [overrides]`` (Hydra; configs in ``configs/``).

    python -m bnp.train model=cnn norm=bnp data=fashion_mnist train.batch_size=1 optim.lr=0.01
    python -m bnp.train -m norm=none,bn,bnp,ln train.batch_size=1,16,128     # a sweep

Each run directory gets: ``config.yaml`` (resolved), ``metrics.jsonl``, ``summary.json``,
``checkpoint.pt`` and W&B offline files. The directory is named after the command-line overrides,
so rerunning the same command resumes an interrupted run, skips a completed one (unless
``train.rerun=true``), and different settings never share a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bnp import BNP, Chain, Clip, OutputScale, Trust, distributed
from bnp.precondition.covariance import FullCovariance
from bnp.config import (ConfigError, NotApplicable, RunConfig, check_applicable, check_runnable, resolve_device,
                        validate)
from bnp.data import DataError, load
from bnp.log import FINISHED, OVERRIDES, RunLog, Unreadable, read_summary, write_json
from bnp.loop import CheckpointError, Interrupted, Trainer, first_line, plan
from bnp.models import build_model
from bnp.provenance import git_commit
from bnp.optim import build_optimizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def slug(overrides: str) -> str:
    """A directory name for a set of overrides: the overrides themselves when they are short and use
    only safe characters, else a readable prefix and a hash of the exact text, so that different
    overrides never share a directory (``data.root=a/b`` and ``data.root=a_b``)."""
    if not overrides:
        return "default"
    text = re.sub(r"[^A-Za-z0-9=,._+-]", "_", overrides)
    if text == overrides and len(text) <= 180:
        return text
    return f"{text[:140]}-{hashlib.sha1(overrides.encode()).hexdigest()[:10]}"


OmegaConf.register_new_resolver("bnp_slug", slug, replace=True)
# The typed schema under configs/config.yaml: every key exists with its default (no `+key=` needed
# for documented options) and Hydra type-checks overrides while composing.
ConfigStore.instance().store(name="run_schema", node=RunConfig)


class RunLocked(RuntimeError):
    """Another process holds the run directory."""


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One process per run directory (two identical sweep jobs would otherwise share files)."""
    with open(run_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"{run_dir} is being trained by another process (it holds {run_dir / '.lock'}); "
                            "wait for it, or stop it and run this command again to resume") from None
        yield


def _previous_summary(run_dir: Path) -> dict | None:
    """The summary a run directory already holds; a torn one counts as none (the run is unfinished
    and trains again, from its checkpoint), with a warning naming the file."""
    try:
        return read_summary(run_dir)
    except Unreadable as err:
        print(f"[bnp] warning: {err}; treating the run as unfinished", file=sys.stderr, flush=True)
        return None


def one_line(err: BaseException) -> str:
    """An exception as one line: the project's own errors speak for themselves, others get their type."""
    text = first_line(err)
    own = isinstance(err, (ConfigError, DataError, CheckpointError, RunLocked, Interrupted))
    return text if own else f"{type(err).__name__}: {text}"


def run(cfg: DictConfig | dict, run_dir: Path, *, in_sweep: bool = False, progress=None, capture=None,
        overrides: list[str] | None = None) -> dict:
    """Validate ``cfg``, train, and write the run directory; returns the summary. ``progress(trainer)``
    is called at every log point and evaluation; ``capture`` replaces the CUDA-graph capture of
    train.cuda_graph (bnp.graph.capture_cuda_graph), e.g. by a stand-in on CPU; ``overrides`` (the
    command line's) go to ``overrides.yaml``, which sweeps read to repeat a run at other lrs or seeds."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "summary.json"
    rank, world = distributed.setup()
    # nothing is written before the lock is held and the run is known to be unfinished: a second
    # command for this directory (a bad one, or one while it trains) never touches a finished run
    with run_lock(run_dir) if rank == 0 else contextlib.nullcontext():
        previous = _previous_summary(run_dir)
        try:
            config = validate(cfg)  # ConfigError before anything else happens
        except ConfigError as err:
            # recorded with the config as given, so reports count it, but only where no run was before:
            # a finished or interrupted run keeps its files
            if rank == 0 and not (run_dir / "config.yaml").exists():
                (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
                write_json(summary_path, {"run_dir": str(run_dir), "status": "failed", "reason": one_line(err)})
            raise
        if previous is not None and previous.get("status") in FINISHED and not config.train.rerun:
            print(f"[bnp] {run_dir}: already {previous['status']}; skipped (train.rerun=true redoes it)")
            return {**previous, "skipped": True}
        if config.train.rerun and rank == 0:
            for name in ("checkpoint.pt", "metrics.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "wandb", ignore_errors=True)
        if world > 1:
            torch.distributed.barrier()  # rank 0 has cleaned up before anyone looks for a checkpoint
        resolved = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
        if rank == 0:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
            if overrides is not None:
                (run_dir / OVERRIDES).write_text(OmegaConf.to_yaml(list(overrides)))
        base = {"run_dir": str(run_dir), "name": config.name, "git_commit": git_commit(),
                "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            check_applicable(config)
        except NotApplicable as err:
            if not in_sweep:
                raise
            summary = {**base, "status": "not_applicable", "reason": str(err)}
            if rank == 0:
                write_json(summary_path, summary)
            print(f"[bnp] {run_dir}: not applicable: {err}")
            return summary
        if progress is None and rank == 0 and (not in_sweep or config.train.verbose):
            progress = _printer(run_dir)  # a line per evaluation; sweeps show their own progress
        return _train(config, resolved, run_dir, base, progress, capture, rank, world)


def build_rules(config: RunConfig, model) -> BNP | FullCovariance | Chain | None:
    """The norm's preconditioner (norm=bnp: BNP, or FullCovariance with norm.covariance=full), then the
    gradient rules of ``grad`` in RULE_ORDER; one object, a Chain when there are several, or None."""
    n, g = config.norm, config.grad
    rules = []
    try:
        if n.kind == "bnp" and n.covariance == "full":
            rules.append(FullCovariance(model, momentum=n.momentum, eps=n.eps, refresh=n.refresh, skip=tuple(n.skip)))
        elif n.kind == "bnp":
            rules.append(BNP(model, momentum=n.momentum, eps=n.eps, warmup=n.warmup, center=n.center, scale=n.scale,
                             skip=tuple(n.skip), fast=n.fast, eps_relative=n.eps_relative,
                             average_start=n.average_start))
    except ValueError as err:  # e.g. a skip pattern that matches no layer
        raise ConfigError(f"norm: {err}") from None
    build = {"outscale": lambda: OutputScale(model, eps=g.outscale.eps, momentum=g.outscale.momentum),
             "agc": lambda: Clip(model, clip=g.agc.clip), "lars": lambda: Trust(model, trust=g.lars.trust)}
    rules += [build[name]() for name in g.rules()]
    return None if not rules else rules[0] if len(rules) == 1 else Chain(*rules)


def _train(config: RunConfig, resolved: dict, run_dir: Path, base: dict, progress, capture, rank: int,
           world: int) -> dict:
    summary = {**base, "status": "failed", "processes": world}
    log = trainer = None
    try:
        torch.set_flush_denormal(True)  # denormal floats (underflowing values) are 100x slower on CPUs
        device = distributed.local_device(resolve_device(config))
        summary["device"] = str(device)
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        torch.manual_seed(config.train.seed)
        data = load(config.data, device)
        check_runnable(config, device, world, train_samples=len(data.train_x), real_capture=capture is None)
        model = build_model(config.model, config.norm.kind, data.shape, data.classes).to(device)
        pre = build_rules(config, model)
        steps_per_epoch, total = plan(len(data.train_x), config.train)
        optimizer, scheduler = build_optimizer(config.optim, model, total, steps_per_epoch,
                                               graph_device=device if config.train.cuda_graph else None)
        log = RunLog(run_dir, resolved, config.logger, run_name=run_dir.name) if rank == 0 else distributed.NullLog()
        trainer = Trainer(model, data, optimizer, scheduler, pre, config.train, device, log,
                          run_dir / "checkpoint.pt", precision=config.train.precision, rank=rank, world=world,
                          capture=capture)
        if trainer.resume() and rank == 0:
            print(f"[bnp] {run_dir}: resuming at step {trainer.step}/{trainer.total_steps}")
        summary.update(trainer.run(progress=progress))
        summary["total_steps"] = trainer.total_steps
        if summary["status"] == "diverged" and rank == 0:
            print(f"[bnp] {run_dir.name}: DIVERGED at {summary['reason']}", flush=True)
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise
    except Exception as err:
        summary["reason"] = one_line(err)
        raise
    finally:
        if summary["status"] != "interrupted" and rank == 0:
            write_json(run_dir / "summary.json", summary)
        if log is not None:
            log.close(summary)
    if trainer is not None and trainer.stop_signal is not None:  # it came as the run ended: honoured all the same
        name = signal.Signals(trainer.stop_signal).name
        raise Interrupted(f"by {name} as the run ended ({summary['status']}, summary written)", trainer.stop_signal,
                          finished=True)
    return summary


def _printer(run_dir: Path):
    """Progress lines at evaluation points (long runs show where they are)."""
    def show(trainer: Trainer) -> None:
        if trainer.at_eval(trainer.step):
            loss = "n/a" if trainer.last_train_loss is None else f"{trainer.last_train_loss:.4g}"
            print(f"[bnp] {run_dir.name}: step {trainer.step}/{trainer.total_steps} train_loss {loss} "
                  f"val_acc {trainer.last_eval.get('val_acc', float('nan')):.4f} "
                  f"({trainer.train_seconds:.1f}s)", flush=True)
    return show


class RunResult(dict):
    """A run's summary as a sweep job's return value: a dict (the progress display reads its status)
    that is also a number for searching sweepers (sweeper=optuna): the best validation accuracy
    of a completed run, 0 for a diverged or failed one (the report's rule)."""

    def __float__(self) -> float:
        value = self.get("best_val_acc")
        return float(value) if self.get("status") == "completed" and isinstance(value, (int, float)) else 0.0


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> RunResult:
    """Returns the run's summary (the sweep's progress display counts its status; Optuna its
    validation accuracy)."""
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return RunResult(run(cfg, run_dir, in_sweep=in_sweep, overrides=list(hydra_cfg.overrides.task)))
    except KeyboardInterrupt as err:
        where = str(err) if isinstance(err, Interrupted) else "before training started"
        then = "" if getattr(err, "finished", False) else "; run the same command again to resume"
        print(f"[bnp] {run_dir}: interrupted {where}{then}", file=sys.stderr)
        if getattr(err, "signum", None) == signal.SIGTERM:
            # end as SIGTERM asked: a parallel sweep's worker must not outlive its killed launcher,
            # idle or taking the jobs still queued for it
            sys.stdout.flush(), sys.stderr.flush()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        sys.exit(130)
    except Exception as err:
        if os.environ.get("BNP_TRACEBACK"):
            raise
        if in_sweep:  # recorded; the other runs go on
            print(f"[bnp] {run_dir.name}: FAILED: {one_line(err)}", file=sys.stderr, flush=True)
            return RunResult(status="failed", reason=one_line(err))
        print(f"error: {one_line(err)}\n(set BNP_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)


def hydra_error_line(err: Exception) -> str:
    """One line for an error Hydra raises before any run starts: an unknown option of a config group
    (with the accepted ones), a value of the wrong type, a malformed override."""
    from hydra.errors import MissingConfigException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        accepted = sorted(o for o in (err.options or []) if o)
        return f"{group}={option}: no such option in configs/{group}/ (accepted: {', '.join(accepted)})"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    cause = err.__cause__
    if cause is not None and str(cause).strip():  # the first line says which override, the cause why
        return f"{lines[0].replace('Error merging override ', '').rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    return " ".join(lines)


def cli() -> None:
    """``python -m bnp.train``: Hydra's own errors end like the project's config errors, one line
    and exit 2 (HYDRA_FULL_ERROR=1 or BNP_TRACEBACK=1 show the traceback instead)."""
    from hydra.errors import HydraException

    full = os.environ.get("HYDRA_FULL_ERROR") == "1" or bool(os.environ.get("BNP_TRACEBACK"))
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing them
    try:
        main()
    except HydraException as err:
        if full:
            raise
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run the copy imported as `bnp.train`, not this `__main__` module: parallel launchers (joblib,
    # submitit) pickle the task function, and functions of `__main__` are pickled by value, globals
    # and all, which fails; importable ones are pickled by reference.
    from bnp.train import cli as importable_cli

    importable_cli()
