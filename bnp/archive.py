"""A sweep's finished runs in one file, so a sweep can be committed and finished on another machine.

    python -m bnp.archive save outputs/sweeps/NAME results/NAME/sweep.tar.gz
    python -m bnp.archive restore results/NAME/sweep.tar.gz outputs/sweeps/NAME

``save`` packs what the report and the resume check read: the sweep's records (invocations.jsonl,
bracket.json, multirun.yaml) and, of every run that has finished (completed, diverged or not
applicable), its config.yaml, summary.json, metrics.jsonl and .hydra/. Checkpoints, W&B files and
unfinished runs stay behind: an unfinished run starts again. ``restore`` unpacks into a sweep
directory and never overwrites a file already there, so rerunning the sweep's command (or its
experiment file) afterwards skips the finished runs, and the report covers them all. Saving onto an
existing archive merges: runs it holds that are not finished in the sweep directory stay in it.

The experiment files (bnp.sweep.run_experiment) save RESULTS/sweep.tar.gz with each report and when
stopped, and restore it first with ``--restore``.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path, PurePosixPath

from bnp.log import read_json
from bnp.report import find_runs

FINISHED = ("completed", "diverged", "not_applicable")
INVOCATIONS = "invocations.jsonl"
SWEEP_FILES = (INVOCATIONS, "bracket.json", "multirun.yaml")
RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl")


def finished_runs(sweep_dir: Path) -> list[Path]:
    return [d for d in find_runs(sweep_dir)
            if (d / "summary.json").exists() and read_json(d / "summary.json").get("status") in FINISHED]


def save(sweep_dir: Path, archive: Path) -> int:
    """Pack ``sweep_dir``'s records and finished runs into ``archive`` (.tar.gz); returns the run count.

    An existing archive is merged, never thrown away: its runs that are not finished here are kept
    (a finished run here replaces its archived copy whole), and its invocations.jsonl lines come first."""
    sweep_dir, archive = Path(sweep_dir), Path(archive)
    if not sweep_dir.is_dir():
        raise SystemExit(f"error: {sweep_dir} is not a sweep directory")
    runs = finished_runs(sweep_dir)
    files = [sweep_dir / name for name in SWEEP_FILES if (sweep_dir / name).exists() and name != INVOCATIONS]
    for run in runs:
        files += [run / name for name in RUN_FILES if (run / name).exists()]
        files += sorted(p for p in (run / ".hydra").glob("*") if p.is_file())
    ours = {p.relative_to(sweep_dir).as_posix() for p in files}
    here = {run.relative_to(sweep_dir).as_posix() for run in runs}
    kept, invocations = {}, []
    if archive.exists():
        with tarfile.open(archive, "r:gz") as old:
            for member in old.getmembers():
                if not member.isfile():
                    continue
                data = old.extractfile(member).read()
                if member.name == INVOCATIONS:
                    invocations = data.decode().splitlines(keepends=True)
                elif member.name not in ours and _run_of(member.name) not in here:
                    kept[member.name] = data
    if (sweep_dir / INVOCATIONS).exists():
        invocations += [line for line in (sweep_dir / INVOCATIONS).read_text().splitlines(keepends=True)
                        if line not in invocations]
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")  # a stop mid-write leaves the old archive whole
    if invocations:
        kept[INVOCATIONS] = "".join(invocations).encode()
    with tarfile.open(partial, "w:gz") as tar:
        for name, data in kept.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for path in files:
            tar.add(path, arcname=path.relative_to(sweep_dir).as_posix(), recursive=False)
    partial.replace(archive)
    return len(here | {_run_of(name) for name in kept if name.endswith("/summary.json")})


def _run_of(name: str) -> str:
    """The run directory an archived file belongs to (its folder; .hydra/'s parent)."""
    parent = PurePosixPath(name).parent
    return (parent.parent if parent.name == ".hydra" else parent).as_posix()


def restore(archive: Path, sweep_dir: Path) -> tuple[int, int]:
    """Unpack ``archive`` into ``sweep_dir``, keeping every file already there; returns (written, kept)."""
    sweep_dir = Path(sweep_dir)
    written = kept = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            target = sweep_dir / member.name
            if sweep_dir.resolve() not in target.resolve().parents:
                raise SystemExit(f"error: {archive} holds {member.name!r}, which is outside a sweep directory")
            if target.exists():
                kept += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.replace(target)
            written += 1
    return written, kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bnp.archive", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("save", help="pack a sweep's finished runs into a .tar.gz")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("archive", type=Path)
    p = sub.add_parser("restore", help="unpack an archive into a sweep directory (existing files win)")
    p.add_argument("archive", type=Path)
    p.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "save":
        n = save(args.sweep_dir, args.archive)
        print(f"[archive] {n} finished runs of {args.sweep_dir} -> {args.archive} "
              f"({args.archive.stat().st_size / 1e6:.2f} MB)")
    else:
        if not args.archive.is_file():
            raise SystemExit(f"error: no archive at {args.archive}")
        written, kept = restore(args.archive, args.sweep_dir)
        print(f"[archive] {args.archive} -> {args.sweep_dir}: {written} files written, {kept} already there kept; "
              "rerun the sweep's command to finish it")


if __name__ == "__main__":
    main()
