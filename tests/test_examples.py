"""The scripts in examples/ run end to end on tiny data (a researcher copies them)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "torchvision_resnet.py": ["--steps", "3", "--batch-size", "4", "--image-size", "16", "--rules", "bnp+agc"],
    "online_stream.py": ["--passes", "2", "--limit", "150"],
    "adamw_bf16.py": ["--steps", "60"],
}


def test_every_example_is_run_here():
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == set(TINY)


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s == "torchvision_resnet.py" else s
                                    for s in sorted(TINY)])  # ResNet-18 through torchvision: make test-all
def test_example_runs(script):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *TINY[script]], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    if script == "online_stream.py":  # the second pass predicts better than chance (0.1) by far
        assert float(out.stdout.split("prequential accuracy ")[-1].split()[0]) > 0.5, out.stdout
    if script == "adamw_bf16.py":  # the loss went down
        losses = [float(line.split("loss ")[1]) for line in out.stdout.splitlines() if "loss" in line]
        assert losses[-1] < losses[0] * 0.5, out.stdout
