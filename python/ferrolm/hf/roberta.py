"""RoBERTa (``RobertaForMaskedLM``, ``RobertaForSequenceClassification``) <-> ferrolm ``arch="roberta"``.

- Positions: Hugging Face's RoBERTa numbers real tokens from ``pad_token_id + 1`` (fairseq's
  ``make_positions``; pads get ``pad_token_id``), so its position table has ``pad_token_id + 1`` rows
  more than ferrolm's, which counts from 0. Export writes zeros in those leading rows (only the padding
  row is ever read, for pads, which attend and are attended by nothing that is scored), import drops
  them: ``block_size = max_position_embeddings - pad_token_id - 1``. The two agree on every input
  without ``<pad>`` inside a text, which ``encode_ordinary`` never produces (it is a special token).
- ferrolm keeps q, k and v in one matrix (``attn.c_attn``, weight and bias); Hugging Face has
  ``query``/``key``/``value``.
- The token-type embedding: ferrolm feeds one segment, so it keeps row 0 (RoBERTa's files have 1 row;
  BERT-style configs that say 2 lose row 1, which ``token_type_ids=0`` never reads).
- The MLM head: ``lm_head.dense`` + GELU + ``lm_head.layer_norm``, then the decoder (tied to the word
  embeddings unless ``tie_word_embeddings`` is false) with ``lm_head.bias``.
- Classification (``RobertaClassificationHead``): the first token's (``<s>``) hidden state, dense +
  tanh, then ``out_proj``; ferrolm's ``pool`` and ``score`` (``ferrolm.finetune``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ferrolm._core import FerrolmError
from ferrolm.hf import split_layer_name

if TYPE_CHECKING:
    from ferrolm.model import GPTConfig

MODEL_TYPE = "roberta"
LM_CLASS = "RobertaForMaskedLM"
CLASSIFIER_CLASS = "RobertaForSequenceClassification"

_EMBEDDINGS = {  # ferrolm -> Hugging Face (under "roberta."), the position table apart
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
_HEAD = {  # ferrolm -> Hugging Face, the MLM head
    "lm_transform.dense.weight": "lm_head.dense.weight",
    "lm_transform.dense.bias": "lm_head.dense.bias",
    "lm_transform.ln.weight": "lm_head.layer_norm.weight",
    "lm_transform.ln.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
    "lm_head.weight": "lm_head.decoder.weight",  # only when untied
}
_CLASSIFIER = {  # ferrolm.finetune's head -> RobertaClassificationHead
    "pool.weight": "classifier.dense.weight",
    "pool.bias": "classifier.dense.bias",
    "score.weight": "classifier.out_proj.weight",
    "score.bias": "classifier.out_proj.bias",
}
_QKV = ("query", "key", "value")
TOKEN_ROLES = dict(  # tokenizer_config.json: RobertaTokenizer's special tokens by role
    bos_token="<s>", cls_token="<s>", eos_token="</s>", sep_token="</s>", pad_token="<pad>",
    unk_token="<unk>", mask_token="<mask>",
)  # fmt: skip


def post_processor(specials: dict[str, int]) -> dict[str, Any]:
    """tokenizer.json's post-processor: ``<s> a </s>`` (pairs ``<s> a </s></s> b </s>``)."""
    return {
        "type": "RobertaProcessing",
        "sep": ["</s>", specials["</s>"]],
        "cls": ["<s>", specials["<s>"]],
        "trim_offsets": False,
        "add_prefix_space": False,
    }


_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "lm_head.decoder.bias", "pooler.")


def config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    from ferrolm.model import GPTConfig

    checks = (
        ("hidden_act", "gelu"),
        ("position_embedding_type", "absolute"),
        ("is_decoder", False),
        ("add_cross_attention", False),
    )
    for key, ok in checks:
        if hf.get(key, ok) != ok:
            raise FerrolmError(f"{source}: {key}={hf[key]!r} is not supported (ferrolm's RoBERTa has {ok!r})")
    pad = hf.get("pad_token_id")
    if not isinstance(pad, int) or pad < 0:
        raise FerrolmError(
            f"{source}: pad_token_id must be a token id (RoBERTa's positions start after it), got {pad!r}"
        )
    block_size = hf.get("max_position_embeddings", 514) - pad - 1
    if block_size < 1:
        raise FerrolmError(
            f"{source}: max_position_embeddings {hf.get('max_position_embeddings')} leaves no position after "
            f"pad_token_id {pad}"
        )
    return GPTConfig(
        arch="roberta",
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        block_size=block_size,
        vocab_size=hf["vocab_size"],
        mlp_hidden=hf["intermediate_size"],
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        causal=False,
        pad_id=pad,
    )


def config_to_hf(config: GPTConfig, common: dict[str, Any]) -> dict[str, Any]:
    pad = _pad_id(config)
    return dict(
        architectures=[LM_CLASS],
        model_type=MODEL_TYPE,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_hidden,
        hidden_act="gelu",
        max_position_embeddings=config.block_size + pad + 1,
        type_vocab_size=1,
        layer_norm_eps=config.norm_eps,
        position_embedding_type="absolute",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=False,
        pad_token_id=pad,
        **common,
    )


def _pad_id(config: GPTConfig) -> int:
    if config.pad_id is None:
        raise FerrolmError(
            "export: a RoBERTa model needs pad_id (the tokenizer's <pad>): Hugging Face's positions start after it"
        )
    return config.pad_id


def state_to_hf(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pad = _pad_id(config)
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name == "transformer.wpe.weight":
            lead = t.new_zeros(pad + 1, t.shape[1])  # (pad + 1, C): positions before the first token
            out["roberta.embeddings.position_embeddings.weight"] = torch.cat([lead, t])
        elif name in _EMBEDDINGS:
            out["roberta." + _EMBEDDINGS[name]] = t
        elif name in _HEAD:
            out[_HEAD[name]] = t
            if name == "lm_head.bias":  # the decoder's own bias: one parameter with lm_head.bias only
                out["lm_head.decoder.bias"] = t.clone()  # when the embeddings are tied
        else:
            layer, rest = split_layer_name(name)  # transformer.h.{layer}.{rest}
            module, kind = rest.rsplit(".", 1)  # e.g. "attn.c_attn", "weight"
            prefix = f"roberta.encoder.layer.{layer}."
            if module == "attn.c_attn":
                for part, proj in zip(t.chunk(3, dim=0), _QKV, strict=True):
                    out[f"{prefix}attention.self.{proj}.{kind}"] = part
            else:
                out[f"{prefix}{_LAYER[module]}.{kind}"] = t
    return out


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    assert config.pad_id is not None  # config_from_hf sets it
    embeddings = {theirs: ours for ours, theirs in _EMBEDDINGS.items()}
    layer_modules = {theirs: ours for ours, theirs in _LAYER.items()}
    head = {theirs: ours for ours, theirs in _HEAD.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in hf.items():
        if name in head:
            out[head[name]] = t
            continue
        short = name.removeprefix("roberta.")  # a RobertaModel's own files have no prefix
        if short.startswith(_IGNORED) or name.startswith("classifier."):
            continue  # buffers, the tied copy of lm_head.bias, heads ferrolm's MLM model has not
        if short == "embeddings.position_embeddings.weight":
            out["transformer.wpe.weight"] = t[config.pad_id + 1 : config.pad_id + 1 + config.block_size]
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
    if "lm_head.bias" not in out and "lm_head.decoder.bias" in hf:
        out["lm_head.bias"] = hf["lm_head.decoder.bias"]
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise FerrolmError(f"{source}: layer {layer} lacks some of query/key/value ({kind})")
        out[f"transformer.h.{layer}.attn.c_attn.{kind}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out


def classifier_to_hf(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The encoder without its MLM head, then ``classifier.dense`` and ``classifier.out_proj``."""
    encoder = {name: t for name, t in backbone.items() if name.startswith("roberta.")}
    missing = sorted(set(_CLASSIFIER) - set(head))
    if missing:
        raise FerrolmError(f"export: the classifier lacks {missing} (a RoBERTa head is pool + score)")
    return {**encoder, **{theirs: head[ours] for ours, theirs in _CLASSIFIER.items()}}
