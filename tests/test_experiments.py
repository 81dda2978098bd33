"""Every experiment's smoke variant runs end to end (sweep through the CLI, then its report)."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))


def test_one_experiment_file_per_claim():
    assert {"mlp_batch_size", "online", "cnn", "resnet"} <= set(EXPERIMENTS)
    configs = {p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")}
    assert set(EXPERIMENTS) <= configs


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_variant(name, tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, f"experiments/{name}.py", "--smoke", "--out-root", str(tmp_path), "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pd.read_csv(results / "table.csv")
    assert len(table) >= 2 and list(results.glob("*.png")) and list(results.glob("*.pdf"))
    provenance = (results / "PROVENANCE.md").read_text()
    assert f"python experiments/{name}.py" in provenance and "commit:" in provenance
    for summary in (tmp_path / "sweeps").glob("*/*/summary.json"):
        assert '"status": "completed"' in summary.read_text() or "not_applicable" in summary.read_text(), summary
