"""A sweep's finished runs in one file, so a sweep can be committed and finished on another machine.

    python -m bnp.archive save outputs/sweeps/NAME results/NAME/sweep.tar.gz
    python -m bnp.archive restore results/NAME/sweep.tar.gz outputs/sweeps/NAME

``save`` packs what the report and the resume check read: the sweep's records (invocations.jsonl,
bracket.json, multirun.yaml) and, of every run that has finished (completed, diverged or not
applicable), its config.yaml, overrides.yaml, summary.json, metrics.jsonl (and an older run's
.hydra/). Checkpoints, W&B files, failed and unfinished runs stay behind: those runs start again
wherever the sweep is resumed.
``restore`` unpacks into a sweep directory, after which rerunning the sweep's command (or its
experiment file) skips the finished runs and the report covers them all.

Neither ever throws a finished run away. Runs are merged whole, never file by file: a finished
copy beats an unfinished or failed one (restore replaces such a local copy; a run being trained
is left alone), and of two finished copies the one that started last wins in the archive, while
restore keeps a finished local copy. invocations.jsonl is the union of both (the older lines
first) and bracket.json keeps each setting's larger extension counts. An archive whose content
would not change is not rewritten.

The experiment files (bnp.sweep.run_experiment) save RESULTS/sweep.tar.gz whenever runs finish
and with each report, and restore it first with ``--restore``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from bnp.log import OVERRIDES, Unreadable, finished, read_summary
from bnp.runs import find_runs

INVOCATIONS, BRACKET, MULTIRUN = "invocations.jsonl", "bracket.json", "multirun.yaml"
RUN_FILES = ("config.yaml", OVERRIDES, "summary.json", "metrics.jsonl")

Files = dict[str, bytes]  # path inside the sweep directory -> content


def finished_runs(sweep_dir: Path) -> list[Path]:
    return [d for d in find_runs(sweep_dir) if finished(d)]


def damaged_runs(sweep_dir: Path) -> list[str]:
    """Why each run with a torn summary.json is left out of an archive (it is not finished)."""
    damaged = []
    for run_dir in find_runs(sweep_dir):
        try:
            read_summary(run_dir)
        except Unreadable as err:
            damaged.append(str(err))
    return damaged


def _run_of(name: str) -> str:
    """The run directory an archived file belongs to (its folder; .hydra/'s parent)."""
    parent = PurePosixPath(name).parent
    return (parent.parent if parent.name == ".hydra" else parent).as_posix()


def _runs(files: Files) -> dict[str, Files]:
    """The finished runs among ``files``: run directory -> its files."""
    runs = {_run_of(n): {} for n in files if n.endswith("summary.json") and _run_of(n) != "."}
    for name, data in files.items():
        if _run_of(name) in runs:
            runs[_run_of(name)][name] = data
    return runs


def _started(run: Files) -> str:
    summary = next(data for name, data in run.items() if name.endswith("summary.json"))
    return json.loads(summary).get("started") or ""


def _lines(*texts: bytes) -> bytes:
    """The union of jsonl files' complete lines, in order of first appearance."""
    seen = {}
    for text in texts:
        for line in text.decode().splitlines():
            if line.strip():
                seen.setdefault(line.strip(), None)
    return "".join(line + "\n" for line in seen).encode()


def _brackets(*texts: bytes) -> bytes:
    """bracket.json records merged: each setting's larger count of extensions on each side."""
    merged: dict = {}
    for text in texts:
        for key, record in json.loads(text or b"{}").items():
            entry = merged.setdefault(key, {})
            for field, value in record.items():
                entry[field] = max(entry.get(field, value), value)
    return (json.dumps(merged, indent=1, sort_keys=True) + "\n").encode()


def _records(old: Files, new: Files) -> Files:
    """The sweep's own records of ``old`` and ``new`` merged."""
    out = {}
    if INVOCATIONS in old or INVOCATIONS in new:
        out[INVOCATIONS] = _lines(old.get(INVOCATIONS, b""), new.get(INVOCATIONS, b""))
    if BRACKET in old or BRACKET in new:
        out[BRACKET] = _brackets(old.get(BRACKET, b""), new.get(BRACKET, b""))
    if MULTIRUN in old or MULTIRUN in new:
        out[MULTIRUN] = new.get(MULTIRUN, old.get(MULTIRUN))
    return out


def local_files(sweep_dir: Path) -> Files:
    """The sweep directory's records and the files of its finished runs."""
    paths = [sweep_dir / name for name in (INVOCATIONS, BRACKET, MULTIRUN) if (sweep_dir / name).exists()]
    for run in finished_runs(sweep_dir):
        paths += [run / name for name in RUN_FILES if (run / name).exists()]
        paths += sorted(p for p in (run / ".hydra").glob("*") if p.is_file())
    return {p.relative_to(sweep_dir).as_posix(): p.read_bytes() for p in paths}


def read(archive: Path) -> Files:
    """Every file in ``archive``; a clear error if it is not a readable archive or holds a path
    outside a sweep directory."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, EOFError, OSError) as err:
        raise SystemExit(f"error: {archive} is not a readable sweep archive ({type(err).__name__}: {err}); "
                         "restore it from git (git checkout -- FILE) or move it away") from None
    for name in files:
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise SystemExit(f"error: {archive} holds {name!r}, which is outside a sweep directory")
    return files


@contextlib.contextmanager
def _locked(folder: Path):
    """One saver at a time per folder (two experiment files may share a results directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(archive: Path, files: Files) -> None:
    fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.")  # a stop mid-write leaves the old one
    with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    os.chmod(tmp, 0o644)
    Path(tmp).replace(archive)


def save(sweep_dir: Path, archive: Path) -> int:
    """Merge ``sweep_dir``'s records and finished runs into ``archive`` (.tar.gz, made if missing);
    returns the number of runs the archive holds."""
    sweep_dir, archive = Path(sweep_dir), Path(archive)
    if not sweep_dir.is_dir():
        raise SystemExit(f"error: {sweep_dir} is not a sweep directory")
    new = local_files(sweep_dir)
    with _locked(archive.parent):
        old = read(archive) if archive.exists() else {}
        runs = _runs(old)
        for name, run in _runs(new).items():
            if name not in runs or _started(run) >= _started(runs[name]):
                runs[name] = run
        loose = {n: d for n, d in old.items() if _run_of(n) not in runs and n not in (INVOCATIONS, BRACKET, MULTIRUN)}
        merged = {**loose, **_records(old, new), **{n: d for run in runs.values() for n, d in run.items()}}
        if merged != old:
            _write(archive, merged)
    return len(runs)


def restore(archive: Path, sweep_dir: Path) -> tuple[int, int]:
    """Unpack ``archive``'s runs and records into ``sweep_dir``; returns (runs written, runs kept
    because they are finished here or being trained)."""
    sweep_dir = Path(sweep_dir)
    files = read(archive)
    written = kept = 0
    for name, run in _runs(files).items():
        target = sweep_dir / name
        if finished(target):
            kept += 1
            continue
        if target.exists():  # unfinished or failed here: the archived finished run replaces it whole
            with open(target / ".lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    kept += 1
                    continue
                shutil.rmtree(target)
        for path, data in run.items():
            (sweep_dir / path).parent.mkdir(parents=True, exist_ok=True)
            (sweep_dir / path).write_bytes(data)
        written += 1
    here = {n: (sweep_dir / n).read_bytes() for n in (INVOCATIONS, BRACKET, MULTIRUN) if (sweep_dir / n).exists()}
    for name, data in _records(files, here).items():
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / name).write_bytes(data)
    return written, kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bnp.archive", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("save", help="merge a sweep's finished runs into a .tar.gz")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("archive", type=Path)
    p = sub.add_parser("restore", help="unpack an archive's runs into a sweep directory")
    p.add_argument("archive", type=Path)
    p.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "save":
        n = save(args.sweep_dir, args.archive)
        size = f" ({args.archive.stat().st_size / 1e6:.2f} MB)" if args.archive.exists() else ""
        print(f"[archive] {args.sweep_dir} -> {args.archive}: {n} finished runs{size}")
        damaged = damaged_runs(args.sweep_dir)
        if damaged:
            print(f"[archive] left out {len(damaged)} runs with an unreadable summary (train them again to "
                  f"repair): {'; '.join(damaged)}", file=sys.stderr)
    else:
        if not args.archive.is_file():
            raise SystemExit(f"error: no archive at {args.archive}")
        written, kept = restore(args.archive, args.sweep_dir)
        print(f"[archive] {args.archive} -> {args.sweep_dir}: {written} runs written, {kept} kept (finished "
              "here or being trained); rerun the sweep's command to finish it")


if __name__ == "__main__":
    main()
