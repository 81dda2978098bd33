"""Merge result directories that hold runs of one setting into one directory per setting.

    python scripts/merge_results.py [--only NAME ...] [--keep-sources]

A setting is what a table compares methods within (data, model, batch size, optimizer and
schedule, budget). ``SETTINGS`` below names each setting's directory and the directories its runs
came from. Each source's runs are taken whole: from its ``sweep.tar.gz`` where it has one, else
rebuilt from its ``runs.csv`` (the summary metrics of each run, its config composed from the
overrides in its run directory's name with today's configs, and no metric curves; such runs say
``"rebuilt_from"`` in their summary). All runs are packed into ``results/NAME/sweep.tar.gz`` with
``bnp.archive`` (of two runs with the same overrides, the later one is kept, as ``bnp.archive``
merges), the report is made from that archive alone, and the sources' provenance is appended to
the new ``PROVENANCE.md``. The script refuses a setting whose runs differ in a config value that is
not the lr, the seed or the norm (they would be averaged as seeds). Sources are deleted afterwards
unless ``--keep-sources``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT))

from bnp.archive import read, save  # noqa: E402
from bnp.runs import NOT_SETTING, _defaults, _flat  # noqa: E402


def batch(n: int) -> Callable[[dict], bool]:
    return lambda flat: flat["train.batch_size"] == n


def model(name: str) -> Callable[[dict], bool]:
    return lambda flat: flat["model.name"] == name


# setting directory -> (sources, each a directory name or (name, filter on the run's flat config))
SETTINGS: dict[str, list] = {
    "resnet20-b128-2ep": ["resnet_cpu", "resnet_cpu_edges", "resnet_variants", "resnet_variants_seeds",
                          "resnet_variants_lars"],
    "resnet20-b8-2ep": ["resnet_variants_b8", "resnet_variants_b8_seeds"],
    "cnn-gap-b128-2ep": ["cnn"],
    "cnn-gap-b8-1ep": ["cnn_gap_b8"],
    "cnn-fc-b128-2ep": [("cnn_fc", batch(128)), "cnn_fc_seeds"],
    "cnn-fc-b8-1ep": [("cnn_fc", batch(8)), "cnn_fc_b8_seeds"],
    "cnn-classic-b128-1ep": ["cnn_classic", "cnn_classic_seeds"],
    "cnn-gap-b128-6ep-momentum": ["cnn_momentum", "cnn_momentum_edges", "cnn_momentum_variants",
                                  "cnn_momentum_variants_seeds"],
    "cnn-gap-b32-2ep": ["bnp_variants", "bnp_variants_seeds"],
    "mlp-b1-1ep": [("online", model("mlp")), ("online_edges", model("mlp"))],
    "cnn-gap-b1-1ep": [("online", model("cnn")), ("online_edges", model("cnn"))],
    "cnn-fc-b1-1ep": ["online_fc"],
    "mlp-b1-128-2ep": ["mlp_batch_size"],
    "digits-mlp-defaults": ["defaults"],
}
REPORT_FILES = {"PROVENANCE.md", "accuracy_vs_batch_size.pdf", "accuracy_vs_batch_size.png", "bracket.json",
                "curves.pdf", "curves.png", "prequential.pdf", "prequential.png", "runs.csv", "runs.md",
                "table.csv", "table.md", "table.tex", "sweep.tar.gz"}


def split_overrides(name: str) -> list[str]:
    """A run directory's name back into its overrides (values may hold commas: ``[16,32]``)."""
    return re.split(r",(?=[A-Za-z_+~][\w.]*=)", name)


def provenance_facts(source: Path) -> dict:
    text = (source / "PROVENANCE.md").read_text() if (source / "PROVENANCE.md").exists() else ""
    commit = re.search(r"commit[:`\s(]+([0-9a-f]{40})", text)
    date = re.search(r"- date: (\S+ \S+)", text)
    target = re.search(r"--target (\S+)", text)
    sweeps = re.findall(r"- sweep: `([^`]+)`(?: \(commit ([0-9a-f]{40}))?", text)
    return {"commit": commit.group(1) if commit else "unknown", "date": date.group(1).replace(" ", "T") if date else "",
            "target": float(target.group(1).rstrip("`")) if target else None, "sweeps": sweeps, "text": text}


def composed(overrides: list[str]) -> dict:
    """The resolved config the runner writes for ``overrides`` (today's configs)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import bnp.train  # noqa: F401  (registers the schema and the slug resolver)
    from bnp.config import validate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(OmegaConf.structured(validate(cfg)), resolve=True)


METRICS = ("final_test_acc", "best_val_acc", "test_acc_at_best_val", "final_train_loss", "final_val_acc",
           "prequential_acc", "wall_time_s", "samples_per_s", "steps")


def rebuilt_runs(source: Path, facts: dict, keep: Callable[[dict], bool] | None, stage: Path) -> int:
    """Run directories rebuilt from ``source/runs.csv`` into ``stage``; returns how many."""
    n = 0
    for _, row in pd.read_csv(source / "runs.csv").iterrows():
        name = Path(row["run"]).name
        overrides = split_overrides(name)
        config = composed(overrides)
        if keep is not None and not keep({**_defaults(), **_flat(config)}):
            continue
        run = stage / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (run / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        summary = {"status": row["status"], "git_commit": row.get("commit") if isinstance(row.get("commit"), str)
                   else facts["commit"], "started": row.get("started") if isinstance(row.get("started"), str)
                   and row.get("started") else facts["date"], "rebuilt_from": f"results/{source.name}/runs.csv"}
        if isinstance(row.get("reason"), str):
            summary["reason"] = row["reason"]
        summary.update({k: float(row[k]) for k in METRICS if k in row and pd.notna(row[k])})
        (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        n += 1
    invocations = [{"id": f"{source.name}-{i}", "command": cmd, "commit": commit or facts["commit"],
                    "started": facts["date"]} for i, (cmd, commit) in enumerate(facts["sweeps"])]
    (stage / "invocations.jsonl").write_text("".join(json.dumps(inv) + "\n" for inv in invocations))
    return n


def archived_runs(source: Path, keep: Callable[[dict], bool] | None, stage: Path) -> int:
    files = read(source / "sweep.tar.gz")
    runs = {Path(n).parent for n in files if n.endswith("summary.json")}
    if keep is not None:
        runs = {r for r in runs if keep({**_defaults(), **_flat(yaml.safe_load(files[f"{r.as_posix()}/config.yaml"]))})}
    for name, data in files.items():
        if Path(name).parent in runs or Path(name).parent.parent in runs or "/" not in name:
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_bytes(data)
    return len(runs)


def check_one_setting(sweep: Path) -> None:
    """Every run's config outside the lr, the seed, the norm and NOT_SETTING is the same."""
    flats = [{k: v for k, v in {**_defaults(), **_flat(yaml.safe_load(p.read_text()))}.items()
              if not k.startswith(NOT_SETTING) and not k.startswith(("norm", "train.batch_size"))}
             for p in sweep.rglob("config.yaml") if ".hydra" not in p.parts]
    differ = sorted(k for k in set().union(*flats) if len({repr(f.get(k)) for f in flats}) > 1)
    if differ:
        raise SystemExit(f"error: {sweep.name}: its runs differ in {differ}; not one setting")


def merge(name: str, sources: list) -> None:
    out = RESULTS / name
    sweep = ROOT / "outputs" / "sweeps" / name
    if sweep.exists():  # it may hold runs made since (a sweep finishing the setting): never overwritten
        raise SystemExit(f"error: {sweep} exists; finish or archive it (python -m bnp.archive save) and remove it first")
    archive = out / "sweep.tar.gz"
    out.mkdir(parents=True, exist_ok=True)
    archive.unlink(missing_ok=True)
    lines, target = [], None
    for entry in sources:
        source_name, keep = entry if isinstance(entry, tuple) else (entry, None)
        source = RESULTS / source_name
        facts = provenance_facts(source)
        target = target or facts["target"]
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp) / name
            stage.mkdir()
            if (source / "sweep.tar.gz").exists():
                n, how = archived_runs(source, keep, stage), "its sweep.tar.gz"
            else:
                n, how = rebuilt_runs(source, facts, keep, stage), "its runs.csv (no archive: summaries only, no curves)"
            save(stage, archive)
        print(f"[merge] {name}: {n} runs from results/{source_name} ({how})", flush=True)
        lines.append(f"### from results/{source_name}: {n} runs, from {how}\n\n" + re.sub(
            r"(?m)^#+ ", "", facts["text"]).strip() + "\n")
        for extra in source.iterdir() if source.is_dir() else []:
            if extra.name not in REPORT_FILES and not (out / extra.name).exists():
                (shutil.copytree if extra.is_dir() else shutil.copy2)(extra, out / extra.name)
    subprocess.run([sys.executable, "-m", "bnp.archive", "restore", str(archive), str(sweep)], cwd=ROOT, check=True)
    check_one_setting(sweep)
    subprocess.run([sys.executable, "-m", "bnp.report", str(sweep.relative_to(ROOT)), "--out", str(out.relative_to(ROOT)),
                    *(["--target", f"{target:g}"] if target else [])], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(out / "PROVENANCE.md", "a") as f:
        f.write(f"\n## Merged from {len(sources)} earlier directories by `python scripts/merge_results.py "
                f"--only {name}`\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="setting directories to make (default: all)")
    parser.add_argument("--keep-sources", action="store_true")
    args = parser.parse_args()
    names = args.only or list(SETTINGS)
    for name in names:
        if name not in SETTINGS:
            raise SystemExit(f"error: --only {name}: not a setting (accepted: {', '.join(SETTINGS)})")
    for name in names:
        merge(name, SETTINGS[name])
    if not args.keep_sources:  # a source goes once every setting drawing on it is made
        made = set(names)
        for source in {e[0] if isinstance(e, tuple) else e for n in names for e in SETTINGS[n]} - set(SETTINGS):
            if all(n in made for n, entries in SETTINGS.items()
                   if source in {e[0] if isinstance(e, tuple) else e for e in entries}):
                shutil.rmtree(RESULTS / source)

if __name__ == "__main__":
    main()
