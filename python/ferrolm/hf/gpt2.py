"""GPT-2 (``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``) <-> ferrolm ``arch="gpt2"``.

ferrolm's names are GPT-2's (``transformer.h.0.attn.c_attn.weight``...); GPT-2's ``Conv1D`` layers store
their weights transposed, (in, out). The Hub's own files (``gpt2``, ``gpt2-medium``) name tensors
without the ``transformer.`` prefix and keep the causal mask as a buffer; both are read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferrolm._core import FerrolmError

if TYPE_CHECKING:
    import torch

    from ferrolm.model import GPTConfig

MODEL_TYPE = "gpt2"
LM_CLASS = "GPT2LMHeadModel"
CLASSIFIER_CLASS = "GPT2ForSequenceClassification"

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    from ferrolm.model import GPTConfig

    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise FerrolmError(f"{source}: activation_function {activation!r} (ferrolm's GPT-2 uses tanh GELU)")
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


def config_to_hf(config: GPTConfig, common: dict[str, Any]) -> dict[str, Any]:
    if config.n_kv_head != config.n_head:
        raise FerrolmError("export: GPT-2 has no grouped-query attention (use arch='llama' for n_kv_head)")
    return dict(
        architectures=[LM_CLASS],
        model_type=MODEL_TYPE,
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
        use_cache=True,
        **common,
    )


def state_to_hf(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.t() if name.endswith(_CONV1D) else t for name, t in weights.items()}


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in hf.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # the Hub's gpt2 files have no prefix
        out[name] = t.t() if name.endswith(_CONV1D) else t
    return out


def classifier_to_hf(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The backbone without its LM head (the classification class has none), ``score.weight``."""
    backbone.pop("lm_head.weight", None)
    return {**backbone, "score.weight": head["score.weight"]}
