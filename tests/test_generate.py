"""ferrolm.generate: greedy decoding equals transformers' generate(do_sample=False) token for token."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from ferrolm.export import export_hf  # noqa: E402
from ferrolm.generate import generate, generate_tokens, sample_next  # noqa: E402
from ferrolm.model import GPT, GPTConfig  # noqa: E402


@pytest.mark.parametrize(
    ("preset", "hf_class"), [("tiny", "GPT2LMHeadModel"), ("tiny-llama", "LlamaForCausalLM")]
)
def test_greedy_equals_transformers(tmp_path, preset: str, hf_class: str) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    model = GPT(GPTConfig.preset(preset, vocab_size=97)).eval()
    with torch.no_grad():  # larger weights than the 0.02-std init: varied, untied greedy choices
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15)
    export_hf(model, tmp_path)
    hf = getattr(transformers, hf_class).from_pretrained(tmp_path).eval()
    prompt = [5, 17, 42, 8]
    ours = generate(model, prompt, 40, temperature=0)
    theirs = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours == theirs[0].tolist()
    assert len(set(ours[len(prompt) :])) > 1


def test_sampling_is_seeded_and_respects_top_k_top_p() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=97)).eval()
    a = list(generate_tokens(model, [1, 2], 20, temperature=1.0, top_k=5, seed=7))
    b = list(generate_tokens(model, [1, 2], 20, temperature=1.0, top_k=5, seed=7))
    assert a == b and len(a) == 20
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert int(sample_next(logits, 1.0, top_k=2, generator=g)) in (1, 2)
        assert int(sample_next(logits, 1.0, top_p=0.5, generator=g)) == 1  # p(1) = 0.64 alone >= 0.5
    assert int(sample_next(logits, 0.0)) == 1


def test_generation_stops_at_eos_and_context() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=97, block_size=16)).eval()
    first = next(generate_tokens(model, [1, 2, 3], 5, temperature=0))
    assert list(generate_tokens(model, [1, 2, 3], 5, temperature=0, eos_id=first)) == [first]
    assert len(list(generate_tokens(model, [1] * 10, 100, temperature=0))) == 6  # the context is full
