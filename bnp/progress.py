"""How far a sweep is: runs done / total by status, elapsed time and an estimate of the rest.

A Hydra callback (configs/config.yaml, ``hydra.callbacks.progress``): every finished job appends
its status to ``<sweep dir>/.progress.jsonl`` (from whichever process ran it: the launcher's own,
a joblib worker, a submitit job), tagged with the multirun that launched it (several may share a
sweep directory at once, as the bracketing extensions do), and a thread of the launching process
reads its own records from that file and shows
a live bar in a terminal or, when the output is a file, a plain line every ``interval`` seconds
and one at the end. Runs print their own per-step lines only outside sweeps (``train.verbose=true``
brings them back); a run that diverges or fails prints one line with the reason.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

STATUSES = ("completed", "diverged", "failed", "not_applicable")
PROGRESS_FILE = ".progress.jsonl"
TOKEN_ENV = "BNP_MULTIRUN_TOKEN"  # also passed through the environment, for launchers that rebuild callbacks


def sweep_size(params: dict[str, str], task: list[str]) -> int | None:
    """How many jobs a basic sweep of ``params`` (hydra.sweeper.params) and the command line's
    overrides makes (the command line wins for a key given in both); None if a sweep cannot be
    counted ahead (glob choices)."""
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(task))
    sizes: dict[str, int] = {}
    for override in overrides:
        if override.is_sweep_override():
            try:
                sizes[override.key_or_group] = len(list(override.sweep_string_iterator()))
            except Exception:  # a glob, or a sweep the basic sweeper expands itself
                return None
        else:
            sizes[override.key_or_group] = 1
    return math.prod(sizes.values())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def describe(counts: Counter, total: int | None, elapsed: float, fresh: int) -> str:
    """'37/180 runs done (35 completed, 2 diverged, 0 failed, 0 not applicable), 3m12s, about 12m04s left'.
    ``fresh``: runs this invocation trained (not skipped as already done), which set the estimate."""
    done = sum(counts.values())
    statuses = ", ".join(f"{counts.get(s, 0)} {s.replace('_', ' ')}" for s in STATUSES)
    line = f"{done}/{total if total is not None else '?'} runs done ({statuses}), {_duration(elapsed)}"
    if total is not None and fresh and done < total:
        line += f", about {_duration(elapsed / fresh * (total - done))} left"
    return line


class SweepProgress(Callback):
    """The Hydra callback: records each job's end; shows the sweep's progress while it runs."""

    def __init__(self, interval: float = 30.0, token: str | None = None):
        self.interval = interval
        self._token = token  # this multirun's tag on its jobs' records
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset, self._counts, self._fresh = 0, Counter(), 0  # how far _read got, and what it found
        self._identity = None  # (inode, device) of the file _read is reading

    def __getstate__(self) -> dict:  # launchers pickle the callbacks into their jobs: no thread, no lock
        return {"interval": self.interval, "token": self._token}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    # ---- in the launching process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._file = sweep_dir / PROGRESS_FILE
        self._file.touch()
        self._token = os.environ[TOKEN_ENV] = uuid.uuid4().hex
        params = dict(config.hydra.sweeper.get("params") or {})
        trials = config.hydra.sweeper.get("n_trials")  # a searching sweeper (optuna): its trial budget
        self._total = trials if trials is not None else sweep_size({k: str(v) for k, v in params.items()},
                                                                   list(config.hydra.overrides.task))
        self._name = config.get("name", sweep_dir.name)
        self._start = time.time()
        self._thread = threading.Thread(target=self._show, daemon=True)
        self._thread.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def _read(self) -> tuple[Counter, int]:
        """This multirun's counts so far. Reads only what was appended since the last call (the file
        is shared and only grows), and only whole lines (a job may be mid-append); starts over if
        the file was replaced or truncated, and skips a line it cannot parse."""
        try:
            stat = self._file.stat()
        except FileNotFoundError:  # removed under a running sweep: count what comes from now on
            stat = None
        if stat is None or (stat.st_ino, stat.st_dev) != self._identity or stat.st_size < self._offset:
            self._offset, self._counts, self._fresh = 0, Counter(), 0
            self._identity = None if stat is None else (stat.st_ino, stat.st_dev)
            if stat is None:
                return self._counts, self._fresh
        with open(self._file, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(whole)
        for line in whole.decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a torn line (appends need not be atomic on a network file system)
                continue
            if not isinstance(record, dict) or record.get("token") != self._token:  # another multirun's job
                continue
            self._counts[record.get("status", "failed")] += 1
            self._fresh += not record.get("skipped", False)
        return self._counts, self._fresh

    def _show(self) -> None:
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self._total, desc=f"sweep {self._name}", unit="run", dynamic_ncols=True)
        last_line = 0.0
        while True:
            stopping = self._stop.wait(1.0 if bar is not None else min(self.interval, 5.0))
            counts, fresh = self._read()
            elapsed = time.time() - self._start
            if bar is not None:
                bar.n = sum(counts.values())
                bar.set_postfix_str(", ".join(f"{counts.get(s, 0)} {s.replace('_', ' ')}" for s in STATUSES))
                bar.refresh()
            elif stopping or time.time() - last_line >= self.interval:
                print(f"[sweep {self._name}] {describe(counts, self._total, elapsed, fresh)}", flush=True)
                last_line = time.time()
            if stopping:
                if bar is not None:
                    bar.close()
                    print(f"[sweep {self._name}] {describe(counts, self._total, elapsed, fresh)}", file=sys.stderr)
                return

    # ---- in the process that ran the job
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().mode.name != "MULTIRUN":
            return
        summary = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        record = {"status": (summary or {}).get("status", "failed"), "skipped": bool((summary or {}).get("skipped")),
                  "token": self._token or os.environ.get(TOKEN_ENV)}
        with open(Path(HydraConfig.get().sweep.dir) / PROGRESS_FILE, "a") as f:  # one short append: atomic
            f.write(json.dumps(record) + "\n")
