"""Validation accuracy of every run of a sweep at each evaluation step, as one markdown table.

    python scripts/val_by_step.py SWEEP_DIR [--out table.md]

Rows: runs (named by their overrides, with status); columns: evaluated steps. For studies whose
question is how accuracy develops (e.g. online statistics that drift after 10k steps), which the
report's final / best columns do not show.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from bnp.log import read_json, read_metrics
from bnp.runs import find_runs


def table(sweep_dir: Path) -> pd.DataFrame:
    rows = []
    for run_dir in find_runs(sweep_dir):
        metrics = run_dir / "metrics.jsonl"
        if not metrics.exists():
            continue
        summary = read_json(run_dir / "summary.json") if (run_dir / "summary.json").exists() else {}
        row = {"run": run_dir.name, "status": summary.get("status", "unfinished")}
        row.update({int(r["step"]): round(r["val_acc"], 4) for r in read_metrics(metrics) if "val_acc" in r})
        rows.append(row)
    frame = pd.DataFrame(rows)
    steps = sorted(c for c in frame.columns if isinstance(c, int))
    return frame[["run", "status", *steps]].astype(object).fillna("-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = table(args.sweep_dir).to_markdown(index=False)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"command: `python scripts/val_by_step.py {args.sweep_dir} --out {args.out}`\n\n"
                            f"validation accuracy at each evaluated step\n\n{text}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
