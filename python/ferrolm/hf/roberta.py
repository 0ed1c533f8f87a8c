"""RoBERTa (``RobertaForMaskedLM``, ``RobertaForSequenceClassification``) <-> ferrolm ``arch="roberta"``.

The encoder's tensors map as in every BERT-family model (``ferrolm.hf._bert_family``). RoBERTa's own:

- Positions: Hugging Face's RoBERTa numbers real tokens from ``pad_token_id + 1`` (fairseq's
  ``make_positions``; pads get ``pad_token_id``), so its position table has ``pad_token_id + 1`` rows
  more than ferrolm's, which counts from 0: ``block_size = max_position_embeddings - pad_token_id - 1``.
  The two agree on every input without ``<pad>`` inside a text, which ``encode_ordinary`` never
  produces (it is a special token).
- The MLM head: ``lm_head.dense`` + GELU + ``lm_head.layer_norm``, then the decoder (tied to the word
  embeddings unless ``tie_word_embeddings`` is false) with ``lm_head.bias``.
- Classification (``RobertaClassificationHead``): the first token's (``<s>``) hidden state, dense +
  tanh, then ``out_proj``; ferrolm's ``pool`` and ``score`` (``ferrolm.finetune``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferrolm._core import FerrolmError
from ferrolm.hf import _bert_family as family

if TYPE_CHECKING:
    import torch

    from ferrolm.model import GPTConfig

MODEL_TYPE = "roberta"
LM_CLASS = "RobertaForMaskedLM"
CLASSIFIER_CLASS = "RobertaForSequenceClassification"
TOKEN_ROLES = dict(  # tokenizer_config.json: RobertaTokenizer's special tokens by role
    bos_token="<s>", cls_token="<s>", eos_token="</s>", sep_token="</s>", pad_token="<pad>",
    unk_token="<unk>", mask_token="<mask>",
)  # fmt: skip
LAYOUT = family.Layout(
    prefix="roberta.",
    head={
        "lm_transform.dense.weight": "lm_head.dense.weight",
        "lm_transform.dense.bias": "lm_head.dense.bias",
        "lm_transform.ln.weight": "lm_head.layer_norm.weight",
        "lm_transform.ln.bias": "lm_head.layer_norm.bias",
        "lm_head.bias": "lm_head.bias",
        "lm_head.weight": "lm_head.decoder.weight",  # only when untied
    },
    decoder_bias="lm_head.decoder.bias",
    classifier={
        "pool.weight": "classifier.dense.weight",
        "pool.bias": "classifier.dense.bias",
        "score.weight": "classifier.out_proj.weight",
        "score.bias": "classifier.out_proj.bias",
    },
)


def post_processor(specials: dict[str, int]) -> dict[str, Any]:
    """tokenizer.json's post-processor: ``<s> a </s>`` (pairs ``<s> a </s></s> b </s>``)."""
    return {
        "type": "RobertaProcessing",
        "sep": ["</s>", specials["</s>"]],
        "cls": ["<s>", specials["<s>"]],
        "trim_offsets": False,
        "add_prefix_space": False,
    }


def config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    from ferrolm.model import GPTConfig

    family.check_config(hf, source, "RoBERTa")
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
        pad_token_id=pad,
        **family.hf_config(config, common, position_offset=pad + 1),
    )


def _pad_id(config: GPTConfig) -> int:
    if config.pad_id is None:
        raise FerrolmError(
            "export: a RoBERTa model needs pad_id (the tokenizer's <pad>): Hugging Face's positions start after it"
        )
    return config.pad_id


def state_to_hf(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return family.state_to_hf(LAYOUT, weights, position_offset=_pad_id(config) + 1)


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    assert config.pad_id is not None  # config_from_hf sets it
    return family.state_from_hf(LAYOUT, hf, config, source, position_offset=config.pad_id + 1)


def classifier_to_hf(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return family.classifier_to_hf(LAYOUT, backbone, head)
