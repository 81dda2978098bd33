"""Which code made a sweep's runs: every multirun invocation of a sweep directory is recorded.
(Also the project's one git-commit helper and the relative paths provenance is written with.)

A Hydra callback (configs/config.yaml, ``hydra.callbacks.invocations``) appends one line to
``<sweep dir>/invocations.jsonl`` when a multirun starts (its command, the git commit, the time)
and one when it ends; a sweep resumed or extended later adds its own lines, so the report can list
every command and commit behind the runs, not only the last (Hydra's multirun.yaml keeps only that).
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

INVOCATIONS_FILE = "invocations.jsonl"
ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it; None outside git."""
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return None


# An absolute path into another checkout's outputs/ or results/ (a run made from a second work tree
# whose outputs/ links here) is cut at that folder too; other absolute paths stay as they are.
_OTHER_CHECKOUT = re.compile(r"""(?<![\w.~-])/(?:[^\s'"=:/]+/)+?(?=(?:outputs|results)(?:/|\s|$|['"]))""")


def relative(text: str) -> str:
    """``text`` (a command) with this checkout's absolute paths made relative to it: provenance that
    reads the same on every machine."""
    return _OTHER_CHECKOUT.sub("", text.replace(f"{ROOT}/", "").replace(str(ROOT), "."))


def _append(sweep_dir: Path, record: dict) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / INVOCATIONS_FILE, "a") as f:  # one short append per line
        f.write(json.dumps(record) + "\n")


class SweepLog(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._id = uuid.uuid4().hex[:12]
        self._dir = Path(config.hydra.sweep.dir)
        task = list(config.hydra.overrides.task)
        _append(self._dir, {"id": self._id, "command": "python -m bnp.train -m " + shlex.join(task),
                            "commit": git_commit() or "unknown", "started": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _append(self._dir, {"id": self._id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_invocations(sweep_dir: Path) -> list[dict]:
    """The recorded invocations, oldest first, each with ``finished`` (None: interrupted or running)."""
    path = Path(sweep_dir) / INVOCATIONS_FILE
    if not path.exists():
        return []
    started: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a killed process: skip it, keep the rest
            continue
        if "command" in record:
            started[record["id"]] = {**record, "finished": None}
        elif record.get("id") in started:
            started[record["id"]]["finished"] = record["finished"]
    return list(started.values())
