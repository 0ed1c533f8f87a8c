"""The ferrolm Transformer: one GPT, GPT-2-, Llama-, RoBERTa- or ModernBERT-style by config, and its
masked-LM encoder twin (the same network with bidirectional attention).

Reads top to bottom: the config and its presets, the building blocks (norms, RoPE, attention, MLP), the
model. What each ``arch`` builds is data (``ferrolm.archs.ARCHS``: norm, its placement, MLP, positions,
biases, heads); the Hugging Face layouts are one adapter per architecture in ``ferrolm.hf``.

- ``arch="gpt2"``: learned positions, LayerNorm with biases, GELU (tanh approximation, as GPT-2 and
  Hugging Face's ``gelu_new``), biases on every linear layer.
- ``arch="llama"``: rotary positions (RoPE, the "rotate half" layout Hugging Face uses), RMSNorm, SwiGLU,
  no biases.
- ``arch="modernbert"`` (an encoder only, global attention): pre-norm LayerNorm without biases, RoPE,
  GeGLU, an embedding norm, ModernBERT's MLM head; ``[CLS]``/``[SEP]``/``[PAD]``/``[MASK]``.
- ``arch="roberta"`` (an encoder only): BERT's post-norm blocks, an embedding LayerNorm, a token-type
  embedding, exact GELU, and the MLM head (dense + GELU + LayerNorm, then the tied decoder with a bias).
  ``pad_id`` and ``mask_id`` are the tokenizer's ``<pad>`` and ``<mask>`` (Hugging Face's RoBERTa counts
  positions after the padding id; ``ferrolm.hf.roberta``). ``arch="bert"``: the same network with
  BERT's ``[CLS]``/``[SEP]``/``[PAD]``/``[MASK]`` and positions from 0.
- ``n_kv_head < n_head`` is grouped-query attention: query head ``h`` reads K/V head
  ``h // (n_head // n_kv_head)``. (Hugging Face's GPT-2 has no GQA, so such a GPT-2 model cannot be
  exported; a Llama one can.)
- The embedding has ``padded_vocab_size`` rows (a multiple of ``vocab_multiple``: aligned matmuls are
  faster); logits are cropped to ``vocab_size``, so the padding rows are never predicted, and export
  drops them.
- ``causal=False`` makes the BERT-style encoder: every token sees its whole document; the mask token is
  ``mask_id`` when the tokenizer has one (``<mask>``), else the first padding row
  (``mask_token_id == vocab_size``), see ``mask_tokens``.

All attention goes through ``ferrolm.kernels`` (Triton on CUDA, SDPA on CPU), with the document mask when
the batch carries ``cu_seqlens``. The one exception is a decoding step with a KV cache, where the queries
are fewer than the keys (the kernels take equal lengths): that calls SDPA directly.

>>> cfg = GPTConfig.preset("tiny", vocab_size=100)               # doctest: +SKIP
>>> model = GPT(cfg)                                              # doctest: +SKIP
>>> logits, loss = model(idx, targets)                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferrolm._core import FerrolmError
from ferrolm.archs import ARCHS, PRESETS, ArchSpec
from ferrolm.kernels import flash_attention, flash_attention_varlen
from ferrolm.memory import check_memory

__all__ = ["GPT", "PRESETS", "GPTConfig", "KVCache", "mask_tokens"]

IGNORE_INDEX = -100  # label value that contributes no loss (PyTorch's cross_entropy default)


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    arch: str = "gpt2"  # a key of ferrolm.archs.ARCHS: gpt2, llama; encoders roberta, bert, modernbert
    n_layer: int = 12  # Transformer blocks
    n_head: int = 12  # query heads
    n_kv_head: int | None = None  # key/value heads; None = n_head (multi-head), fewer = grouped-query
    n_embd: int = 768  # model width; head_dim = n_embd // n_head
    block_size: int = 1024  # context length: the most positions the model sees at once
    vocab_size: int = 50257  # the tokenizer's vocabulary (logits are cropped to this)
    vocab_multiple: int = 64  # embedding rows padded to a multiple of this (aligned matmuls run faster)
    mlp_hidden: int | None = (
        None  # MLP width; None = 4*n_embd (gpt2), 8/3*n_embd up to a multiple of 64 (llama)
    )
    dropout: float = 0.0  # on embeddings and residual branches; 0 for pretraining (nanoGPT, llm.c)
    tie_embeddings: bool = True  # lm_head shares the token embedding (GPT-2 does; saves V*C parameters)
    rope_theta: float = 10000.0  # RoPE base: wavelengths 2*pi*theta^(2i/head_dim) (RoPE archs only)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon (GPT-2's and Llama-2's value)
    causal: bool = True  # False: bidirectional encoder for masked-LM pretraining
    mask_id: int | None = None  # encoder: the tokenizer's <mask> id; None = one extra embedding row
    pad_id: int | None = None  # the tokenizer's <pad> id (RoBERTa's positions start after it)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:  # (an unknown arch is validate()'s error, not this one's)
            self.mlp_hidden = ARCHS.get(self.arch, ARCHS["gpt2"]).default_mlp_hidden(self.n_embd)

    def validate(self) -> GPTConfig:
        """Raise ``FerrolmError`` naming the first inconsistent field; return self."""
        if self.arch not in ARCHS:
            names = ", ".join(repr(name) for name in ARCHS)
            raise FerrolmError(f"model config: arch must be one of {names}, got {self.arch!r}")
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise FerrolmError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise FerrolmError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        assert self.n_kv_head is not None
        if self.n_head % self.n_kv_head:
            raise FerrolmError(
                f"model config: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"
            )
        if self.spec.positions == "rope" and self.head_dim % 2:
            raise FerrolmError(f"model config: RoPE needs an even head_dim, got {self.head_dim}")
        if self.spec.encoder_only and self.causal:
            raise FerrolmError(
                f"model config: arch {self.arch!r} is an encoder (causal=False): pretrain it with "
                "objective 'mlm'"
            )
        for name in ("mask_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size
            ):
                raise FerrolmError(
                    f"model config: {name} must be a token id below vocab_size {self.vocab_size}, got {value!r}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise FerrolmError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.vocab_multiple <= 0:
            raise FerrolmError(f"model config: vocab_multiple must be positive, got {self.vocab_multiple}")
        return self

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # An encoder whose tokenizer has no <mask> needs one row more than the tokenizer: [MASK].
        rows = self.vocab_size + (0 if self.causal or self.mask_id is not None else 1)
        return self.vocab_multiple * math.ceil(rows / self.vocab_multiple)

    @property
    def mask_token_id(self) -> int | None:
        if self.causal:
            return None
        return self.mask_id if self.mask_id is not None else self.vocab_size

    def with_tokenizer(self, special_tokens: dict[str, int]) -> GPTConfig:
        """Take ``mask_id`` and ``pad_id`` from a tokenizer's special tokens (``<mask>``, ``<pad>``) for an
        encoder; a RoBERTa-style model needs both (its Hugging Face layout is defined by them)."""
        if self.causal:
            return self
        spec = self.spec
        if self.mask_id is None:
            self.mask_id = special_tokens.get(spec.mask_token)
        if self.pad_id is None:
            self.pad_id = special_tokens.get(spec.pad_token)
        if spec.encoder_only and (self.mask_id is None or self.pad_id is None):
            have = ", ".join(sorted(special_tokens)) or "none"
            needed = sorted({*spec.frame_tokens, spec.mask_token, spec.pad_token})
            raise FerrolmError(
                f"arch {self.arch!r} needs a tokenizer with {spec.mask_token} and {spec.pad_token} special "
                f"tokens (its family's: {', '.join(needed)}); this one has: {have}. Train one with "
                f"special_tokens={needed}"
            )
        return self.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FerrolmError(f"model config: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**data).validate()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named size (see ``PRESETS``) with any field overridden, e.g. ``vocab_size``."""
        if name not in PRESETS:
            raise FerrolmError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides}).validate()


# ----------------------------------------------------------------------------------------------------
# Building blocks


def rope_tables(config: GPTConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (block_size, head_dim): angle(pos, i) = pos * theta^(-2i/head_dim), repeated
    for the two halves ("rotate half" layout, as Hugging Face's Llama)."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    positions = torch.arange(config.block_size, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B, T, D): pairs (i, i + D/2) turn by their angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, T, H, D)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class KVCache:
    """Keys and values of past positions for incremental decoding: (n_layer, B, max_len, H_kv, D) each.

    ``pos`` is how many positions are filled; the model advances it after the last layer.
    """

    def __init__(
        self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        assert config.n_kv_head is not None
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, H_kv, D) at the next positions; return all keys/values so far (B, pos+T, H_kv, D)."""
        end = self.pos + k.shape[1]
        if end > self.k.shape[2]:
            raise FerrolmError(f"KV cache holds {self.k.shape[2]} positions; asked for {end}")
        self.k[layer, :, self.pos : end] = k
        self.v[layer, :, self.pos : end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_kv_head is not None
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.causal = config.causal
        bias = config.spec.bias
        # q, k and v in one matmul: (C) -> (H*D + 2*H_kv*D).
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, C = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, H_kv * D, H_kv * D], dim=-1)
        q = q.reshape(B, T, H, D)  # (B, T, H, D)
        k = k.reshape(B, T, H_kv, D)  # (B, T, H_kv, D)
        v = v.reshape(B, T, H_kv, D)  # (B, T, H_kv, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, P+T, H_kv, D): P positions already cached
        if k.shape[1] > T:  # decoding with a cache: T new queries against P+T keys
            y = _attend_to_cache(q, k, v)
        elif cu_seqlens is not None:  # packed documents: attend within each document only
            y = flash_attention_varlen(
                q.reshape(B * T, H, D),  # (B*T, H, D): the batch as one packed stream
                k.reshape(B * T, H_kv, D),
                v.reshape(B * T, H_kv, D),
                cu_seqlens,
                max_seqlen if max_seqlen is not None else T,
                causal=self.causal,
            ).view(B, T, H, D)
        else:
            y = flash_attention(q, k, v, causal=self.causal)  # (B, T, H, D)
        y = y.reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


def _attend_to_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, S, H_kv, D) with S >= T: query i is position S - T + i and sees keys <= it."""
    T, S = q.shape[1], k.shape[1]
    mask = None  # one new token sees every cached key
    if T > 1:
        rows = torch.arange(S - T, S, device=q.device)[:, None]  # (T, 1) absolute query positions
        mask = torch.arange(S, device=q.device)[None, :] <= rows  # (T, S)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, T, D)
        k.transpose(1, 2),  # (B, H_kv, S, D)
        v.transpose(1, 2),
        attn_mask=mask,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # (B, H, T, D)
    return y.transpose(1, 2)  # (B, T, H, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.mlp_hidden is not None
        self.kind = config.spec.mlp
        self.gated = self.kind in ("swiglu", "geglu")
        bias = config.spec.bias
        if self.gated:  # act(x W_gate) * (x W_up): the gate learns which features pass
            self.w_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
            self.w_up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        else:
            self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, hidden)
        elif self.kind == "geglu":
            h = F.gelu(self.w_gate(x)) * self.w_up(x)  # (B, T, hidden)
        else:
            # (B, T, hidden); GPT-2's tanh GELU, or BERT's exact (erf) one
            h = F.gelu(self.c_fc(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))  # (B, T, C)


def _norm(config: GPTConfig) -> nn.Module:
    if config.spec.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.spec.norm_bias)


class Block(nn.Module):
    """Pre-norm residual block (GPT-2, Llama): x + attn(norm(x)), then x + mlp(norm(x)).
    Post-norm (BERT, RoBERTa): norm(x + attn(x)), then norm(x + mlp(x)); ln_1/ln_2 keep their names."""

    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.post_norm = config.spec.norm_placement == "post"
        # ModernBERT's block 0 attends to the embeddings, which its embedding norm has just normalised.
        self.ln_1 = _norm(config) if layer > 0 or config.spec.first_attn_norm else nn.Identity()
        self.attn = Attention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, cu_seqlens, max_seqlen, cache, layer) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, rope, cu_seqlens, max_seqlen, cache, layer))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, cu_seqlens, max_seqlen, cache, layer)
        return x + self.mlp(self.ln_2(x))


class LMTransform(nn.Module):
    """BERT's MLM head before the decoder: dense, GELU (exact), LayerNorm. (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=config.spec.bias)
        self.ln = _norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(F.gelu(self.dense(x)))


# ----------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config.validate()
        if torch.get_default_device().type != "meta":  # a meta model allocates nothing (and counts)
            check_memory(config)  # before allocating: an impossible size is one error with its figure
        spec = config.spec
        V, C = config.padded_vocab_size, config.n_embd
        layers: dict[str, nn.Module] = dict(wte=nn.Embedding(V, C))
        if spec.positions == "learned":
            layers["wpe"] = nn.Embedding(config.block_size, C)
        if spec.token_type:  # BERT's segment embedding; ferrolm feeds one segment, so one row
            layers["wtt"] = nn.Embedding(1, C)
        if spec.embedding_norm:
            layers["ln_e"] = _norm(config)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
        )
        if spec.norm_placement == "pre":  # post-norm blocks end normalised already
            layers["ln_f"] = _norm(config)
        self.transformer = nn.ModuleDict(layers)
        self.lm_transform = LMTransform(config) if spec.mlm_head else None
        self.lm_head = nn.Linear(C, V, bias=spec.mlm_head)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if spec.positions == "rope":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection by 1/sqrt(2 * n_layer), so the
        # residual stream's variance does not grow with depth.
        if config.spec.token_type:
            nn.init.zeros_(self.transformer.wtt.weight)  # the one segment starts as a no-op
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2's std
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied weights once); ``non_embedding`` leaves out the position embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6*N for the matmuls with the
        N parameters, plus 12*L*C*T for attention scores and their weighted sum (QK^T and AV, 2 FLOPs
        per multiply-add, x3 for forward and backward). The causal mask's skipped half is not subtracted.
        """
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).

        ``targets`` (B, T): the token to predict at each position, ``-100`` for none; ``loss`` is their
        cross-entropy, averaged (``reduction="mean"``) or summed (``"sum"``, for normalising over a whole
        gradient-accumulation window). ``cu_seqlens`` (int32, over the flattened B*T tokens) restricts
        attention to documents; ``position_ids`` (B, T) then restart at each document. ``cache`` decodes
        incrementally. ``last_only`` computes logits for the last position only (generation).
        ``return_hidden`` returns the final normalised hidden states (B, T, C) in place of the logits, and
        no loss: what a task head (``ferrolm.finetune``'s classifier) reads instead of the LM head.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise FerrolmError(
                f"sequence of {start + T} positions exceeds the model's context of {self.config.block_size}"
            )
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device).expand(B, T)  # (B, T)
        spec = self.config.spec
        x = self.transformer.wte(idx)  # (B, T, C)
        if spec.token_type:
            x = x + self.transformer.wtt.weight[0]  # (B, T, C): segment 0 (Hugging Face's order of sums)
        rope = None
        if spec.positions == "learned":
            x = x + self.transformer.wpe(position_ids)  # (B, T, C)
        else:
            rope = (self.rope_cos[position_ids], self.rope_sin[position_ids])  # (B, T, D) each
        if spec.embedding_norm:
            x = self.transformer.ln_e(x)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cu_seqlens, max_seqlen, cache, layer)
        if cache is not None:
            cache.pos += T
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)  # (B, T, C)
        if return_hidden:
            return x, None
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        if self.lm_transform is not None:
            x = self.lm_transform(x)  # (B, T, C)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V): padding rows cropped
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),  # (B*T, V) in fp32 even under autocast
            targets.reshape(-1),  # (B*T,)
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: weight decay on matmul weights only, never on norms, biases or
        embeddings (decaying a norm's gain or a bias only fights the data; embeddings are lookups)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # a tied lm_head appears once, as wte
            is_embedding = name.startswith(("transformer.wte", "transformer.wpe", "transformer.wtt"))
            (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # ------------------------------------------------------------------------------------------------
    # Saving: plain tensors for safetensors (no shared storage, no pickle)

    def weights(self) -> dict[str, torch.Tensor]:
        """The state dict without the tied ``lm_head.weight`` (it is ``transformer.wte.weight``)."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            del state["lm_head.weight"]
        return state

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        expected = set(self.weights())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise FerrolmError(
                f"{source}: tensors do not match the model config (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        own = self.state_dict()
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise FerrolmError(
                    f"{source}: {name} has shape {tuple(tensor.shape)}, the model config needs "
                    f"{tuple(own[name].shape)}"
                )
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------------------------------------
    # Hugging Face

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **overrides: Any) -> GPT:
        """Load a Hugging Face directory (``config.json`` + ``model.safetensors``, or a sharded
        ``model.safetensors.index.json``) of a ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or
        ``RobertaForMaskedLM`` (``ferrolm.hf`` has an adapter per architecture): a
        ``ferrolm export`` output, or the Hub's own files (``gpt2``, ``gpt2-medium``, ... key names
        with or without the ``transformer.`` prefix). ``overrides`` change config fields (e.g. dropout).
        """
        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.json (not a Hugging Face model directory)")
        from ferrolm import hf as adapters

        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
        config = adapters.config_from_hf(hf_config, source=str(config_path))
        if not config.causal and config.mask_id is None:  # an encoder: its tokenizer's <mask>, if any
            config.mask_id = _special_tokens_of(directory).get("<mask>")
        for key, value in overrides.items():
            setattr(config, key, value)
        model = cls(config.validate())
        hf_state = adapters.read_safetensors_dir(directory)
        model.load_weights(adapters.state_from_hf(hf_state, config, str(directory)), source=str(directory))
        return model


def mask_tokens(
    input_ids: torch.Tensor,
    config: GPTConfig,
    generator: torch.Generator,
    *,
    mask_prob: float = 0.15,
    special_ids: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al. 2019): pick ``mask_prob`` of the tokens (never ``special_ids``) as
    targets; of those, 80% become ``[MASK]``, 10% a random token, 10% stay. Returns (inputs, labels),
    labels ``-100`` where nothing is predicted. Deterministic given ``generator`` (on input_ids' device).
    """
    mask_id = config.mask_token_id
    if mask_id is None:
        raise FerrolmError("masked-LM needs an encoder config (causal=False)")
    device = input_ids.device
    chosen = torch.rand(input_ids.shape, generator=generator, device=device) < mask_prob  # (B, T)
    for special in special_ids:
        chosen &= input_ids != special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator, device=device)  # (B, T): which replacement
    random_ids = torch.randint(config.vocab_size, input_ids.shape, generator=generator, device=device)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------------------------------
# Hugging Face layouts: one adapter per architecture in ferrolm.hf. Export is ferrolm.export. These
# names stay here for the code that imports them from ferrolm.model.


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    from ferrolm import hf as adapters

    return adapters.config_from_hf(hf, source)


def config_to_hf(
    config: GPTConfig, *, bos_id: int | None = None, eos_id: int | None = None
) -> dict[str, Any]:
    from ferrolm import hf as adapters

    return adapters.config_to_hf(config, bos_id=bos_id, eos_id=eos_id)


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    from ferrolm import hf as adapters

    return adapters.state_to_hf(model)


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    from ferrolm import hf as adapters

    return adapters.state_from_hf(hf, config, source)


def _special_tokens_of(directory: Path) -> dict[str, int]:
    """The special tokens of a directory's ``tokenizer.json`` (content -> id), {} without one."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return {}
    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
        return {t["content"]: t["id"] for t in added if t.get("special")}
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise FerrolmError(f"{path}: not a readable tokenizer.json ({error})") from None
