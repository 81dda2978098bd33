"""Run one results setting by its name: ``python -m bnp.setting NAME [ARGS ...]``.

Every experiment file (``experiments/<name>.py``) declares the settings it makes in ``SETTINGS``:
{setting name: the arguments that make it}, e.g. ``"resnet20-b128-6ep": ["--grids", "1,2",
"--all-seeds", "0,1,2", "train.epochs=6"]``. This finds the files that declare NAME (a setting two
experiments fill, e.g. a grid and its variants, runs both, in file order) and runs each as
``python experiments/<file>.py --setting NAME ARGS``; ARGS are passed on (``--restore``, overrides).
``python -m bnp.setting --list`` lists every setting with its file. The Makefile's ``fig-<setting>``
targets are this command.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def declared() -> dict[str, list[Path]]:
    """{setting name: the experiment files that declare it, in file order}."""
    found: dict[str, list[Path]] = {}
    for path in sorted(EXPERIMENTS.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # experiment files run nothing on import
        for name in getattr(module, "SETTINGS", {}):
            found.setdefault(name, []).append(path)
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = declared()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        for name, files in sorted(settings.items()):
            print(f"{name:32} {', '.join(str(f.relative_to(ROOT)) for f in files)}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in settings:
        print(f"error: setting {name!r} is declared by no experiment file; settings: {', '.join(sorted(settings))}",
              file=sys.stderr)
        return 2
    for path in settings[name]:
        code = subprocess.call([sys.executable, str(path), "--setting", name, *rest], cwd=ROOT)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
