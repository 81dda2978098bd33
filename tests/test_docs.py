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


def test_any_results_csv_renders_by_match(tmp_path, monkeypatch):
    """csv_table, lookup and records read any CSV under results/ (e.g. a comparison table) by column match."""
    (tmp_path / "results" / "cmp").mkdir(parents=True)
    (tmp_path / "results" / "cmp" / "c.csv").write_text("method,batch_size,acc\nsgd,8,0.5\nbnp,8,0.75\nsgd,1,0.25\n")
    (tmp_path / "t.md.j2").write_text('{{ lookup("cmp/c.csv", "acc", method="bnp", batch_size=8) }}|'
                                      '{% for r in records("cmp/c.csv", method="sgd") %}{{ r.batch_size }},{% endfor %}|'
                                      '{{ csv_table("cmp/c.csv", ["method", "acc"], batch_size="1") }}')
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "TEMPLATES", tmp_path)
    docs._csv.cache_clear()
    looked, batches, table = docs.render("t").strip().split("|", 2)
    assert looked == "0.75" and batches == "8,1,"
    assert "sgd" in table and "0.25" in table and "bnp" not in table
    with pytest.raises(docs.DocsError, match=r"0 rows for \{'method': 'adam'\}"):
        docs.lookup("cmp/c.csv", "acc", method="adam")
    docs._csv.cache_clear()


def test_wall_time_is_the_last_training_invocations(tmp_path, monkeypatch):
    (tmp_path / "results" / "s").mkdir(parents=True)
    (tmp_path / "results" / "s" / "PROVENANCE.md").write_text(
        "- machine: vm, x86_64, 2 CPUs, python 3.11.7\n- wall time of this invocation: 900 s\n"
        "- machine: vm, x86_64, 4 CPUs, python 3.11.7\n- wall time of this invocation: 250 s\n- experiment: x (report only)\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    assert docs.wall_time("s") == "4 min 10 s on 4 CPUs"
    with pytest.raises(docs.DocsError, match="results/none/PROVENANCE.md records no wall time"):
        docs.wall_time("none")


def test_screened_names_the_rows_whose_lr_was_chosen_on_fewer_seeds_than_they_ran(tmp_path, monkeypatch):
    for setting, rows in (("a", "bn,3,3\nbnp,3,1\nbnp+agc,1,1\nln,n/a,n/a\ngn,3.0,3.0\n"), ("b", "bn,3,3\n")):
        (tmp_path / "results" / setting).mkdir(parents=True)
        (tmp_path / "results" / setting / "table.csv").write_text("norm,seeds,chosen_on\n" + rows)
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    docs._table.cache_clear()
    assert docs.screened("a", "b") == "bnp (1 of 3), bnp+agc (1 of 1) in a"  # n/a: no choice made
    assert docs.screened("b") == ""
    docs._table.cache_clear()


def test_evidence_names_seeds_choice_and_bracket(tmp_path, monkeypatch):
    (tmp_path / "results" / "a").mkdir(parents=True)
    (tmp_path / "results" / "a" / "table.csv").write_text(
        "norm,seeds,chosen_on,lr_bracket\nbn,3,3,interior\nbnp,3.0,1,edge*\nlars,1,1,interior\n")
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    docs._table.cache_clear()
    assert docs.evidence("a", "bn", "bnp") == "3 seeds, lr chosen on 1/3, lr interior except edge: bnp"
    assert docs.evidence("a", "lars") == "1 seed, lr chosen on 1, lr interior"
    assert docs.evidence("a", "bnp") == "3 seeds, lr chosen on 1, lr edge: bnp"
    (tmp_path / "results" / "b").mkdir()
    (tmp_path / "results" / "b" / "table.csv").write_text(
        "norm,batch_size,seeds,chosen_on,lr_bracket\nbn,8,3,3,interior\nbn,128,3,3,diverged-beyond\n")
    assert docs.evidence_over([("a", None), ("b", 8), ("b", 128)], ["bn"]) == \
        "3 seeds, lr chosen on 3, lr interior except diverged-beyond: bn at batch 128 in b"
    docs._table.cache_clear()
