"""Architectures as data: what each ``GPTConfig.arch`` builds, in one table.

``ferrolm.model`` reads a spec where it would otherwise ask ``arch == ...``; ``ferrolm.hf`` holds one
Hugging Face adapter per architecture (config.json fields and tensor names, both directions). Adding an
architecture is one ``ArchSpec`` here, one adapter module in ``ferrolm/hf/`` and its parity test.

This module imports nothing heavy: ``GPTConfig`` validates against it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["ARCHS", "PRESETS", "ArchSpec"]


@dataclass(frozen=True)
class ArchSpec:
    norm: str  # "layernorm" or "rmsnorm"
    norm_placement: str  # "pre": x + f(norm(x)), a final norm; "post": norm(x + f(x)), none after
    # "gelu_tanh" (GPT-2's gelu_new), "gelu" (exact erf GELU, BERT), "swiglu" (Llama: silu(x W_g) * x W_u)
    # or "geglu" (ModernBERT: gelu(x W_g) * x W_u)
    mlp: str
    positions: str  # "learned" (an embedding per position) or "rope"
    bias: bool  # biases on the attention, MLP and head linear layers
    norm_bias: bool = True  # LayerNorm with a bias (ModernBERT's have none)
    first_attn_norm: bool = True  # False: block 0 reads the (normed) embeddings directly (ModernBERT)
    embedding_norm: bool = False  # a norm right after the embeddings (BERT/RoBERTa)
    token_type: bool = False  # a (single-row) token-type embedding added to every token (BERT/RoBERTa)
    mlm_head: bool = False  # dense + GELU + norm before the LM head, and an LM-head bias (BERT/RoBERTa)
    encoder_only: bool = False  # bidirectional only (causal=False): no causal Hugging Face class
    pooling: str = "last"  # classification reads the "last" real token (GPT) or the "first" (<s>, BERT)
    # The classification head: "linear" (GPT-2's score), "dense_tanh" (RoBERTa: dense, tanh, out_proj)
    # or "dense_gelu_norm" (ModernBERT: dense, GELU, norm, classifier)
    classifier: str = "linear"
    frame_tokens: tuple[str, ...] = ()  # "first" pooling: (begin, end, pad) special tokens around a text
    mask_token: str = "<mask>"  # an encoder's mask token in the tokenizer, when it has one
    pad_token: str = "<pad>"
    hf_model_type: str = ""  # the Hugging Face config.json model_type (ferrolm.hf's adapter key)

    def default_mlp_hidden(self, n_embd: int) -> int:
        # A gated MLP has 3 matrices: 2/3 of 4*C keeps the parameter count.
        if self.mlp in ("swiglu", "geglu"):
            return 64 * math.ceil(8 * n_embd / 3 / 64)
        return 4 * n_embd


# RoBERTa (Liu et al. 2019), BERT's layout: post-norm LayerNorm, an embedding LayerNorm, learned
# positions (Hugging Face's start after the padding id, see ferrolm.hf.roberta), a token-type
# embedding, exact GELU, biases, the dense+GELU+LayerNorm MLM head; classification on <s>.
_ROBERTA = ArchSpec(
    norm="layernorm",
    norm_placement="post",
    mlp="gelu",
    positions="learned",
    bias=True,
    embedding_norm=True,
    token_type=True,
    mlm_head=True,
    encoder_only=True,
    pooling="first",
    classifier="dense_tanh",
    frame_tokens=("<s>", "</s>", "<pad>"),
    hf_model_type="roberta",
)


ARCHS: dict[str, ArchSpec] = {
    # GPT-2 (Radford et al. 2019): learned positions, pre-norm LayerNorm, tanh GELU, biases everywhere.
    "gpt2": ArchSpec(
        norm="layernorm",
        norm_placement="pre",
        mlp="gelu_tanh",
        positions="learned",
        bias=True,
        hf_model_type="gpt2",
    ),
    # Llama (Touvron et al. 2023): RoPE, pre-norm RMSNorm, SwiGLU, no biases.
    "llama": ArchSpec(
        norm="rmsnorm",
        norm_placement="pre",
        mlp="swiglu",
        positions="rope",
        bias=False,
        hf_model_type="llama",
    ),
    "roberta": _ROBERTA,
    # BERT (Devlin et al. 2019): RoBERTa's network (RoBERTa changed training, not layers), positions
    # from 0, BERT's special tokens; classification on [CLS] through the pooler (dense + tanh).
    "bert": replace(
        _ROBERTA,
        frame_tokens=("[CLS]", "[SEP]", "[PAD]"),
        mask_token="[MASK]",
        pad_token="[PAD]",
        hf_model_type="bert",
    ),
    # ModernBERT (Warner et al. 2024), global attention only: pre-norm LayerNorm without biases (none
    # before block 0's attention), an embedding LayerNorm, RoPE, GeGLU, no linear biases, the MLM head
    # (dense + GELU + LayerNorm, decoder bias); classification on [CLS] through the same kind of head.
    "modernbert": ArchSpec(
        norm="layernorm",
        norm_placement="pre",
        mlp="geglu",
        positions="rope",
        bias=False,
        norm_bias=False,
        first_attn_norm=False,
        embedding_norm=True,
        mlm_head=True,
        encoder_only=True,
        pooling="first",
        classifier="dense_gelu_norm",
        frame_tokens=("[CLS]", "[SEP]", "[PAD]"),
        mask_token="[MASK]",
        pad_token="[PAD]",
        hf_model_type="modernbert",
    ),
}


# GPTConfig presets (GPTConfig.preset, --preset), sizes smallest first. Vocabulary size comes from the data (the shard manifest), not the preset.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU and tests: trains in seconds.
    "tiny": dict(arch="gpt2", n_layer=2, n_head=4, n_embd=64, block_size=128),
    "tiny-llama": dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=128),
    # A laptop-sized model that still learns visibly in minutes on CPU.
    "small": dict(arch="gpt2", n_layer=4, n_head=4, n_embd=256, block_size=256),
    "small-llama": dict(arch="llama", n_layer=4, n_head=4, n_kv_head=2, n_embd=256, block_size=256),
    # GPT-2 (Radford et al. 2019) sizes; gpt2-small is the 124M model.
    "gpt2-small": dict(arch="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(arch="gpt2", n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    # Llama-style at GPT-2-small size, 4 K/V heads (3 query heads per K/V head).
    "llama-small": dict(arch="llama", n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=1024),
    # RoBERTa-style encoders (objective "mlm"): tiny for tests, small for a laptop, base = roberta-base.
    "tiny-roberta": dict(arch="roberta", n_layer=2, n_head=4, n_embd=64, block_size=128, causal=False),
    "small-roberta": dict(arch="roberta", n_layer=4, n_head=4, n_embd=256, block_size=256, causal=False),
    "roberta-base": dict(arch="roberta", n_layer=12, n_head=12, n_embd=768, block_size=512, causal=False),
    "tiny-bert": dict(arch="bert", n_layer=2, n_head=4, n_embd=64, block_size=128, causal=False),
    # ModernBERT-style encoders (global attention; ModernBERT's RoPE base for global layers).
    "tiny-modernbert": dict(
        arch="modernbert", n_layer=2, n_head=4, n_embd=64, block_size=128, causal=False, rope_theta=160000.0
    ),
    "small-modernbert": dict(
        arch="modernbert", n_layer=4, n_head=4, n_embd=256, block_size=256, causal=False, rope_theta=160000.0
    ),
}
