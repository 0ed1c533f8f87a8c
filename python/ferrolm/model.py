"""The ferrolm Transformer: one decoder-only GPT, GPT-2-style or Llama-style by config, and its
masked-LM encoder twin (the same network with bidirectional attention).

Reads top to bottom: the config and its presets, the building blocks (norms, RoPE, attention, MLP), the
model, then the Hugging Face weight layout (import here, export in ``ferrolm.export``).

- ``arch="gpt2"``: learned positions, LayerNorm with biases, GELU (tanh approximation, as GPT-2 and
  Hugging Face's ``gelu_new``), biases on every linear layer.
- ``arch="llama"``: rotary positions (RoPE, the "rotate half" layout Hugging Face uses), RMSNorm, SwiGLU,
  no biases.
- ``n_kv_head < n_head`` is grouped-query attention: query head ``h`` reads K/V head
  ``h // (n_head // n_kv_head)``. (Hugging Face's GPT-2 has no GQA, so such a GPT-2 model cannot be
  exported; a Llama one can.)
- The embedding has ``padded_vocab_size`` rows (a multiple of ``vocab_multiple``: aligned matmuls are
  faster); logits are cropped to ``vocab_size``, so the padding rows are never predicted, and export
  drops them.
- ``causal=False`` makes the BERT-style encoder: every token sees its whole document; the first padding
  row is the ``[MASK]`` token (``mask_token_id == vocab_size``), see ``mask_tokens``.

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
from ferrolm.kernels import flash_attention, flash_attention_varlen
from ferrolm.memory import check_memory

__all__ = ["GPT", "PRESETS", "GPTConfig", "KVCache", "mask_tokens"]

IGNORE_INDEX = -100  # label value that contributes no loss (PyTorch's cross_entropy default)


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    arch: str = "gpt2"  # "gpt2" (learned pos + LayerNorm + GELU) or "llama" (RoPE + RMSNorm + SwiGLU)
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
    rope_theta: float = 10000.0  # RoPE base: wavelengths 2*pi*theta^(2i/head_dim) (llama only)
    norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon (GPT-2's and Llama-2's value)
    causal: bool = True  # False: bidirectional encoder for masked-LM pretraining

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None:
            if self.arch == "llama":  # SwiGLU has 3 matrices: 2/3 of 4*C keeps the parameter count
                self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.mlp_hidden = 4 * self.n_embd

    def validate(self) -> GPTConfig:
        """Raise ``FerrolmError`` naming the first inconsistent field; return self."""
        if self.arch not in ("gpt2", "llama"):
            raise FerrolmError(f"model config: arch must be 'gpt2' or 'llama', got {self.arch!r}")
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
        if self.arch == "llama" and self.head_dim % 2:
            raise FerrolmError(f"model config: RoPE needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise FerrolmError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.vocab_multiple <= 0:
            raise FerrolmError(f"model config: vocab_multiple must be positive, got {self.vocab_multiple}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # An encoder needs one row more than the tokenizer: the [MASK] token.
        rows = self.vocab_size + (0 if self.causal else 1)
        return self.vocab_multiple * math.ceil(rows / self.vocab_multiple)

    @property
    def mask_token_id(self) -> int | None:
        return None if self.causal else self.vocab_size

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


# Sizes, smallest first. Vocabulary size comes from the data (the shard manifest), not the preset.
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
}


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
        bias = config.arch == "gpt2"
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
        self.swiglu = config.arch == "llama"
        bias = not self.swiglu
        if self.swiglu:  # silu(x W_gate) * (x W_up): the gate learns which features pass
            self.w_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
            self.w_up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        else:
            self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.w_gate(x)) * self.w_up(x)  # (B, T, hidden)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, hidden); GPT-2's GELU
        return self.dropout(self.c_proj(h))  # (B, T, C)


def _norm(config: GPTConfig) -> nn.Module:
    if config.arch == "llama":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = Attention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope, cu_seqlens, max_seqlen, cache, layer) -> torch.Tensor:  # type: ignore[no-untyped-def]
        x = x + self.attn(self.ln_1(x), rope, cu_seqlens, max_seqlen, cache, layer)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config.validate()
        check_memory(config)  # before allocating: an impossible size is one error with its figure
        V, C = config.padded_vocab_size, config.n_embd
        layers: dict[str, nn.Module] = dict(wte=nn.Embedding(V, C))
        if config.arch == "gpt2":
            layers["wpe"] = nn.Embedding(config.block_size, C)
        layers.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=_norm(config),
        )
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(C, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.arch == "llama":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection by 1/sqrt(2 * n_layer), so the
        # residual stream's variance does not grow with depth.
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
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(position_ids)  # (B, T, C)
        else:
            rope = (self.rope_cos[position_ids], self.rope_sin[position_ids])  # (B, T, D) each
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cu_seqlens, max_seqlen, cache, layer)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)  # (B, T, C)
        if return_hidden:
            return x, None
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
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
            is_embedding = name.startswith(("transformer.wte", "transformer.wpe"))
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
        ``model.safetensors.index.json``) of a ``GPT2LMHeadModel`` or ``LlamaForCausalLM``: a
        ``ferrolm export`` output, or the Hub's own files (``gpt2``, ``gpt2-medium``, ... key names
        with or without the ``transformer.`` prefix). ``overrides`` change config fields (e.g. dropout).
        """
        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.json (not a Hugging Face model directory)")
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
        config = config_from_hf(hf_config, source=str(config_path))
        for key, value in overrides.items():
            setattr(config, key, value)
        model = cls(config.validate())
        hf_state = _read_safetensors_dir(directory)
        model.load_weights(state_from_hf(hf_state, config, str(directory)), source=str(directory))
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
# Hugging Face layouts: config.json fields and tensor names. Export is ferrolm.export.


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise FerrolmError(
                f"{source}: activation_function {activation!r} (ferrolm's GPT-2 uses tanh GELU)"
            )
        n_embd = hf["n_embd"]
        return GPTConfig(
            arch="gpt2",
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=n_embd,
            block_size=hf.get("n_positions", 1024),
            vocab_size=hf["vocab_size"],
            mlp_hidden=hf.get("n_inner") or 4 * n_embd,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
    if model_type == "llama":
        for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
            if hf.get(key, ok) != ok:
                raise FerrolmError(
                    f"{source}: {key}={hf[key]!r} is not supported (ferrolm's Llama has {ok!r})"
                )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise FerrolmError(f"{source}: RoPE scaling {rope!r} is not supported (default RoPE only)")
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
            raise FerrolmError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        return GPTConfig(
            arch="llama",
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=n_embd,
            block_size=hf.get("max_position_embeddings", 2048),
            vocab_size=hf["vocab_size"],
            mlp_hidden=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    raise FerrolmError(f"{source}: model_type {model_type!r} is not supported (gpt2 or llama)")


def config_to_hf(
    config: GPTConfig, *, bos_id: int | None = None, eos_id: int | None = None
) -> dict[str, Any]:
    if not config.causal:
        raise FerrolmError("export: masked-LM encoders have no Hugging Face causal-LM equivalent")
    common = dict(
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        torch_dtype="float32",
        use_cache=True,
    )
    if config.arch == "gpt2":
        if config.n_kv_head != config.n_head:
            raise FerrolmError(
                "export: GPT-2 has no grouped-query attention (use arch='llama' for n_kv_head)"
            )
        return dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            n_positions=config.block_size,
            n_inner=config.mlp_hidden,
            activation_function="gelu_new",
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        hidden_size=config.n_embd,
        head_dim=config.head_dim,
        intermediate_size=config.mlp_hidden,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        rope_theta=config.rope_theta,  # transformers < 5 reads this one
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},  # transformers >= 5
        **common,
    )


_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LLAMA_NAMES = {  # ferrolm block tensor -> Hugging Face Llama layer tensor
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """ferrolm weights -> Hugging Face names and layouts, vocabulary rows cropped to ``vocab_size``."""
    config, V = model.config, model.config.vocab_size
    out: dict[str, torch.Tensor] = {}
    for name, t in model.weights().items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:V]  # drop the padding rows
        if config.arch == "gpt2":
            if name.endswith(_GPT2_CONV1D):
                t = t.t()  # GPT-2's Conv1D stores (in, out)
            out[name] = t.contiguous()
            continue
        if name == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "transformer.ln_f.weight":
            out["model.norm.weight"] = t
        elif name == "lm_head.weight":
            out[name] = t
        else:
            _, _, layer, rest = name.split(".", 3)  # transformer.h.{layer}.{rest}
            prefix = f"model.layers.{layer}."
            if rest == "attn.c_attn.weight":
                assert config.n_kv_head is not None
                sizes = [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
                for part, proj in zip(t.split(sizes, dim=0), ("q_proj", "k_proj", "v_proj"), strict=True):
                    out[f"{prefix}self_attn.{proj}.weight"] = part.contiguous()
            else:
                out[prefix + _LLAMA_NAMES[rest]] = t
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts -> ferrolm weights, vocabulary rows padded with zeros."""
    out: dict[str, torch.Tensor] = {}
    if config.arch == "gpt2":
        for name, t in hf.items():
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old checkpoints store the causal mask as a buffer
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name  # the Hub's gpt2 files have no prefix
            if name.endswith(_GPT2_CONV1D):
                t = t.t()
            out[name] = t
    else:
        inverse = {hf_name: ours for ours, hf_name in _LLAMA_NAMES.items()}
        qkv: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in hf.items():
            if name == "model.embed_tokens.weight":
                out["transformer.wte.weight"] = t
            elif name == "model.norm.weight":
                out["transformer.ln_f.weight"] = t
            elif name == "lm_head.weight":
                out[name] = t
            elif name.startswith("model.layers."):
                _, _, layer, rest = name.split(".", 3)
                if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                    qkv.setdefault(layer, {})[rest.split(".")[1]] = t
                elif rest in inverse:
                    out[f"transformer.h.{layer}.{inverse[rest]}"] = t
                elif "rotary_emb" not in rest:
                    raise FerrolmError(f"{source}: unexpected tensor {name}")
        for layer, parts in qkv.items():
            if set(parts) != {"q_proj", "k_proj", "v_proj"}:
                raise FerrolmError(f"{source}: layer {layer} lacks some of q_proj/k_proj/v_proj")
            out[f"transformer.h.{layer}.attn.c_attn.weight"] = torch.cat(
                [parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0
            )  # (H*D + 2*H_kv*D, C)
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)  # some files store the tied copy too
    for name in ("transformer.wte.weight", "lm_head.weight"):
        if name in out:
            t = out[name]
            if t.shape[0] != config.vocab_size:
                raise FerrolmError(
                    f"{source}: {name} has {t.shape[0]} rows, config vocab_size {config.vocab_size}"
                )
            padded = t.new_zeros(config.padded_vocab_size, t.shape[1])  # (V_padded, C)
            padded[: t.shape[0]] = t
            out[name] = padded
    return {k: v.float() for k, v in out.items()}


def _read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [directory / f for f in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(
            f"{directory}: no model.safetensors (ferrolm reads safetensors only; convert "
            "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True))"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt files
            raise FerrolmError(f"{path}: not a readable safetensors file ({error})") from None
    return state
