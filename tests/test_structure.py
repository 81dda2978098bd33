"""The library's shape: small modules and classes, one idea each."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bnp"


def test_no_module_over_400_lines_and_no_class_over_300():
    modules = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    long_modules = {p.name: len(text.splitlines()) for p, text in modules.items() if len(text.splitlines()) > 400}
    long_classes = {f"{p.name}:{node.name}": node.end_lineno - node.lineno + 1
                    for p, text in modules.items() for node in ast.walk(ast.parse(text))
                    if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300}
    assert not long_modules and not long_classes, (long_modules, long_classes)


def test_options_are_torch_free():
    """bnp/options.py is what the library and the config schema share: it imports no torch."""
    tree = ast.parse((PACKAGE / "options.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert "torch" not in imported
