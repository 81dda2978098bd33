"""The library installs with torch alone: `pip install bnp` into a clean virtual environment that
holds torch (and what torch needs) and nothing else, then the README's library snippet runs."""

import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORK = ("hydra", "omegaconf", "wandb", "pandas", "matplotlib", "sklearn", "torchvision", "yaml")


def closure(name: str) -> set[str]:
    """``name`` and the distributions it requires on this machine, recursively, with extras."""
    from packaging.requirements import Requirement

    seen, todo = set(), [(name, frozenset())]
    while todo:
        dist, extras = todo.pop()
        if (dist.lower(), extras) in seen:
            continue
        seen.add((dist.lower(), extras))
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                continue
            try:
                metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                continue
            todo.append((req.name, frozenset(req.extras)))
    return {dist for dist, _ in seen}


def readme_snippet() -> str:
    """The first code block of the README's library section (indented lines, blank lines inside)."""
    lines = (ROOT / "README.md").read_text().split("## Using `bnp.BNP` in your own PyTorch code\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    end = next(i for i in range(start, len(lines)) if lines[i].strip() and not lines[i].startswith("    "))
    return "\n".join(line[4:] for line in lines[start:end])


@pytest.mark.slow
def test_the_library_installs_and_runs_with_torch_alone(tmp_path):
    # torch and its requirements, made visible to the clean environment through a .pth file
    torch_only = tmp_path / "torch_only"
    torch_only.mkdir()
    for dist in map(metadata.distribution, closure("torch")):
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "bin"}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (torch_only / top).exists():
                (torch_only / top).symlink_to(source)
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the venv's own old setuptools would shadow the one torch requires
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True)
    (site / "torch_only.pth").write_text(f"{torch_only}\n")
    wheels, source = tmp_path / "wheels", tmp_path / "source"  # a copy: building writes build/ beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "results", "build",
                                                                 "*.egg-info", "__pycache__", "data"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels,
                    source], check=True, capture_output=True)
    (wheel,) = wheels.glob("bnp-*.whl")
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", wheel], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr  # resolves: torch is all it needs
    check = subprocess.run([python, "-c", f"import importlib.util as u; print([m for m in {FRAMEWORK!r} "
                            "if u.find_spec(m)])"], capture_output=True, text=True, check=True)
    assert check.stdout.strip() == "[]"  # none of the framework's dependencies came along
    snippet = f"""
import torch
from torch import nn
from torch.nn import functional as F
MyNet = lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
loader = [(torch.randn(8, 6) * 3 + 1, torch.randint(0, 3, (8,))) for _ in range(20)]
{readme_snippet()}
print("ok", pre.steps, __import__("bnp").__file__)
"""
    ran = subprocess.run([python, "-c", snippet], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 0 and ran.stdout.startswith("ok 20 " + str(env)), ran.stdout + ran.stderr


def test_the_library_declares_and_imports_torch_alone():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch"]
    assert {"experiments", "dev"} <= set(project["optional-dependencies"])
    code = (f"import sys, bnp; from bnp import BNP, LayerStats; "
            f"print(sorted(m for m in {FRAMEWORK!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
