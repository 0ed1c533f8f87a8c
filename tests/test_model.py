"""ferrolm.model: configs, the document mask, KV cache, masking, and Hugging Face round trips.

Models are created on the spot with random weights; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from safetensors.torch import load_file, save_file  # noqa: E402

from ferrolm import FerrolmError  # noqa: E402
from ferrolm.export import export_hf  # noqa: E402
from ferrolm.model import GPT, GPTConfig, KVCache, mask_tokens  # noqa: E402

VOCAB = 101  # deliberately not a multiple of 64: exercises padding and cropping
HF_CLASSES = {"tiny": "GPT2LMHeadModel", "tiny-llama": "LlamaForCausalLM"}


def make_model(preset: str, **overrides) -> GPT:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return GPT(GPTConfig.preset(preset, vocab_size=VOCAB, **overrides)).eval()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_embd=66), "not divisible by n_head"),
        (dict(n_kv_head=3), "not a multiple of n_kv_head"),
        (dict(arch="t5"), "arch must be"),  # (bert is an arch now: ferrolm.archs)
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_inconsistent_config_is_a_clear_error(overrides, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FerrolmError, match=message):
        GPTConfig.preset("tiny", vocab_size=VOCAB, **overrides)
    with pytest.raises(FerrolmError, match="unknown preset"):
        GPTConfig.preset("huge", vocab_size=VOCAB)


def test_vocab_is_padded_and_logits_cropped() -> None:
    model = make_model("tiny")
    assert model.config.padded_vocab_size == 128
    assert model.transformer.wte.weight.shape == (128, 64)
    logits, loss = model(torch.randint(0, VOCAB, (2, 9)), torch.randint(0, VOCAB, (2, 9)))
    assert logits.shape == (2, 9, VOCAB) and loss is not None and torch.isfinite(loss)
    assert GPTConfig.preset("gpt2-small", vocab_size=50257).padded_vocab_size == 50304
    encoder = GPTConfig.preset("tiny", vocab_size=128, causal=False)  # [MASK] needs one row more
    assert encoder.mask_token_id == 128 and encoder.padded_vocab_size == 192


def test_no_weight_decay_on_norms_biases_embeddings() -> None:
    model = make_model("tiny")
    decay, no_decay = model.optimizer_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        p.dim() == 2 and "wte" not in names[id(p)] and "wpe" not in names[id(p)] for p in decay["params"]
    )
    assert any("ln_1" in names[id(p)] for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("causal", [True, False])
def test_document_mask_equals_documents_run_apart(preset: str, causal: bool) -> None:
    """A packed row with cu_seqlens + restarting positions gives each document the logits it has alone."""
    model = make_model(preset, causal=causal)
    lengths = [5, 9, 2]
    docs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)  # (1, 16)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 16)
    cu = torch.tensor([0, 5, 14, 16, 16], dtype=torch.int32)  # padded by repeating the total
    with torch.no_grad():
        together, _ = model(packed, position_ids=positions, cu_seqlens=cu, max_seqlen=9)
        apart = torch.cat([model(d)[0] for d in docs], dim=1)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_kv_cache_gives_the_full_forward_logits(preset: str) -> None:
    model = make_model(preset)
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)  # (2, 12, V)
        cache = KVCache(model.config, 2, 12, torch.device("cpu"), torch.float32)
        steps = [model(idx[:, :7], cache=cache)[0]]  # prefill 7, then 3 tokens, then 1, then 1
        steps.append(model(idx[:, 7:10], cache=cache)[0])
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in (10, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_mask_tokens_80_10_10() -> None:
    config = GPTConfig.preset("tiny", vocab_size=1000, causal=False)
    ids = torch.randint(1, 1000, (64, 256))
    ids[:, 0] = 0  # a special token: never chosen
    generator = torch.Generator().manual_seed(0)
    inputs, labels = mask_tokens(ids, config, generator, special_ids=(0,))
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs == config.mask_token_id)[chosen].float().mean().item()
    kept = (inputs == ids)[chosen].float().mean().item()  # 10% unchanged (+ random hits of the same id)
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02
    again = mask_tokens(ids, config, torch.Generator().manual_seed(0), special_ids=(0,))
    assert torch.equal(again[0], inputs)  # deterministic given the generator


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, preset: str, tied: bool) -> None:  # type: ignore[no-untyped-def]
    model = make_model(preset, tie_embeddings=tied)
    export_hf(model, tmp_path)
    assert load_file(str(tmp_path / "model.safetensors")) is not None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    hf = getattr(transformers, HF_CLASSES[preset]).from_pretrained(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    back = GPT.from_pretrained(tmp_path).eval()  # and back into ferrolm
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours)


def test_from_pretrained_reads_the_hub_gpt2_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The Hub's gpt2 files: keys without 'transformer.', causal-mask buffers, no lm_head (tied)."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    hub = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    hub["h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_gqa_gpt2_and_encoders_refuse_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FerrolmError, match="grouped-query"):
        export_hf(make_model("tiny", n_kv_head=2), tmp_path)
    with pytest.raises(FerrolmError, match="masked-LM"):
        export_hf(make_model("tiny", causal=False), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        GPT.from_pretrained(tmp_path / "nothing")
