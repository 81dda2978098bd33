"""Numbers in the docs come from the result tables: the committed pages equal what `make docs`
renders from the committed results/*/table.csv, and an edited number is caught."""

import shutil

import pytest

import bnp.docs as docs
from conftest import ROOT


def test_committed_pages_are_what_the_tables_give():
    stale = [p.relative_to(ROOT).as_posix() for p in docs.pages() if docs.rendered(p) != p.read_text()]
    assert docs.pages() and not stale, f"run `make docs`: {stale}"


def test_a_number_edited_by_hand_is_stale_and_make_docs_restores_it(tmp_path, monkeypatch):
    for part in ("README.md", "docs", "results"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, tmp_path / part, ignore=shutil.ignore_patterns("*.tar.gz", "*.png", "*.pdf"))
        else:
            shutil.copy2(src, tmp_path / part)
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "TEMPLATES", tmp_path / "docs" / "templates")
    docs._table.cache_clear()
    page = tmp_path / "docs" / "results" / "resnet.md"
    good = page.read_text()
    bn = docs.acc("resnet20-b128-2ep", "bn")
    page.write_text(good.replace(bn, "0.9999 ± 0.0001", 1))
    with pytest.raises(SystemExit, match="stale: docs/results/resnet.md"):
        docs.main(["--check"])
    docs.main([])
    assert page.read_text() == good
    docs._table.cache_clear()


def test_a_template_asking_for_a_missing_method_names_it(tmp_path, monkeypatch):
    (tmp_path / "bad.md.j2").write_text('{{ acc("resnet20-b128-2ep", "nosuch") }}')
    monkeypatch.setattr(docs, "TEMPLATES", tmp_path)
    with pytest.raises(docs.DocsError, match="0 rows for norm=nosuch .*norms: .*bn"):
        docs.render("bad")
