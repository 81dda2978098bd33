"""Where a run's metrics go: ``metrics.jsonl`` in the run directory (always; the source of truth
for reports) and Weights & Biases (offline by default, so no account or network is needed;
``wandb sync <run_dir>/wandb/offline-run-*`` uploads later)."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from bnp.config import LoggerConfig


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (temporary file, then rename), so a killed process never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_plain) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


FINISHED = ("completed", "diverged", "not_applicable")  # a run in one of these is skipped when run again
# a run's command-line overrides, written by the runner (Hydra's own .hydra/ copy is off: configs/config.yaml);
# sweeps read them to repeat a run at other lrs or seeds
OVERRIDES = "overrides.yaml"


class Unreadable(ValueError):
    """A run file that exists but cannot be parsed (cut mid-write by a full disk, edited by hand)."""


def read_summary(run_dir: Path) -> dict | None:
    """A run directory's summary.json: None if there is none; Unreadable (naming the file) if it is
    torn, so callers decide whether that run counts as unfinished (training) or damaged (reports)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Unreadable(f"{path}: not valid JSON ({err})") from None
    if not isinstance(summary, dict):
        raise Unreadable(f"{path}: expected a JSON object, got {type(summary).__name__}")
    return summary


def finished(run_dir: Path) -> bool:
    """Whether the run directory's summary says the run is done (bnp.train skips it; bnp.archive
    keeps it). A torn summary is not finished: the run is trained again and writes a new one."""
    try:
        summary = read_summary(run_dir)
    except Unreadable:
        return False
    return summary is not None and summary.get("status") in FINISHED


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _finite_or_none(row: dict) -> dict:
    # JSON has no NaN/inf: store them as null plus a string, readable by any JSON parser
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: made once, kept in ``wandb/run_id`` (train.rerun=true
    removes the folder, and with it the id)."""
    path = Path(run_dir) / "wandb" / "run_id"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(4) + "\n")
    return path.read_text().strip()


class RunLog:
    """Appends metric rows to ``metrics.jsonl`` and mirrors them to W&B."""

    def __init__(self, run_dir: Path, config: dict, logger: LoggerConfig, run_name: str):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = open(self.path, "a")
        self.wandb_run = None
        if logger.wandb != "disabled":
            os.environ["WANDB_MODE"] = logger.wandb  # the mode must be chosen before wandb starts
            if logger.wandb == "offline":
                os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # no network lookups at all
            os.environ.setdefault("WANDB_SILENT", "true")
            os.environ.setdefault("WANDB_INIT_TIMEOUT", "300")  # many parallel starts in a sweep
            import wandb

            self.wandb_run = wandb.init(
                project=logger.project, group=logger.group, tags=list(logger.tags), config=config,
                name=run_name, dir=str(run_dir), mode=logger.wandb, reinit="finish_previous",
                id=wandb_run_id(run_dir), resume="allow",  # a resumed run continues the same W&B run
            )

    def offset(self) -> int:
        self.file.flush()
        return self.file.tell()

    def truncate(self, offset: int) -> None:
        """Drop rows written after ``offset`` (resume from a checkpoint taken there; 0: start over).
        The file must hold ``offset`` bytes: truncating a shorter file would pad it with NUL bytes."""
        self.file.flush()
        size = self.path.stat().st_size
        if size < offset:
            raise ValueError(f"{self.path} holds {size} bytes, fewer than the {offset} to keep")
        self.file.truncate(offset)
        self.file.seek(offset)

    def replay(self) -> int:
        """Send every row of metrics.jsonl to W&B again (a resumed run: a killed session's W&B file
        may hold none of the rows before the checkpoint, and each offline session is synced on its
        own); returns the number of rows sent."""
        if self.wandb_run is None:
            return 0
        self.file.flush()
        rows = read_metrics(self.path)
        for row in rows:
            self._to_wandb(row)
        return len(rows)

    def initial_val_loss(self) -> float | None:
        """The untrained model's validation loss (the step-0 evaluation row), if metrics.jsonl has it."""
        self.file.flush()
        return next((row["val_loss"] for row in read_metrics(self.path)
                     if row.get("step") == 0 and row.get("val_loss") is not None), None)

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(_finite_or_none(row)) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self._to_wandb(row)

    def _to_wandb(self, row: dict) -> None:
        self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self, summary: dict | None) -> None:
        self.file.close()
        if self.wandb_run is not None:
            if summary:
                self.wandb_run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb_run.finish(exit_code=0 if summary and summary.get("status") != "failed" else 1)
            self.wandb_run = None
