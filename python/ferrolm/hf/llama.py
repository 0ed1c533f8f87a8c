"""Llama (``LlamaForCausalLM``, ``LlamaForSequenceClassification``) <-> ferrolm ``arch="llama"``.

ferrolm keeps q, k and v in one matrix (``attn.c_attn``: query rows, then key, then value); Hugging Face
has ``q_proj``/``k_proj``/``v_proj``. RoPE uses the same "rotate half" layout on both sides, so no
permutation is needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ferrolm._core import FerrolmError
from ferrolm.hf import split_layer_name

if TYPE_CHECKING:
    from ferrolm.model import GPTConfig

MODEL_TYPE = "llama"
LM_CLASS = "LlamaForCausalLM"
CLASSIFIER_CLASS = "LlamaForSequenceClassification"

_NAMES = {  # ferrolm block tensor -> Hugging Face Llama layer tensor
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    from ferrolm.model import GPTConfig

    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise FerrolmError(f"{source}: {key}={hf[key]!r} is not supported (ferrolm's Llama has {ok!r})")
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


def config_to_hf(config: GPTConfig, common: dict[str, Any]) -> dict[str, Any]:
    return dict(
        architectures=[LM_CLASS],
        model_type=MODEL_TYPE,
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
        use_cache=True,
        **common,
    )


def state_to_hf(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    assert config.n_kv_head is not None
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "transformer.ln_f.weight":
            out["model.norm.weight"] = t
        elif name == "lm_head.weight":
            out[name] = t
        else:
            layer, rest = split_layer_name(name)  # transformer.h.{layer}.{rest}
            prefix = f"model.layers.{layer}."
            if rest == "attn.c_attn.weight":
                sizes = [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
                for part, proj in zip(t.split(sizes, dim=0), _QKV, strict=True):
                    out[f"{prefix}self_attn.{proj}.weight"] = part
            else:
                out[prefix + _NAMES[rest]] = t
    return out


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    inverse = {hf_name: ours for ours, hf_name in _NAMES.items()}
    out: dict[str, torch.Tensor] = {}
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
            if rest.startswith("self_attn.") and rest.split(".")[1] in _QKV:
                qkv.setdefault(layer, {})[rest.split(".")[1]] = t
            elif rest in inverse:
                out[f"transformer.h.{layer}.{inverse[rest]}"] = t
            elif "rotary_emb" not in rest:
                raise FerrolmError(f"{source}: unexpected tensor {name}")
    for layer, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise FerrolmError(f"{source}: layer {layer} lacks some of q_proj/k_proj/v_proj")
        out[f"transformer.h.{layer}.attn.c_attn.weight"] = torch.cat(
            [parts[p] for p in _QKV], dim=0
        )  # (H*D + 2*H_kv*D, C)
    return out


def classifier_to_hf(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The backbone without its LM head (the classification class has none), ``score.weight``."""
    backbone.pop("lm_head.weight", None)
    return {**backbone, "score.weight": head["score.weight"]}
