"""Numbers in the docs come from the result tables: ``python -m bnp.docs [--check]`` (``make docs``).

A page marks each rendered part with a pair of comments::

    <!-- render: claims -->
    ... (replaced by docs/templates/claims.md.j2, rendered) ...
    <!-- end: claims -->

Templates are Jinja2 and read ``results/<setting>/table.csv`` through the functions below, e.g.
``{{ table("resnet20-b128-2ep") }}`` or ``{{ acc("resnet20-b128-2ep", "bn") }}``; interpretation
stays hand-written around them. ``--check`` writes nothing and exits 1 naming the pages that differ
from what the committed tables give (a test runs it, so no rerun leaves a stale number behind).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

import jinja2
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "docs" / "templates"
PAGES = ["README.md", "docs/*.md", "docs/results/*.md", "results/README.md"]
REGION = re.compile(r"(<!-- render: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)
COLUMNS = ["norm", "hparams", "status", "lr", "lr_bracket", "chosen_on", "seeds", "test_acc", "best_val_acc"]


class DocsError(ValueError):
    """A template asks for a setting, method or column the tables do not have."""


@functools.cache
def _table(setting: str) -> pd.DataFrame:
    path = ROOT / "results" / setting / "table.csv"
    if not path.exists():
        raise DocsError(f"results/{setting}/table.csv does not exist (settings: "
                        f"{', '.join(sorted(p.parent.name for p in (ROOT / 'results').glob('*/table.csv')))})")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _row(setting: str, norm: str, batch_size: int | None = None) -> pd.Series:
    t = _table(setting)
    rows = t[(t["norm"] == norm) & ((t["batch_size"] == str(batch_size)) if batch_size is not None else True)]
    if len(rows) != 1:
        raise DocsError(f"results/{setting}/table.csv: {len(rows)} rows for norm={norm}"
                        f"{f' batch_size={batch_size}' if batch_size is not None else ''} (norms: "
                        f"{', '.join(sorted(set(t['norm'])))}; batch sizes: {', '.join(sorted(set(t['batch_size'])))})")
    return rows.iloc[0]


def cell(setting: str, norm: str, column: str, batch_size: int | None = None) -> str:
    """One cell of a setting's table, as written there (``0.9046 ± 0.0012``)."""
    row = _row(setting, norm, batch_size)
    if column not in row:
        raise DocsError(f"results/{setting}/table.csv has no column {column!r} (columns: {', '.join(row.index)})")
    return row[column]


def mean(setting: str, norm: str, column: str = "test_acc", batch_size: int | None = None) -> float:
    """The mean of a ``mean ± std`` cell (or the plain number)."""
    text = cell(setting, norm, column, batch_size).split("±")[0].strip()
    try:
        return float(text)
    except ValueError:
        raise DocsError(f"results/{setting}: {norm} {column} is {text!r}, not a number") from None


def acc(setting: str, norm: str, batch_size: int | None = None) -> str:
    """Test accuracy at the chosen lr, mean ± std over its seeds."""
    return cell(setting, norm, "test_acc", batch_size)


def gap(setting: str, norm: str, reference: str, batch_size: int | None = None, column: str = "test_acc") -> str:
    """``norm``'s mean ``column`` (test accuracy) minus ``reference``'s, in points (signed, one decimal)."""
    return f"{100 * (mean(setting, norm, column, batch_size) - mean(setting, reference, column, batch_size)):+.1f}"


def evidence(setting: str, *norms: str, batch_size: int | None = None) -> str:
    """How strong a comparison is: the seeds at each method's chosen lr, the seeds the lr was chosen
    on, and whether each chosen lr has a tried lr on both sides (``lr_bracket``)."""
    return evidence_over([(setting, batch_size)], norms)


def evidence_over(places: list, norms: list[str]) -> str:
    """``evidence`` of the rows ``norms`` in several places, each ``(setting, batch_size or None)``:
    e.g. ``3 seeds, lr chosen on 3, lr interior except diverged-beyond: bnp at batch 128``. The rows
    whose lr_bracket is not ``interior`` are named, so a reader sees which choice lies at an edge."""
    rows = [(s, b, n, _row(s, n, b)) for s, b in places for n in norms]
    def whole(text: str) -> str:  # "3.0" (a float column beside a NaN) reads "3"
        return text[:-2] if text.endswith(".0") else text

    seeds = sorted({whole(r["seeds"]) for *_, r in rows})
    chosen = sorted({whole(r.get("chosen_on", "")) for *_, r in rows} - {""})
    several_settings, several_batches = len({s for s, _ in places}) > 1, len({b for _, b in places}) > 1
    named: dict[str, list[str]] = {}
    for s, b, n, r in rows:
        label = n + (f" at batch {b}" if several_batches and b is not None else "") + (f" in {s}" if several_settings else "")
        named.setdefault(r["lr_bracket"].strip("*"), []).append(label)
    odd = "; ".join(f"{kind}: {', '.join(labels)}" for kind, labels in sorted(named.items()) if kind != "interior")
    bracket = "interior" + (f" except {odd}" if odd else "") if "interior" in named else odd
    return (f"{'/'.join(seeds)} seed{'' if seeds == ['1'] else 's'}" + (f", lr chosen on {'/'.join(chosen)}" if chosen else "")
            + f", lr {bracket}")


def screened(*settings: str, seeds: int = 3) -> str:
    """The rows of these settings whose lr was chosen on fewer than ``seeds`` seeds (a one-seed screen,
    or one seed only), e.g. ``bnp+agc (1 of 3), none+lars (1 of 1) in cnn-gap-b32-2ep``; empty when
    every choice used ``seeds``. Rows without a choice (``n/a``: nothing completed) are left out."""
    parts = []
    for setting in settings:
        t = _table(setting)
        if "chosen_on" not in t.columns:
            continue
        chosen, ran = pd.to_numeric(t["chosen_on"], errors="coerce"), pd.to_numeric(t["seeds"], errors="coerce")
        rows = [f"{norm} ({c:.0f} of {r:.0f})" for norm, c, r in zip(t["norm"], chosen, ran) if c < seeds]
        if rows:
            parts.append(f"{', '.join(rows)} in {setting}")
    return "; ".join(parts)


def table(setting: str, columns: list[str] | None = None, norms: list[str] | None = None) -> str:
    """A setting's table (selected columns and methods) as markdown."""
    t = _table(setting)
    if norms is not None:
        t = t[t["norm"].isin(norms)]
    wanted = [c for c in (columns or COLUMNS) if c in t.columns]
    if "batch_size" in t.columns and t["batch_size"].nunique() > 1 and "batch_size" not in wanted:
        wanted.insert(1, "batch_size")
    return t[wanted].to_markdown(index=False)


@functools.cache
def _csv(path: str) -> pd.DataFrame:
    full = ROOT / "results" / path
    if not full.exists():
        raise DocsError(f"results/{path} does not exist")
    return pd.read_csv(full, dtype=str, keep_default_na=False)


def _matching(path: str, **match: str) -> pd.DataFrame:
    """The rows of a CSV under results/ whose columns equal ``match`` (values compared as written)."""
    t = _csv(path)
    for key, value in match.items():
        t = t[t[key] == str(value)]
    return t


def csv_table(path: str, columns: list[str] | None = None, **match: str) -> str:
    """Any CSV under results/ (e.g. ``preconditioners/comparison.csv``) as markdown: the rows whose
    columns equal ``match`` (``batch_size="8"``), the ``columns`` given."""
    t = _matching(path, **match)
    return t[columns or list(t.columns)].to_markdown(index=False, disable_numparse=True)  # cells as written


def records(path: str, **match: str) -> list[dict[str, str]]:
    """The rows of a CSV under results/ whose columns equal ``match``, as dicts (for loops in a template)."""
    return _matching(path, **match).to_dict("records")


def lookup(path: str, column: str, **match: str) -> str:
    """One cell of a CSV under results/: the one row whose columns equal ``match``."""
    t = _matching(path, **match)
    if len(t) != 1 or column not in t.columns:
        raise DocsError(f"results/{path}: {len(t)} rows for {match} (column {column!r})")
    return t.iloc[0][column]


def wall_time(setting: str) -> str:
    """How long the last invocation that trained ``setting`` took (its PROVENANCE.md's last ``wall
    time of this invocation``), and on what machine, e.g. ``4 min 10 s on 2 CPUs``."""
    path = ROOT / "results" / setting / "PROVENANCE.md"
    text = path.read_text() if path.is_file() else ""
    walls = re.findall(r"^- wall time of this invocation: (\d+) s$", text, re.M)
    cpus = re.findall(r"^- machine: .*?(\d+) CPUs", text, re.M)
    if not walls:
        raise DocsError(f"results/{setting}/PROVENANCE.md records no wall time (no invocation that trained)")
    minutes, seconds = divmod(int(walls[-1]), 60)
    return f"{minutes} min {seconds} s" + (f" on {cpus[-1]} CPUs" if cpus else "")


def render(name: str) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    env.globals.update(table=table, cell=cell, mean=mean, acc=acc, gap=gap, evidence=evidence, evidence_over=evidence_over, screened=screened,
                       csv_table=csv_table, lookup=lookup, records=records, wall_time=wall_time)
    try:
        text = env.get_template(f"{name}.md.j2").render()
    except jinja2.TemplateNotFound:
        raise DocsError(f"no template docs/templates/{name}.md.j2") from None
    return text if text.endswith("\n") else text + "\n"


def rendered(page: Path) -> str:
    """The page with each of its regions replaced by its template's rendering."""
    return REGION.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), page.read_text())


def pages() -> list[Path]:
    return sorted({p for pattern in PAGES for p in ROOT.glob(pattern) if REGION.search(p.read_text())})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bnp.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    args = parser.parse_args(argv)
    stale = []
    try:
        for page in pages():
            text = rendered(page)
            if text != page.read_text():
                stale.append(page.relative_to(ROOT).as_posix())
                if not args.check:
                    page.write_text(text)
    except DocsError as err:
        sys.exit(f"error: {err}")
    if args.check and stale:
        sys.exit(f"stale: {', '.join(stale)} differ from what the result tables give; run `make docs`")
    print(f"{'stale' if args.check else 'rendered'}: {', '.join(stale) or 'nothing (all pages current)'}")


if __name__ == "__main__":
    main()
