"""ferrolm.hf: every architecture's config.json round-trips (property test), and the registry is complete."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torch")

from hypothesis import given, settings
from hypothesis import strategies as st

from ferrolm import FerrolmError
from ferrolm.archs import ARCHS
from ferrolm.hf import adapter, config_from_hf, config_to_hf
from ferrolm.model import GPTConfig


def test_every_arch_has_an_adapter_for_its_model_type() -> None:
    for arch, spec in ARCHS.items():
        assert adapter(arch).MODEL_TYPE == spec.hf_model_type
    with pytest.raises(FerrolmError, match="model_type 't5' is not supported"):
        config_from_hf({"model_type": "t5"})


@st.composite
def configs(draw: st.DrawFn) -> GPTConfig:
    arch = draw(st.sampled_from(sorted(ARCHS)))
    spec = ARCHS[arch]
    n_head = draw(st.integers(1, 4))
    n_kv_head = (
        draw(st.sampled_from([h for h in (1, 2, 4) if n_head % h == 0])) if arch == "llama" else n_head
    )
    head_dim = draw(st.integers(1, 8)) * 2
    vocab_size = draw(st.integers(8, 300))
    encoder = spec.encoder_only
    return GPTConfig(
        arch=arch,
        n_layer=draw(st.integers(1, 4)),
        n_head=n_head,
        n_kv_head=n_kv_head,
        n_embd=n_head * head_dim,
        block_size=draw(st.integers(1, 600)),
        vocab_size=vocab_size,
        mlp_hidden=draw(st.integers(1, 100)),
        tie_embeddings=draw(st.booleans()),
        rope_theta=float(draw(st.sampled_from([10000, 160000, 500000])))
        if spec.positions == "rope"
        else 10000.0,
        norm_eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12])),
        causal=not encoder,
        pad_id=draw(st.integers(0, vocab_size - 1)) if encoder else None,
    ).validate()


@settings(max_examples=200, deadline=None)
@given(configs())
def test_config_json_round_trips(config: GPTConfig) -> None:
    """config -> config.json -> config: every field the Hugging Face file can hold comes back."""
    back = config_from_hf(config_to_hf(config, bos_id=0, eos_id=0), source="generated")
    assert dataclasses.asdict(back) == dataclasses.asdict(config)
