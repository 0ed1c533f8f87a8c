"""`ferrolm demo` end to end on a shortened embedded corpus (Python's standard library)."""

from __future__ import annotations

import json

from ferrolm import Tokenizer
from ferrolm.cli import main as cli_main
from ferrolm.demo import run_demo


def test_demo_on_the_stdlib(tmp_path, capsys):
    results = run_demo(out=tmp_path, vocab_size=600, max_mb=1.0)
    assert results["round_trip"] and results["formats_agree"]
    assert 2.0 < results["bytes_per_token"] < 6.0
    tok = Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 600
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert "round trip         exact" in capsys.readouterr().out


def test_demo_cli_with_a_user_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(
            f"document {i}: the quick brown fox jumps over the lazy dog.\n" * 50
        )
    assert (
        cli_main(["demo", "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--vocab-size", "300"])
        == 0
    )
    assert "identical ids" in capsys.readouterr().out
    assert cli_main(["demo", "--corpus", str(tmp_path / "missing")]) == 1
