"""The committed results reproduce: each results directory's table.csv is what the report makes
from its sweep.tar.gz alone (as on a fresh clone), and no run config sits in two directories."""

import re
from pathlib import Path

import pytest
import yaml

from bnp.archive import read, restore
from bnp.report import report
from bnp.runs import NOT_SETTING, _flat
from conftest import ROOT

ARCHIVED = sorted(p.parent.name for p in (ROOT / "results").glob("*/sweep.tar.gz"))


@pytest.mark.parametrize("setting", ARCHIVED)
def test_a_results_table_is_remade_from_its_archive_alone(setting, tmp_path):
    results = ROOT / "results" / setting
    target = re.search(r"--target (\S+?)`", (results / "PROVENANCE.md").read_text())
    sweep = tmp_path / "sweeps" / setting
    restore(results / "sweep.tar.gz", sweep)
    report(sweep, tmp_path / "out", float(target.group(1)) if target else 0.9, [])
    assert (tmp_path / "out" / "table.csv").read_text() == (results / "table.csv").read_text()


def test_no_run_config_is_in_two_results_directories():
    where = {}
    for setting in ARCHIVED:
        for name, data in read(ROOT / "results" / setting / "sweep.tar.gz").items():
            if name.endswith("config.yaml") and ".hydra" not in name:
                flat = _flat(yaml.safe_load(data))
                key = tuple(sorted((k, repr(v)) for k, v in flat.items()
                                   if k in ("optim.lr", "train.seed") or k.startswith("norm.")
                                   or not k.startswith(NOT_SETTING)))
                assert where.setdefault(key, setting) == setting, f"{name}: in {where[key]} and {setting}"


def test_results_directories_are_settings_not_reruns():
    names = [p.name for p in (ROOT / "results").iterdir() if p.is_dir()]
    assert not [n for n in names if n.endswith(("_seeds", "_edges", "_lars"))]
    assert all((ROOT / "results" / n / "PROVENANCE.md").exists() for n in names), names
    for runs in (ROOT / "results").rglob("runs.csv"):  # nested ones too
        header = runs.read_text().splitlines()[0].split(",")
        assert {"commit", "overrides"} <= set(header), runs
