"""`ferrolm demo` end to end, shortened: the embedded corpus (Python's standard library) and a user's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from ferrolm import Tokenizer
from ferrolm.cli import main as cli_main
from ferrolm.demo import run_demo, snippets, write_task

SHORT = dict(vocab_size=512, max_mb=1.0, pretrain_steps=40, finetune_epochs=3, per_class=120, device="cpu")


def test_demo_on_the_stdlib(tmp_path, capsys):
    results = run_demo(tmp_path, **SHORT)
    out = capsys.readouterr().out

    # tokenizer: saved in both formats, reloaded, exact round trip
    assert results["tokenizer"]["round_trip"] and results["tokenizer"]["formats_agree"]
    assert 2.0 < results["tokenizer"]["bytes_per_token"] < 6.0
    assert Tokenizer.from_pretrained(tmp_path / "tokenizer.json").vocab_size == 512
    # shards and pretraining: the validation loss visibly falls, the plot is written
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"]["val"]
    curve = results["pretrain"]["val_curve"]
    assert len(curve) >= 3 and curve[-1] < curve[0] - 1.0
    assert (tmp_path / "pretrain" / "loss.png").stat().st_size > 1000
    assert results["sample"].startswith("def __init__(self")
    # classification: four stdlib packages, evaluated on files the classifier never saw
    figures = results["evaluate"]
    assert figures["labels"] == ["asyncio", "email", "unittest", "xml"]
    assert sum(map(sum, figures["confusion"])) == figures["n"] > 0
    assert figures["accuracy"] > 0.45  # chance is 0.25; this short run reaches ~0.67
    assert (tmp_path / "classifier" / "classifier.json").is_file()
    # the summary names every stage's time and the outputs
    for stage in ("tokenizer", "shard", "pretrain", "generate", "finetune", "evaluate"):
        assert f"{stage} " in out.split("stage times")[1]
    assert "accuracy" in out and str(tmp_path) in out
    assert json.loads((tmp_path / "summary.json").read_text())["evaluate"]["n"] == figures["n"]
    # ... and lists every file the demo wrote (summary.json and task/*.jsonl were once missing)
    listed = [Path(p) for p in results["outputs"].values()]
    for entry in [*tmp_path.iterdir(), *(tmp_path / "task").iterdir()]:
        assert any(entry == p or entry in p.parents for p in listed), f"{entry} is not in the summary"
    for path in listed:
        assert path.exists() and str(path) in out.split("outputs")[-1]


def test_demo_cli_on_a_user_corpus_labels_by_directory(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    topics = {
        "cooking": "stir the onions in butter, add garlic and simmer the sauce for ten minutes",
        "sailing": "trim the mainsail, ease the jib sheet and tack across the wind to the harbour",
    }
    for topic, sentence in topics.items():
        (corpus / topic).mkdir(parents=True)
        for i in range(10):
            blocks = [f"{sentence} (note {i}.{j})" * 2 for j in range(12)]
            (corpus / topic / f"notes{i}.txt").write_text("\n\n".join(blocks))
    argv = ["demo", "--corpus", str(corpus), "--out", str(tmp_path / "out"), "--vocab-size", "300"]
    assert cli_main([*argv, "--steps", "10", "--epochs", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["evaluate"]["labels"] == ["cooking", "sailing"]
    assert summary["evaluate"]["accuracy"] == 1.0  # the topics share no words
    assert "fine-tune: which top-level directory does a snippet come from" in out


def test_demo_without_labels_skips_fine_tuning(tmp_path, capsys):
    corpus = tmp_path / "flat"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(
            f"document {i}: the quick brown fox jumps over the lazy dog.\n" * 50
        )
    assert (
        cli_main(
            [
                "demo",
                "--corpus",
                str(corpus),
                "--out",
                str(tmp_path / "out"),
                "--vocab-size",
                "300",
                "--steps",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "fine-tune: skipped" in out and "identical ids" in out
    assert cli_main(["demo", "--corpus", str(tmp_path / "missing")]) == 1


def test_snippets_and_task_split_by_file(tmp_path):
    text = "\n\n".join(f"block {i} " + "x" * 60 for i in range(10))
    found = snippets(text)
    assert all(160 <= len(s) <= 480 for s in found) and len(found) == 3
    paths = write_task(tmp_path / "task", None, per_class=20)
    assert paths is not None
    rows = {
        split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in paths.items()
    }
    assert {r["label"] for r in rows["train"]} == {"asyncio", "email", "unittest", "xml"}
    assert not {r["text"] for r in rows["test"]} & {r["text"] for r in rows["train"]}
