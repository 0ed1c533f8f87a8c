"""ferrolm.finetune and the finetune / evaluate / predict / export commands, on CPU with tiny models.

The task is made here: sentences from templates whose label is the polarity of one word ("the plot was
really dull" -> neg). A tiny GPT with random weights (exported to a Hugging Face directory) or a few
steps of pretraining learns it in seconds.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ferrolm.finetune as finetune_module  # noqa: E402
from ferrolm import FerrolmError, Tokenizer  # noqa: E402
from ferrolm.cli import main  # noqa: E402
from ferrolm.export import export_hf, export_run  # noqa: E402
from ferrolm.finetune import (  # noqa: E402
    Classifier,
    FinetuneConfig,
    SequenceClassifier,
    classification_metrics,
    epoch_order,
    evaluate,
    finetune,
    pad_batch,
    predict,
    rank_loss,
    rank_slice,
    read_examples,
)
from ferrolm.model import GPT, GPTConfig  # noqa: E402

POSITIVE = ["good", "great", "wonderful", "superb", "delightful", "brilliant", "lovely", "excellent"]
NEGATIVE = ["bad", "awful", "terrible", "dreadful", "boring", "horrible", "poor", "dull"]
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the ending", "the story", "the music"]
ADVERBS = ["really", "truly", "quite", "very", "somewhat", "rather", "so", "honestly", "at times"]
FAST = dict(lr=1e-3, batch_size=16, device="cpu", dropout=0.0, progress=False)


def sentiment(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        rows.append((f"{rng.choice(SUBJECTS)} was {rng.choice(ADVERBS)} {word}", label))
    return rows


def write_csv(path: Path, rows, header=("sentence", "label"), delimiter=",") -> Path:  # type: ignore[no-untyped-def]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records) -> Path:  # type: ignore[no-untyped-def]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """train/dev/test CSVs, a tokenizer trained on the task's words, tiny random GPT-2 and Llama HF dirs."""
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = Tokenizer.train(iter([t for t, _ in sentiment(400, 0)]), 320, show_progress=False)
    tokenizer.save(root / "tokenizer.json")
    paths = {
        "root": root,
        "train": write_csv(root / "train.csv", sentiment(400, 1)),
        "dev": write_csv(root / "dev.csv", sentiment(100, 2)),
        "test": write_csv(root / "test.csv", sentiment(200, 3)),
    }
    for preset in ("tiny", "tiny-llama"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(preset, vocab_size=tokenizer.vocab_size))
        paths[preset] = export_hf(model, root / preset, tokenizer_file=root / "tokenizer.json")
    return paths


@pytest.fixture(scope="module")
def classifier(task) -> Path:  # type: ignore[no-untyped-def]
    """A classifier fine-tuned from the random tiny GPT-2 (3 epochs, about a second)."""
    out = task["root"] / "classifier"
    finetune(
        FinetuneConfig(
            model=str(task["tiny"]), train=str(task["train"]), eval=str(task["dev"]), out=str(out), **FAST
        )
    )
    return out


def test_finetune_learns_and_writes_its_run(task, classifier) -> None:  # type: ignore[no-untyped-def]
    result = evaluate(classifier, task["test"])
    assert result["accuracy"] > 0.9 and result["macro_f1"] > 0.9  # chance is 0.5
    assert result["n"] == 200 and result["labels"] == ["neg", "pos"]
    meta = json.loads((classifier / "classifier.json").read_text())
    assert meta["labels"] == ["neg", "pos"] and meta["num_labels"] == 2
    assert meta["id2label"] == {"0": "neg", "1": "pos"} and meta["label2id"] == {"neg": 0, "pos": 1}
    assert meta["pad_token_id"] == Tokenizer.from_pretrained(task["tiny"]).eot_token
    assert meta["max_length"] == 128 and meta["source_model"] == str(task["tiny"])
    assert {"accuracy", "macro_f1", "loss", "confusion"} <= set(meta["metrics"])
    files = {p.name for p in classifier.iterdir()}
    assert files == {"classifier.json", meta["weights"], "tokenizer.json", "metrics.jsonl"}
    records = [json.loads(line) for line in (classifier / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    with pytest.raises(FerrolmError, match="already holds a fine-tuned classifier"):
        finetune(FinetuneConfig(model=str(task["tiny"]), train=str(task["train"]), eval=str(task["dev"]),
                                out=str(classifier), **FAST))  # fmt: skip


def test_best_epoch_is_kept_ties_go_to_the_lower_loss(task, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Scores are overridden so that epoch 2 is best by accuracy, then all tie (lowest loss wins);
    the classifier kept must reproduce that epoch's real eval loss."""
    real_score = finetune_module._score
    for accuracies in ([0.5, 0.9, 0.7], [0.8, 0.8, 0.8]):
        seen = []

        def fake_score(log_probs, label_ids, accuracies=accuracies, seen=seen):  # type: ignore[no-untyped-def]
            result = real_score(log_probs, label_ids)
            seen.append(result["loss"])
            return {**result, "accuracy": accuracies[len(seen) - 1]}

        out = task["root"] / f"best-{accuracies[0]}"
        monkeypatch.setattr(finetune_module, "_score", fake_score)
        summary = finetune(
            FinetuneConfig(
                model=str(task["tiny"]), train=str(task["train"]), eval=str(task["dev"]), out=str(out), **FAST
            )
        )
        monkeypatch.setattr(finetune_module, "_score", real_score)
        expected = 2 if accuracies[0] == 0.5 else 1 + min(range(3), key=lambda e: seen[e])
        assert summary["best_epoch"] == expected
        meta = json.loads((out / "classifier.json").read_text())
        assert meta["epoch"] == expected and meta["weights"] == f"model-epoch-{expected:03d}.safetensors"
        assert evaluate(out, task["dev"])["loss"] == pytest.approx(seen[expected - 1], abs=1e-6)
        assert [p.name for p in out.glob("model-epoch-*")] == [meta["weights"]]  # older bests removed


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_tsv_jsonl_int_labels_from_a_pretrained_run(task, objective) -> None:  # type: ignore[no-untyped-def]
    """A ferrolm pretrain run as the backbone (a GPT, or a masked-LM encoder); JSON lines with integer
    labels for training, a TSV for eval; integer labels sort numerically and come back as ints."""
    from ferrolm.data import shard_corpus
    from ferrolm.train import TrainConfig, pretrain

    root = task["root"] / objective
    root.mkdir()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(t for t, _ in sentiment(300, 4)) + "\n")
    shard_corpus(str(corpus), root / "shards", str(task["root"] / "tokenizer.json"), val_fraction=0.0, show_progress=False)  # fmt: skip
    pretrain(TrainConfig(data=str(root / "shards"), out=str(root / "run"), max_steps=3, batch_size=4, grad_accum=1, seq_len=32, objective=objective, progress=False))  # fmt: skip

    code = {"neg": 10, "pos": 2}  # 2 < 10 numerically, "10" < "2" as strings
    train = write_jsonl(root / "train.jsonl", [{"text": t, "y": code[y]} for t, y in sentiment(300, 5)])
    dev = write_csv(root / "dev.tsv", [(t, code[y]) for t, y in sentiment(60, 6)], ("text", "y"), "\t")
    out = root / "ft"
    summary = finetune(
        FinetuneConfig(
            model=str(root / "run"), train=str(train), eval=str(dev), out=str(out),
            text_column="text", label_column="y", epochs=2, **FAST,
        )
    )  # fmt: skip
    assert summary["labels"] == [2, 10]
    clf = Classifier.load(out)
    assert clf.labels == [2, 10] and json.loads((out / "classifier.json").read_text())["label2id"] == {
        "2": 0,
        "10": 1,
    }
    [(label, probability)] = clf.predict(["the acting was very superb"])
    assert label in (2, 10) and isinstance(label, int) and 0 < probability <= 1
    # The classifier remembers its columns; a CSV test file with the labels spelled as text maps too.
    test = write_csv(root / "test.csv", [(t, code[y]) for t, y in sentiment(100, 7)], ("text", "y"))
    assert evaluate(out, test)["accuracy"] > 0.75
    if objective == "mlm":  # Hugging Face has no class for it
        with pytest.raises(FerrolmError, match="masked-LM encoders have no Hugging Face"):
            export_run(out, root / "hf")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "encoder"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_padded_batch_gives_each_text_its_own_logits(preset: str, causal: bool) -> None:
    """Right padding changes nothing: causally the last token never sees the pads; an encoder gets the
    pads as a separate document."""
    torch.manual_seed(0)
    model = SequenceClassifier(GPT(GPTConfig.preset(preset, vocab_size=101, causal=causal)), 3).eval()
    texts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    idx, lengths = pad_batch(texts, 0, torch.device("cpu"))
    with torch.no_grad():
        batched = model(idx, lengths)  # (3, 3)
        for row, text in enumerate(texts):
            alone = model(torch.tensor([text]), torch.tensor([len(text)]))  # (1, 3)
            assert (batched[row] - alone[0]).abs().max().item() < 1e-5


def test_ranks_split_each_global_batch_and_their_losses_sum_to_its_mean() -> None:
    order = epoch_order(50, seed=3, epoch=1)
    assert sorted(order) == list(range(50)) and order == epoch_order(50, seed=3, epoch=1)
    assert order != epoch_order(50, seed=3, epoch=2)
    batch = order[:7]
    slices = [rank_slice(batch, r, 3) for r in range(3)]
    assert [len(s) for s in slices] == [2, 2, 3] and [
        i for s in slices for i in s
    ] == batch  # contiguous, complete

    torch.manual_seed(0)
    model = SequenceClassifier(GPT(GPTConfig.preset("tiny", vocab_size=101)), 2)
    rng = random.Random(0)
    x = [[rng.randrange(1, 101) for _ in range(rng.randint(1, 9))] for _ in range(50)]
    y = [rng.randrange(2) for _ in range(50)]
    whole, _ = rank_loss(model, [x[i] for i in batch], [y[i] for i in batch], len(batch), 0)
    whole.backward()
    expected_grad = model.score.weight.grad.clone()
    model.zero_grad()
    parts = []
    for rows in slices:
        part, _ = rank_loss(model, [x[i] for i in rows], [y[i] for i in rows], len(batch), 0)
        part.backward()  # gradients accumulate: the sum an all-reduce would form
        parts.append(float(part.detach()))
    assert sum(parts) == pytest.approx(float(whole.detach()), rel=1e-5)
    assert torch.allclose(model.score.weight.grad, expected_grad, atol=1e-6)


def reference_macro_f1(true: list[int], predicted: list[int]) -> float:
    """Per-label precision and recall, F1 = 2PR / (P + R) (0 when P + R = 0), over the labels seen."""
    scores = []
    for label in sorted(set(true) | set(predicted)):
        pairs = list(zip(true, predicted, strict=True))
        tp = sum(1 for t, p in pairs if t == label and p == label)
        predicted_n = sum(1 for p in predicted if p == label)
        true_n = sum(1 for t in true if t == label)
        precision = tp / predicted_n if predicted_n else 0.0
        recall = tp / true_n if true_n else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60))
def test_metrics_equal_a_pure_python_reference(pairs) -> None:  # type: ignore[no-untyped-def]
    true, predicted = [t for t, _ in pairs], [p for _, p in pairs]
    metrics = classification_metrics(true, predicted, 5)
    assert metrics["accuracy"] == sum(t == p for t, p in pairs) / len(pairs)
    assert metrics["macro_f1"] == pytest.approx(reference_macro_f1(true, predicted), abs=1e-12)
    assert sum(map(sum, metrics["confusion"])) == len(pairs)
    assert all(metrics["confusion"][t][p] == pairs.count((t, p)) for t in range(5) for p in range(5))


def test_evaluate_equals_a_hand_computation(task, classifier) -> None:  # type: ignore[no-untyped-def]
    clf = Classifier.load(classifier)
    rows = list(csv.reader(open(task["test"], encoding="utf-8")))[1:]
    log_probs = clf.log_probs([text for text, _ in rows])  # (N, 2)
    true = [clf.labels.index(label) for _, label in rows]
    predicted = [max(range(2), key=lambda k: log_probs[i, k].item()) for i in range(len(rows))]
    result = clf.evaluate(task["test"])
    assert result["accuracy"] == sum(t == p for t, p in zip(true, predicted, strict=True)) / len(rows)
    assert result["macro_f1"] == pytest.approx(reference_macro_f1(true, predicted), abs=1e-12)
    assert result["loss"] == pytest.approx(
        -sum(log_probs[i, t].item() for i, t in enumerate(true)) / len(rows), rel=1e-5
    )
    assert result["confusion"] == [[sum(1 for t, p in zip(true, predicted, strict=True) if (t, p) == (a, b)) for b in range(2)] for a in range(2)]  # fmt: skip
    # predict agrees with the log-probabilities, and with the module-level function.
    [(label, probability)] = predict(classifier, [rows[0][0]])
    assert label == clf.labels[predicted[0]] and probability == pytest.approx(log_probs[0].exp().max().item())


def test_cli_finetune_evaluate_predict(task, classifier, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cli"
    args = [
        "finetune",
        "--model",
        str(task["tiny"]),
        "--train",
        str(task["train"]),
        "--eval",
        str(task["dev"]),
    ]
    assert (
        main([*args, "--out", str(out), "--epochs", "1", "--lr", "1e-3", "--device", "cpu", "--quiet"]) == 0
    )
    assert "best epoch 1/1" in capsys.readouterr().out
    assert json.loads((out / "classifier.json").read_text())["finetune_config"]["lr"] == 1e-3

    assert main(["evaluate", str(classifier), "--data", str(task["test"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert {"accuracy", "macro_f1", "confusion"} <= set(result) and result["labels"] == ["neg", "pos"]
    direct = evaluate(classifier, task["test"])
    assert result["confusion"] == direct["confusion"] and result["loss"] == pytest.approx(direct["loss"])
    assert main(["evaluate", str(classifier), "--data", str(task["test"])]) == 0
    printed = capsys.readouterr().out
    assert (
        f"accuracy  {result['accuracy']:.4f}" in printed and "macro-F1" in printed and "confusion" in printed
    )

    texts = task["root"] / "texts.txt"
    texts.write_text("the movie was truly lovely\n\nthe plot was very horrible\n")
    assert (
        main(["predict", str(classifier), "--text", "the music was so excellent", "--file", str(texts)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["pos", "pos", "neg"]
    assert all(0 < float(line.split("\t")[1]) <= 1 for line in lines)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_export_matches_transformers_sequence_classification(task, classifier, preset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    run = classifier
    if preset == "tiny-llama":
        run = tmp_path / "llama"
        finetune(FinetuneConfig(model=str(task[preset]), train=str(task["train"]), eval=str(task["dev"]),
                                out=str(run), epochs=1, **FAST))  # fmt: skip
    hf_dir = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(hf_dir)]) == 0  # a classifier run: detected
    hf_class = {"tiny": "GPT2ForSequenceClassification", "tiny-llama": "LlamaForSequenceClassification"}[
        preset
    ]
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == [hf_class] and config["num_labels"] == 2
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    hf = getattr(transformers, hf_class).from_pretrained(hf_dir).eval()
    assert hf.config.pad_token_id == json.loads((run / "classifier.json").read_text())["pad_token_id"]

    clf = Classifier.load(run)
    texts = ["the plot was at times brilliant", "dull", "the ending was rather good but the music was poor"]
    ids = clf.tokenizer.encode_ordinary_batch(texts)
    idx, lengths = pad_batch(ids, hf.config.pad_token_id, torch.device("cpu"))  # (3, T): varied lengths
    mask = (torch.arange(idx.shape[1])[None] < lengths[:, None]).long()
    with torch.no_grad():
        ours = clf.model(idx, lengths)  # (3, 2)
        assert (ours - hf(idx).logits).abs().max().item() < 1e-4
        assert (ours - hf(idx, attention_mask=mask).logits).abs().max().item() < 1e-4
    # AutoTokenizer pads with the same token and id, so an HF user's padded batch gives the same logits.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tokenizer.pad_token == "<|endoftext|>"
    assert hf_tokenizer.pad_token_id == hf.config.pad_token_id
    encoded = hf_tokenizer(texts, padding=True, return_tensors="pt")
    assert encoded["input_ids"].tolist() == idx.tolist()


def test_reading_errors_name_the_file_line_and_column(task, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def fails(name: str, content: str, match: str, **columns) -> None:  # type: ignore[no-untyped-def]
        path = tmp_path / name
        path.write_text(content, encoding="utf-8")
        with pytest.raises(FerrolmError, match=match):
            read_examples(path, **columns)

    fails("a.csv", "text,label\nhi,pos\n", r"a.csv:2: no column 'sentence' \(columns: 'text', 'label'\)")
    fails("b.jsonl", '{"sentence": "hi"}\n', r"b.jsonl:1: no column 'label' \(columns: 'sentence'\)")
    fails("c.csv", "", r"c.csv: no examples \(the file is empty\)")
    fails("d.tsv", "sentence\tlabel\n", r"d.tsv: no examples \(the file is empty but for its header\)")
    fails(
        "e.jsonl",
        '{"sentence": "a", "label": 1}\n{"sentence": "b", label: 2}\n',
        r"e.jsonl:2: not valid JSON",
    )
    fails("f.csv", 'sentence,label\nok,pos\n"  ",neg\n', r"f.csv:3: column 'sentence' is empty")
    fails(
        "g.csv",
        'sentence,label\n"two\nlines",pos\nthree,fields,here\n',
        r"g.csv:4: 3 fields, the header has 2",
    )
    fails("h.jsonl", '{"sentence": "x", "label": 1.5}\n', r"h.jsonl:1: column 'label' must be a non-empty string or an integer")  # fmt: skip
    fails("i.jsonl", '["sentence", "label"]\n', r"i.jsonl:1: expected a JSON object")
    fails("j.txt", "x", r"unknown data format '.txt'")
    (tmp_path / "k.csv").write_bytes(b"sentence,label\nok,pos\n\xff\xfe,neg\n")
    with pytest.raises(FerrolmError, match=r"k.csv:3: not valid UTF-8"):
        read_examples(tmp_path / "k.csv")


def test_finetune_and_evaluate_errors(task, classifier, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    unknown = write_csv(tmp_path / "unknown.csv", [("the film was good", "pos"), ("meh", "neutral")])
    with pytest.raises(FerrolmError, match=r"unknown.csv:3: label 'neutral' is not one the classifier knows \('neg', 'pos'\)"):  # fmt: skip
        evaluate(classifier, unknown)
    common = dict(model=str(task["tiny"]), train=str(task["train"]), out=str(tmp_path / "x"), **FAST)
    with pytest.raises(FerrolmError, match=r"unknown\.csv:3: label 'neutral'"):
        finetune(FinetuneConfig(eval=str(unknown), **common))
    one = write_csv(tmp_path / "one.csv", [("good", "pos"), ("great", "pos")])
    with pytest.raises(FerrolmError, match="needs at least 2 distinct labels"):
        finetune(FinetuneConfig(**{**common, "train": str(one)}, eval=str(task["dev"])))
    with pytest.raises(FerrolmError, match="max_length 500 exceeds the model's context of 128"):
        finetune(FinetuneConfig(eval=str(task["dev"]), max_length=500, **common))
    with pytest.raises(FerrolmError, match="is a fine-tuned classifier"):
        finetune(FinetuneConfig(**{**common, "model": str(classifier)}, eval=str(task["dev"])))
    with pytest.raises(FerrolmError, match=r"eval \(a labelled file scored each epoch\) is required"):
        finetune(FinetuneConfig(**common))
    with pytest.raises(FerrolmError, match="text 1 is empty"):
        predict(classifier, ["fine", " "])
    # The command line: one line, no traceback.
    assert main(["evaluate", str(classifier), "--data", str(unknown)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ferrolm: error: ") and "label 'neutral'" in err and err.count("\n") == 1
    assert main(["predict", str(tmp_path), "--text", "hi"]) == 1
    assert "no classifier.json" in capsys.readouterr().err
    # A corrupted weights file is detected before it is used.
    meta = json.loads((classifier / "classifier.json").read_text())
    copy = tmp_path / "corrupt"
    copy.mkdir()
    for p in classifier.iterdir():
        copy.joinpath(p.name).write_bytes(p.read_bytes())
    data = bytearray((copy / meta["weights"]).read_bytes())
    data[-1] ^= 0xFF
    (copy / meta["weights"]).write_bytes(bytes(data))
    with pytest.raises(FerrolmError, match="corrupt"):
        Classifier.load(copy)


# Any text but NUL (which CSV files cannot hold) and lone surrogates (which UTF-8 cannot encode).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1).filter(
    lambda t: t.strip()
)
STRING_LABELS = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1
).filter(lambda t: not t.lstrip("-").isdigit())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(TEXT, st.one_of(STRING_LABELS, st.integers(-(10**12), 10**12))), min_size=1, max_size=8
    ),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]),
    int_labels=st.booleans(),
)
@example(
    rows=[('say "hi",\tthen\r\nbye', "a,b"), ("line\u2028sep\x85", "c\td")], suffix=".jsonl", int_labels=False
)
@example(
    rows=[('say "hi",\tthen\r\nbye', "a,b"), ("line\u2028sep\x85", "c\td")], suffix=".csv", int_labels=False
)
@example(rows=[('"quoted"', 3), ("\ttab first", -12)], suffix=".tsv", int_labels=True)
def test_reader_round_trips_what_standard_writers_write(tmp_path_factory, rows, suffix, int_labels) -> None:  # type: ignore[no-untyped-def]
    rows = [(text, (label if isinstance(label, int) else len(label)) if int_labels else str(label)) for text, label in rows]  # fmt: skip
    if not int_labels and all(finetune_module._as_int(label) is not None for _, label in rows):
        rows.append(("a text", "a label"))  # strings that all spell integers are read as integers
    path = tmp_path_factory.mktemp("rt") / f"data{suffix}"
    if suffix in (".jsonl", ".json"):
        write_jsonl(path, [{"sentence": text, "label": label, "extra": [1]} for text, label in rows])
    else:
        write_csv(path, rows, delimiter="," if suffix == ".csv" else "\t")
    assert [(e.text, e.label) for e in read_examples(path)] == rows
