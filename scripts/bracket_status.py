"""How each committed table's learning rates are bracketed, from its runs.csv alone.

    python scripts/bracket_status.py results/*/runs.csv [--out results/bracket_status.md]

For every setting: the chosen lr (best mean validation accuracy, as bnp.report picks it), the lrs
tried, and the lr_bracket label (interior, diverged-beyond, edge, single). Tables made before the
driver bracketed learning rates have no bracketing record (``bracket.json`` beside runs.csv), so
their edges read ``edge``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from bnp.choice import choices, lr_bracket, setting_key
from bnp.runs import SETTING


def status(runs_csv: Path) -> pd.DataFrame:
    runs = pd.read_csv(runs_csv)
    runs["hparams"] = runs["hparams"].astype(object).fillna("") if "hparams" in runs else ""
    record = runs_csv.parent / "bracket.json"  # the driver's extensions, copied there by the report
    extensions = json.loads(record.read_text()) if record.exists() else {}
    rows = []
    for chosen, group, usable in choices(runs):
        tried = sorted(usable["lr"].unique())
        rows.append({"results": runs_csv.parent.name, **{k: chosen[k] for k in SETTING}, "lr": chosen["lr"],
                     "tried": ", ".join(f"{lr:g}" for lr in tried),
                     "lr_bracket": lr_bracket(group, chosen["lr"], chosen["hparams"],
                                              extensions.get(setting_key(chosen[SETTING])))})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_csv", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    table = pd.concat([status(p) for p in args.runs_csv], ignore_index=True)
    text = table.to_markdown(index=False)
    print(text)
    if args.out:
        command = "python scripts/bracket_status.py " + " ".join(str(p) for p in args.runs_csv)
        args.out.write_text(f"command: `{command} --out {args.out}`\n\n{text}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
