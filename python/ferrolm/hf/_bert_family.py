"""What RoBERTa and BERT share in Hugging Face: one encoder layout under a prefix, only the names of the
heads and where the position table starts differ (a ``Layout``). ``ferrolm.hf.roberta`` and
``ferrolm.hf.bert`` are the adapters; this module is their common tensor mapping.

- ferrolm keeps q, k and v in one matrix (``attn.c_attn``, weight and bias); Hugging Face has
  ``query``/``key``/``value``.
- The token-type embedding: ferrolm feeds one segment, so it keeps row 0 (files with 2 rows lose row 1,
  which ``token_type_ids=0`` never reads).
- ``position_offset`` leading rows of the Hugging Face position table come before ferrolm's position 0
  (RoBERTa: ``pad_token_id + 1``; BERT: 0); export writes zeros there, import drops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ferrolm._core import FerrolmError
from ferrolm.hf import split_layer_name

if TYPE_CHECKING:
    from ferrolm.model import GPTConfig

_EMBEDDINGS = {  # ferrolm -> Hugging Face (under the prefix), the position table apart
    "transformer.wte.weight": "embeddings.word_embeddings.weight",
    "transformer.wtt.weight": "embeddings.token_type_embeddings.weight",
    "transformer.ln_e.weight": "embeddings.LayerNorm.weight",
    "transformer.ln_e.bias": "embeddings.LayerNorm.bias",
}
_LAYER = {  # ferrolm block tensor (without .weight/.bias) -> Hugging Face layer module; qkv apart
    "attn.c_proj": "attention.output.dense",
    "ln_1": "attention.output.LayerNorm",
    "mlp.c_fc": "intermediate.dense",
    "mlp.c_proj": "output.dense",
    "ln_2": "output.LayerNorm",
}
_QKV = ("query", "key", "value")
_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.")


@dataclass(frozen=True)
class Layout:
    prefix: str  # "roberta." or "bert."
    head: dict[str, str]  # the MLM head: ferrolm -> Hugging Face
    decoder_bias: str  # the decoder's own copy of the LM-head bias (one parameter when tied)
    classifier: dict[str, str]  # ferrolm.finetune's head -> the sequence-classification class's


def check_config(hf: dict[str, Any], source: str, family: str) -> None:
    checks = (
        ("hidden_act", "gelu"),
        ("position_embedding_type", "absolute"),
        ("is_decoder", False),
        ("add_cross_attention", False),
    )
    for key, ok in checks:
        if hf.get(key, ok) != ok:
            raise FerrolmError(
                f"{source}: {key}={hf[key]!r} is not supported (ferrolm's {family} has {ok!r})"
            )


def hf_config(config: GPTConfig, common: dict[str, Any], position_offset: int) -> dict[str, Any]:
    """The config.json fields BERT and RoBERTa share."""
    return dict(
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_hidden,
        hidden_act="gelu",
        max_position_embeddings=config.block_size + position_offset,
        type_vocab_size=1,
        layer_norm_eps=config.norm_eps,
        position_embedding_type="absolute",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=False,
        **common,
    )


def state_to_hf(
    layout: Layout, weights: dict[str, torch.Tensor], position_offset: int
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name == "transformer.wpe.weight":
            lead = t.new_zeros(position_offset, t.shape[1])  # rows before ferrolm's position 0
            out[layout.prefix + "embeddings.position_embeddings.weight"] = torch.cat([lead, t])
        elif name in _EMBEDDINGS:
            out[layout.prefix + _EMBEDDINGS[name]] = t
        elif name in layout.head:
            out[layout.head[name]] = t
            if name == "lm_head.bias":  # the decoder's own bias: one parameter with this one only
                out[layout.decoder_bias] = t.clone()  # when the embeddings are tied
        else:
            layer, rest = split_layer_name(name)  # transformer.h.{layer}.{rest}
            module, kind = rest.rsplit(".", 1)  # e.g. "attn.c_attn", "weight"
            prefix = f"{layout.prefix}encoder.layer.{layer}."
            if module == "attn.c_attn":
                for part, proj in zip(t.chunk(3, dim=0), _QKV, strict=True):
                    out[f"{prefix}attention.self.{proj}.{kind}"] = part
            else:
                out[f"{prefix}{_LAYER[module]}.{kind}"] = t
    return out


def state_from_hf(
    layout: Layout, hf: dict[str, torch.Tensor], config: GPTConfig, source: str, position_offset: int
) -> dict[str, torch.Tensor]:
    embeddings = {theirs: ours for ours, theirs in _EMBEDDINGS.items()}
    layer_modules = {theirs: ours for ours, theirs in _LAYER.items()}
    head = {theirs: ours for ours, theirs in layout.head.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in hf.items():
        if name in head:
            out[head[name]] = t
            continue
        if name == layout.decoder_bias or name.startswith("classifier."):
            continue  # the tied copy of the LM-head bias; a head ferrolm's MLM model has not
        short = name.removeprefix(layout.prefix)  # a base model's own files have no prefix
        if short.startswith(_IGNORED):
            continue  # buffers, the pooler (a classification head)
        if short == "embeddings.position_embeddings.weight":
            out["transformer.wpe.weight"] = t[position_offset : position_offset + config.block_size]
        elif short == "embeddings.token_type_embeddings.weight":
            out["transformer.wtt.weight"] = t[:1]  # segment 0: the one ferrolm feeds
        elif short in embeddings:
            out[embeddings[short]] = t
        elif short.startswith("encoder.layer."):
            _, _, layer, rest = short.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module.startswith("attention.self.") and module.split(".")[2] in _QKV:
                qkv.setdefault((layer, kind), {})[module.split(".")[2]] = t
            elif module in layer_modules:
                out[f"transformer.h.{layer}.{layer_modules[module]}.{kind}"] = t
            else:
                raise FerrolmError(f"{source}: unexpected tensor {name}")
        else:
            raise FerrolmError(f"{source}: unexpected tensor {name}")
    if "lm_head.bias" not in out and layout.decoder_bias in hf:
        out["lm_head.bias"] = hf[layout.decoder_bias]
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise FerrolmError(f"{source}: layer {layer} lacks some of query/key/value ({kind})")
        out[f"transformer.h.{layer}.attn.c_attn.{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def classifier_to_hf(
    layout: Layout, backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The encoder without its MLM head, then the classification head under its names."""
    encoder = {name: t for name, t in backbone.items() if name.startswith(layout.prefix)}
    missing = sorted(set(layout.classifier) - set(head))
    if missing:
        raise FerrolmError(f"export: the classifier lacks {missing} (this head is pool + score)")
    return {**encoder, **{theirs: head[ours] for ours, theirs in layout.classifier.items()}}
