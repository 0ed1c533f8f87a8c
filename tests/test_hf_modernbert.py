"""The modern encoder path: arch "modernbert" (pre-norm, RoPE, GeGLU) to and from transformers' ModernBERT.

Hugging Face models are built offline from a config with random weights (HF_HUB_OFFLINE=1); logits
within 1e-4 both ways. Only global attention maps (ferrolm has no sliding-window layers).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# find_spec, not hasattr(transformers, ...): importing ModernBERT's modeling module at collection time
# loads transformers' hub-kernel machinery, after which the Triton interpreter tests of
# test_attention.py fail ("Cannot call @triton.jit'd outside of the scope of a kernel").
if importlib.util.find_spec("transformers.models.modernbert") is None:
    pytest.skip("this transformers has no ModernBERT", allow_module_level=True)
os.environ["HF_HUB_OFFLINE"] = "1"

from ferrolm import FerrolmError, Tokenizer  # noqa: E402
from ferrolm.export import export_hf, export_run  # noqa: E402
from ferrolm.finetune import Classifier, FinetuneConfig, finetune  # noqa: E402
from ferrolm.model import GPT, GPTConfig  # noqa: E402

VOCAB, PAD, MASK = 101, 1, 4
SPECIALS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]  # ModernBERT's (BERT's) special tokens


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (norm gains off 1, biases off 0): a wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def hf_config(**overrides) -> transformers.ModernBertConfig:  # type: ignore[no-untyped-def]
    options = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, global_attn_every_n_layers=1, pad_token_id=PAD, bos_token_id=0,
        eos_token_id=2, cls_token_id=0, sep_token_id=2,
    )  # fmt: skip
    return transformers.ModernBertConfig(**{**options, **overrides})


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("tied", [True, False])
def test_export_as_modernbert_for_masked_lm_and_back(tmp_path, tied: bool) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    config = GPTConfig.preset(
        "tiny-modernbert", vocab_size=VOCAB, pad_id=PAD, mask_id=MASK, tie_embeddings=tied
    )
    model = perturbed(GPT(config), 1)
    assert not list(model.transformer.h[0].ln_1.parameters())  # block 0 has no attention norm
    export_hf(model, tmp_path)
    hf = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path).eval()
    assert hf.config.layer_types == ["full_attention"] * 2
    idx = torch.randint(PAD + 1, VOCAB, (2, 128))
    with torch.no_grad():
        ours, _ = model(idx)
        assert max_diff(ours, hf(idx).logits) < 1e-4
        assert max_diff(GPT.from_pretrained(tmp_path).eval()(idx)[0], ours) < 1e-6


def test_transformers_modernbert_imports_and_sliding_windows_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    perturbed(transformers.ModernBertForMaskedLM(hf_config()), 3).save_pretrained(tmp_path / "global")
    hf = transformers.ModernBertForMaskedLM.from_pretrained(tmp_path / "global").eval()
    ours = GPT.from_pretrained(tmp_path / "global").eval()
    assert ours.config.rope_theta == 160000.0 and ours.config.block_size == 64
    idx = torch.randint(PAD + 1, VOCAB, (2, 64))
    with torch.no_grad():
        assert max_diff(ours(idx)[0], hf(idx).logits) < 1e-4
    transformers.ModernBertForMaskedLM(hf_config(global_attn_every_n_layers=3)).save_pretrained(
        tmp_path / "local"
    )
    with pytest.raises(FerrolmError, match=r"sliding-window attention layers .* are not supported"):
        GPT.from_pretrained(tmp_path / "local")


def test_modernbert_fine_tunes_and_exports_as_sequence_classification(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """[CLS] text [SEP], padded with [PAD], pooled on [CLS] through ModernBERT's head (dense, GELU,
    norm, classifier); transformers' class and the exported tokenizer give the same logits."""
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
    base = tmp_path / "modernbert"
    torch.manual_seed(0)
    transformers.ModernBertForMaskedLM(hf_config(vocab_size=tokenizer.vocab_size)).save_pretrained(base)
    tokenizer.save(base / "tokenizer.json")
    out = tmp_path / "clf"
    summary = finetune(
        FinetuneConfig(
            model=str(base), train=str(tmp_path / "train.csv"), eval=str(tmp_path / "dev.csv"), out=str(out),
            epochs=4, lr=2e-3, batch_size=16, device="cpu", dropout=0.0, progress=False,
        )
    )  # fmt: skip
    assert summary["accuracy"] > 0.8
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["frame"] == {"prefix": [0], "suffix": [2]} and meta["pad_token_id"] == PAD
    hf_dir = export_run(out, tmp_path / "hf")
    hf = transformers.ModernBertForSequenceClassification.from_pretrained(hf_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    sample = ["the film was great", "the film was dull and awful, truly"]
    batch = hf_tokenizer(sample, padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[:1] == [0] and hf_tokenizer.pad_token_id == PAD
    with torch.no_grad():
        theirs = torch.log_softmax(hf(**batch).logits, dim=-1)
    assert max_diff(Classifier.load(out).log_probs(sample), theirs) < 1e-4
