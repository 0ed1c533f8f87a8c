"""ModernBERT (``ModernBertForMaskedLM``, ``ModernBertForSequenceClassification``) <-> ``arch="modernbert"``.

ferrolm's model has one attention kind, so only ModernBERT with global attention in every layer maps
(``layer_types`` all ``"full_attention"``, i.e. ``global_attn_every_n_layers=1``; the Hub's ModernBERT
checkpoints alternate sliding-window layers and are refused with that reason). RoPE is the same
"rotate half" layout; ``Wqkv`` is ferrolm's ``c_attn`` (query rows, key rows, value rows); ``mlp.Wi`` is
``[w_gate; w_up]`` (ModernBERT activates the first half); layer 0 has no ``attn_norm``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ferrolm._core import FerrolmError
from ferrolm.hf import split_layer_name

if TYPE_CHECKING:
    from ferrolm.model import GPTConfig

MODEL_TYPE = "modernbert"
LM_CLASS = "ModernBertForMaskedLM"
CLASSIFIER_CLASS = "ModernBertForSequenceClassification"
TOKEN_ROLES = dict(
    cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
)

_NAMES = {  # ferrolm -> Hugging Face; the MLP's Wi apart
    "transformer.wte.weight": "model.embeddings.tok_embeddings.weight",
    "transformer.ln_e.weight": "model.embeddings.norm.weight",
    "transformer.ln_f.weight": "model.final_norm.weight",
    "lm_transform.dense.weight": "head.dense.weight",
    "lm_transform.ln.weight": "head.norm.weight",
    "lm_head.bias": "decoder.bias",
    "lm_head.weight": "decoder.weight",  # only when untied
}
_LAYER = {  # ferrolm block tensor -> Hugging Face layer tensor
    "ln_1.weight": "attn_norm.weight",
    "attn.c_attn.weight": "attn.Wqkv.weight",
    "attn.c_proj.weight": "attn.Wo.weight",
    "ln_2.weight": "mlp_norm.weight",
    "mlp.c_proj.weight": "mlp.Wo.weight",
}
_CLASSIFIER = {  # ferrolm.finetune's head -> ModernBertForSequenceClassification's
    "pool.weight": "head.dense.weight",
    "pool_norm.weight": "head.norm.weight",
    "score.weight": "classifier.weight",
    "score.bias": "classifier.bias",
}


def config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    from ferrolm.model import GPTConfig

    checks = (
        ("hidden_activation", "gelu"),
        ("classifier_activation", "gelu"),
        ("norm_bias", False),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("classifier_bias", False),
        ("decoder_bias", True),
    )
    for key, ok in checks:
        if hf.get(key, ok) != ok:
            raise FerrolmError(
                f"{source}: {key}={hf[key]!r} is not supported (ferrolm's ModernBERT has {ok!r})"
            )
    n_layer = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "full_attention" if i % hf.get("global_attn_every_n_layers", 3) == 0 else "sliding_attention"
        for i in range(n_layer)
    ]
    if any(kind != "full_attention" for kind in layer_types):
        raise FerrolmError(
            f"{source}: sliding-window attention layers ({layer_types}) are not supported: ferrolm's "
            "ModernBERT attends globally in every layer (global_attn_every_n_layers=1)"
        )
    rope = (hf.get("rope_parameters") or {}).get("full_attention") or {}
    if rope.get("rope_type", "default") != "default":
        raise FerrolmError(f"{source}: RoPE scaling {rope!r} is not supported (default RoPE only)")
    return GPTConfig(
        arch="modernbert",
        n_layer=n_layer,
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        block_size=hf.get("max_position_embeddings", 8192),
        vocab_size=hf["vocab_size"],
        mlp_hidden=hf["intermediate_size"],
        norm_eps=hf.get("norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", hf.get("global_rope_theta", 160000.0)),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        causal=False,
        pad_id=hf.get("pad_token_id"),
    )


def config_to_hf(config: GPTConfig, common: dict[str, Any]) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    return dict(
        architectures=[LM_CLASS],
        model_type=MODEL_TYPE,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_hidden,
        max_position_embeddings=config.block_size,
        hidden_activation="gelu",
        classifier_activation="gelu",
        norm_eps=config.norm_eps,
        norm_bias=False,
        attention_bias=False,
        mlp_bias=False,
        classifier_bias=False,
        decoder_bias=True,
        global_attn_every_n_layers=1,
        layer_types=["full_attention"] * config.n_layer,
        local_attention=config.block_size,  # unused: no layer slides
        rope_parameters={"full_attention": rope, "sliding_attention": rope},  # transformers >= 5
        global_rope_theta=config.rope_theta,  # transformers < 5
        classifier_pooling="cls",
        embedding_dropout=0.0,
        attention_dropout=0.0,
        mlp_dropout=0.0,
        pad_token_id=config.pad_id,
        cls_token_id=common["bos_token_id"],
        sep_token_id=common["eos_token_id"],
        **common,
    )


def post_processor(specials: dict[str, int]) -> dict[str, Any]:
    """tokenizer.json's post-processor: ``[CLS] a [SEP]`` (pairs ``[CLS] a [SEP] b [SEP]``)."""

    def special(name: str, type_id: int = 0) -> dict[str, Any]:
        return {"SpecialToken": {"id": name, "type_id": type_id}}

    def sequence(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {
        "type": "TemplateProcessing",
        "single": [special("[CLS]"), sequence("A", 0), special("[SEP]")],
        "pair": [special("[CLS]"), sequence("A", 0), special("[SEP]"), sequence("B", 1), special("[SEP]", 1)],
        "special_tokens": {
            name: {"id": name, "ids": [specials[name]], "tokens": [name]} for name in ("[CLS]", "[SEP]")
        },
    }


def state_to_hf(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    gates: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights.items():
        if name in _NAMES:
            out[_NAMES[name]] = t
            continue
        layer, rest = split_layer_name(name)  # transformer.h.{layer}.{rest}
        if rest in ("mlp.w_gate.weight", "mlp.w_up.weight"):
            gates.setdefault(layer, {})[rest] = t
        else:
            out[f"model.layers.{layer}.{_LAYER[rest]}"] = t
    for layer, parts in gates.items():
        out[f"model.layers.{layer}.mlp.Wi.weight"] = torch.cat(
            [parts["mlp.w_gate.weight"], parts["mlp.w_up.weight"]]
        )
    return out


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    names = {theirs: ours for ours, theirs in _NAMES.items()}
    layer_names = {theirs: ours for ours, theirs in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        if name in names:
            out[names[name]] = t
        elif name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            if rest == "mlp.Wi.weight":
                gate, up = t.chunk(2, dim=0)  # ModernBERT's act(input) * gate: input is the first half
                out[f"transformer.h.{layer}.mlp.w_gate.weight"] = gate
                out[f"transformer.h.{layer}.mlp.w_up.weight"] = up
            elif rest in layer_names:
                out[f"transformer.h.{layer}.{layer_names[rest]}"] = t
            else:
                raise FerrolmError(f"{source}: unexpected tensor {name}")
        elif not name.startswith("classifier."):
            raise FerrolmError(f"{source}: unexpected tensor {name}")
    return out


def classifier_to_hf(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The encoder without its MLM head (``head.*``, ``decoder.*``), then the classification head."""
    encoder = {name: t for name, t in backbone.items() if name.startswith("model.")}
    missing = sorted(set(_CLASSIFIER) - set(head))
    if missing:
        raise FerrolmError(
            f"export: the classifier lacks {missing} (a ModernBERT head is pool + pool_norm + score)"
        )
    return {**encoder, **{theirs: head[ours] for ours, theirs in _CLASSIFIER.items()}}
