"""The BERT path: a RoBERTa-style encoder (arch "roberta") to and from transformers' RoBERTa classes.

Every Hugging Face model here is built offline from a config with random weights (HF_HUB_OFFLINE=1);
the parity bound is the issue's: logits within 1e-4, both ways.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from ferrolm import FerrolmError, Tokenizer  # noqa: E402
from ferrolm.archs import ARCHS  # noqa: E402
from ferrolm.export import export_hf, export_run  # noqa: E402
from ferrolm.finetune import Classifier, FinetuneConfig, SequenceClassifier, finetune, pad_batch  # noqa: E402
from ferrolm.model import GPT, GPTConfig  # noqa: E402

VOCAB = 101  # not a multiple of 64: the vocabulary padding is cropped on export, restored on import
PAD, MASK = 1, 4  # RoBERTa's <pad> id; <mask> as a ferrolm tokenizer trained with RoBERTa's specials has it
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
WORDS = ["good", "great", "lovely", "superb", "bad", "awful", "dull", "poor"]


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (LayerNorm gains off 1, biases off 0): a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def ferrolm_roberta(**overrides) -> GPT:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny-roberta", vocab_size=VOCAB, pad_id=PAD, mask_id=MASK, **overrides)
    return perturbed(GPT(config), 1)  # type: ignore[return-value]


def hf_roberta_config(**overrides) -> transformers.RobertaConfig:  # type: ignore[no-untyped-def]
    options = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, pad_token_id=PAD, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.RobertaConfig(**{**options, **overrides})


def ids_without_pad(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Token ids other than <pad> (Hugging Face's RoBERTa gives a <pad> inside a text no position)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(PAD + 1, VOCAB, shape, generator=generator)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_spec_table_names_what_each_arch_builds() -> None:
    """The RoBERTa spec is what the model builds: post-norm (no final norm), embedding norm, token type,
    the MLM head with a bias; and an encoder-only arch refuses causal=True."""
    assert ARCHS["roberta"].norm_placement == "post" and ARCHS["gpt2"].norm_placement == "pre"
    model = ferrolm_roberta()
    assert "ln_f" not in model.transformer and "ln_e" in model.transformer and "wtt" in model.transformer
    assert model.lm_transform is not None and model.lm_head.bias is not None
    assert model.config.padded_vocab_size == 128  # <mask> is a tokenizer id: no extra row needed
    assert GPTConfig.preset("tiny-roberta", vocab_size=VOCAB).mask_token_id == VOCAB  # no <mask>: a row
    with pytest.raises(FerrolmError, match="is an encoder"):
        GPTConfig.preset("tiny-roberta", vocab_size=VOCAB, causal=True)
    with pytest.raises(FerrolmError, match="pad_id must be a token id below vocab_size"):
        GPTConfig.preset("tiny-roberta", vocab_size=VOCAB, pad_id=VOCAB)


@pytest.mark.parametrize("tied", [True, False])
def test_export_as_roberta_for_masked_lm_and_back(tmp_path, tied: bool) -> None:  # type: ignore[no-untyped-def]
    model = ferrolm_roberta(tie_embeddings=tied)
    export_hf(model, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == ["RobertaForMaskedLM"] and hf_config["pad_token_id"] == PAD
    assert hf_config["max_position_embeddings"] == 128 + PAD + 1  # RoBERTa counts from pad + 1
    hf = transformers.RobertaForMaskedLM.from_pretrained(tmp_path).eval()
    idx = ids_without_pad((2, 128))  # the whole context: every position row is checked
    with torch.no_grad():
        ours, _ = model(idx)
        assert max_diff(ours, hf(idx).logits) < 1e-4
        back = GPT.from_pretrained(tmp_path).eval()
        assert back.config.arch == "roberta" and back.config.pad_id == PAD and back.config.block_size == 128
        assert max_diff(back(idx)[0], ours) < 1e-6


def test_transformers_roberta_checkpoint_imports_with_the_same_logits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What transformers writes (type_vocab_size 2, eps 1e-12, position rows before pad + 1) reads in;
    padded rows with an attention mask: each real token's logits agree."""
    torch.manual_seed(2)
    perturbed(transformers.RobertaForMaskedLM(hf_roberta_config()), 3).save_pretrained(tmp_path)
    hf = transformers.RobertaForMaskedLM.from_pretrained(tmp_path).eval()
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.block_size == 40 - PAD - 1 and ours.config.norm_eps == 1e-12
    idx = ids_without_pad((3, 38), seed=4)
    with torch.no_grad():
        assert max_diff(ours(idx)[0], hf(idx).logits) < 1e-4
        lengths = torch.tensor([38, 20, 5])
        padded = idx.clone()
        for row, n in enumerate(lengths.tolist()):
            padded[row, n:] = PAD
        attention_mask = (padded != PAD).long()
        theirs = hf(padded, attention_mask=attention_mask).logits
        for row, n in enumerate(lengths.tolist()):
            alone, _ = ours(idx[row : row + 1, :n])
            assert max_diff(alone[0], theirs[row, :n]) < 1e-4


def test_unsupported_roberta_configs_are_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(hf_roberta_config(hidden_act="relu")).save_pretrained(tmp_path)
    with pytest.raises(FerrolmError, match=r"config\.json: hidden_act='relu' is not supported"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(FerrolmError, match="needs pad_id"):
        export_hf(GPT(GPTConfig.preset("tiny-roberta", vocab_size=VOCAB)), tmp_path / "out")
    with pytest.raises(
        FerrolmError, match="masked-LM encoders have no Hugging Face equivalent in arch 'gpt2'"
    ):
        export_hf(GPT(GPTConfig.preset("tiny", vocab_size=VOCAB, causal=False)), tmp_path / "out")


def test_first_token_pooling_ignores_padding() -> None:
    """RoBERTa's head reads <s>; pads are a document of their own, so a text's logits do not depend on
    its batch."""
    torch.manual_seed(0)
    model = SequenceClassifier(ferrolm_roberta(), 3).eval()
    assert set(model.head_weights()) == {"pool.weight", "pool.bias", "score.weight", "score.bias"}
    texts = [[0, 6, 7, 8, 9, 10, 2], [0, 12, 2], [0, 13, 14, 15, 2]]
    with torch.no_grad():
        idx, lengths = pad_batch(texts, PAD, torch.device("cpu"))
        together = model(idx, lengths)
        for row, text in enumerate(texts):
            alone = model(torch.tensor([text]), torch.tensor([len(text)]))
            assert max_diff(together[row : row + 1], alone) < 1e-5


def sentiment(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        rows.append((f"the film was {rng.choice(['very', 'so', 'quite'])} {word}", "pos" if WORDS.index(word) < 4 else "neg"))  # fmt: skip
    return rows


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("sentence,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    return path


def test_transformers_roberta_fine_tunes_and_exports_as_sequence_classification(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A RobertaForMaskedLM made by transformers (save_pretrained) + a byte-level BPE tokenizer with
    RoBERTa's special tokens: ferrolm fine-tunes it (texts framed <s> ... </s>, pooled on <s>), exports
    RobertaForSequenceClassification, and transformers' class and tokenizer give the same logits."""
    texts = [t for t, _ in sentiment(200, 0)]
    tokenizer = Tokenizer.train(iter(texts), 300, special_tokens=ROBERTA_SPECIALS, show_progress=False)
    base = tmp_path / "roberta"
    torch.manual_seed(0)
    hf_config = hf_roberta_config(vocab_size=tokenizer.vocab_size, bos_token_id=0, eos_token_id=2)
    transformers.RobertaForMaskedLM(hf_config).save_pretrained(base)
    tokenizer.save(base / "tokenizer.json")

    out = tmp_path / "clf"
    summary = finetune(
        FinetuneConfig(
            model=str(base), train=str(write_csv(tmp_path / "train.csv", sentiment(200, 1))),
            eval=str(write_csv(tmp_path / "dev.csv", sentiment(40, 2))), out=str(out), epochs=4, lr=2e-3,
            batch_size=16, device="cpu", dropout=0.0, progress=False,
        )
    )  # fmt: skip
    assert summary["accuracy"] > 0.8  # chance is 0.5: the pooled <s> learned the task
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["frame"] == {"prefix": [0], "suffix": [2]} and meta["pad_token_id"] == PAD
    classifier = Classifier.load(out)

    hf_dir = export_run(out, tmp_path / "hf")
    hf = transformers.RobertaForSequenceClassification.from_pretrained(hf_dir).eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"} and hf.config.pad_token_id == PAD
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    sample = ["the film was so superb", "the film was dull", "the film was quite lovely and not bad at all"]
    batch = hf_tokenizer(sample, padding=True, return_tensors="pt")
    ids = [[0, *tokenizer.encode_ordinary(t), 2] for t in sample]
    assert [row[: len(i)] for row, i in zip(batch["input_ids"].tolist(), ids, strict=True)] == ids
    with torch.no_grad():
        theirs = torch.log_softmax(hf(**batch).logits, dim=-1)
    assert max_diff(classifier.log_probs(sample), theirs) < 1e-4


def test_mlm_pretraining_run_exports_and_a_tokenizer_without_mask_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ferrolm.data import shard_corpus
    from ferrolm.train import TrainConfig, pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t for t, _ in sentiment(200, 5)) + "\n", encoding="utf-8")
    for name, specials in (("roberta", ROBERTA_SPECIALS), ("plain", ["<|endoftext|>"])):
        tok = Tokenizer.train([str(corpus)], 300, special_tokens=specials, show_progress=False)
        tok.save(tmp_path / f"{name}.json")
        shard_corpus(str(corpus), tmp_path / f"shards-{name}", str(tmp_path / f"{name}.json"), val_fraction=0.0, show_progress=False)  # fmt: skip
    options = dict(
        preset="tiny-roberta", objective="mlm", max_steps=2, batch_size=4, seq_len=32, progress=False
    )
    with pytest.raises(FerrolmError, match="needs a tokenizer with <mask> and <pad>"):
        pretrain(TrainConfig(data=str(tmp_path / "shards-plain"), out=str(tmp_path / "run-plain"), **options))
    run = tmp_path / "run"
    pretrain(TrainConfig(data=str(tmp_path / "shards-roberta"), out=str(run), **options))
    hf_dir = export_run(run, tmp_path / "hf")
    from ferrolm.train import load_model

    model = load_model(run)
    assert model.config.mask_id == 4 and model.config.pad_id == 1  # the tokenizer's <mask> and <pad>
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "RobertaForMaskedLM"
    idx = torch.tensor([[0, *Tokenizer.from_pretrained(hf_dir).encode_ordinary("the film was very good"), 2]])
    with torch.no_grad():
        assert max_diff(model(idx)[0], hf(idx).logits) < 1e-4
