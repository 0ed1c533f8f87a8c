"""arch "bert" to and from transformers' BERT classes (RoBERTa's network, positions from 0, [CLS]).

Hugging Face models are built offline from a config with random weights (HF_HUB_OFFLINE=1); logits
within 1e-4 both ways.
"""

from __future__ import annotations

import json
import os
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from ferrolm import Tokenizer  # noqa: E402
from ferrolm.export import export_hf, export_run  # noqa: E402
from ferrolm.finetune import Classifier, FinetuneConfig, finetune  # noqa: E402
from ferrolm.model import GPT, GPTConfig  # noqa: E402

VOCAB, PAD = 101, 1
SPECIALS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def hf_config(**overrides) -> transformers.BertConfig:  # type: ignore[no-untyped-def]
    options = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, pad_token_id=PAD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertConfig(**{**options, **overrides})


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
def test_export_as_bert_for_masked_lm_and_back(tmp_path, tied: bool) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = GPTConfig.preset("tiny-bert", vocab_size=VOCAB, pad_id=PAD, mask_id=4, tie_embeddings=tied)
    model = perturbed(GPT(config), 1)
    export_hf(model, tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    assert hf.config.max_position_embeddings == 128  # BERT's positions start at 0, as ferrolm's
    idx = torch.randint(0, VOCAB, (2, 128))  # a [PAD] id inside a text changes nothing in BERT
    with torch.no_grad():
        ours, _ = model(idx)
        assert max_diff(ours, hf(idx).logits) < 1e-4
        assert max_diff(GPT.from_pretrained(tmp_path).eval()(idx)[0], ours) < 1e-6


def test_transformers_bert_imports_with_the_same_logits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    perturbed(transformers.BertForMaskedLM(hf_config()), 3).save_pretrained(tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.arch == "bert" and ours.config.block_size == 40
    idx = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        assert max_diff(ours(idx)[0], hf(idx).logits) < 1e-4


def test_bert_fine_tunes_and_exports_as_sequence_classification(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A BertForMaskedLM written by transformers: [CLS] text [SEP], pooled through a fresh pooler, exported
    as BertForSequenceClassification whose logits (with the exported tokenizer) equal ferrolm's."""
    rng = random.Random(0)
    words = {"pos": ["good", "great", "lovely"], "neg": ["bad", "awful", "dull"]}
    rows = [
        (f"the film was {rng.choice(words[y])}", y) for y in (rng.choice(["pos", "neg"]) for _ in range(160))
    ]
    for name, part in (("train.csv", rows[:120]), ("dev.csv", rows[120:])):
        (tmp_path / name).write_text(
            "sentence,label\n" + "".join(f"{t},{y}\n" for t, y in part), encoding="utf-8"
        )
    tokenizer = Tokenizer.train(iter([t for t, _ in rows]), 290, special_tokens=SPECIALS, show_progress=False)
    base = tmp_path / "bert"
    torch.manual_seed(0)
    transformers.BertForMaskedLM(hf_config(vocab_size=tokenizer.vocab_size)).save_pretrained(base)
    tokenizer.save(base / "tokenizer.json")
    out = tmp_path / "clf"
    summary = finetune(
        FinetuneConfig(
            model=str(base), train=str(tmp_path / "train.csv"), eval=str(tmp_path / "dev.csv"), out=str(out),
            epochs=4, lr=2e-3, batch_size=16, device="cpu", dropout=0.0, progress=False,
        )
    )  # fmt: skip
    assert summary["accuracy"] > 0.8
    assert json.loads((out / "classifier.json").read_text())["frame"] == {"prefix": [0], "suffix": [2]}
    hf_dir = export_run(out, tmp_path / "hf")
    hf = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    sample = ["the film was great", "the film was dull and awful, truly"]
    batch = hf_tokenizer(sample, padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[0] == 0 and hf_tokenizer.pad_token_id == PAD
    with torch.no_grad():
        theirs = torch.log_softmax(hf(**batch).logits, dim=-1)
    assert max_diff(Classifier.load(out).log_probs(sample), theirs) < 1e-4
