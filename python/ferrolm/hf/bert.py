"""BERT (``BertForMaskedLM``, ``BertForSequenceClassification``) <-> ferrolm ``arch="bert"``.

The encoder's tensors map as in every BERT-family model (``ferrolm.hf._bert_family``); positions start
at 0 as ferrolm's do. The MLM head is ``cls.predictions`` (transform dense + LayerNorm, decoder, bias);
classification reads ``[CLS]`` through the pooler (dense + tanh, ``bert.pooler.dense``) and
``classifier``: ferrolm's ``pool`` and ``score``. A ``BertForMaskedLM`` file has no pooler: fine-tuning
starts it fresh, as transformers does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferrolm.hf import _bert_family as family

if TYPE_CHECKING:
    import torch

    from ferrolm.model import GPTConfig

MODEL_TYPE = "bert"
LM_CLASS = "BertForMaskedLM"
CLASSIFIER_CLASS = "BertForSequenceClassification"
TOKEN_ROLES = dict(
    cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
)
LAYOUT = family.Layout(
    prefix="bert.",
    head={
        "lm_transform.dense.weight": "cls.predictions.transform.dense.weight",
        "lm_transform.dense.bias": "cls.predictions.transform.dense.bias",
        "lm_transform.ln.weight": "cls.predictions.transform.LayerNorm.weight",
        "lm_transform.ln.bias": "cls.predictions.transform.LayerNorm.bias",
        "lm_head.bias": "cls.predictions.bias",
        "lm_head.weight": "cls.predictions.decoder.weight",  # only when untied
    },
    decoder_bias="cls.predictions.decoder.bias",
    classifier={
        "pool.weight": "bert.pooler.dense.weight",
        "pool.bias": "bert.pooler.dense.bias",
        "score.weight": "classifier.weight",
        "score.bias": "classifier.bias",
    },
)


def post_processor(specials: dict[str, int]) -> dict[str, Any]:
    """tokenizer.json's post-processor: ``[CLS] a [SEP]`` (pairs ``[CLS] a [SEP] b [SEP]``)."""
    return {
        "type": "BertProcessing",
        "sep": ["[SEP]", specials["[SEP]"]],
        "cls": ["[CLS]", specials["[CLS]"]],
    }


def config_from_hf(hf: dict[str, Any], source: str) -> GPTConfig:
    from ferrolm.model import GPTConfig

    family.check_config(hf, source, "BERT")
    return GPTConfig(
        arch="bert",
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        block_size=hf.get("max_position_embeddings", 512),
        vocab_size=hf["vocab_size"],
        mlp_hidden=hf["intermediate_size"],
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        causal=False,
        pad_id=hf.get("pad_token_id"),
    )


def config_to_hf(config: GPTConfig, common: dict[str, Any]) -> dict[str, Any]:
    return dict(
        architectures=[LM_CLASS],
        model_type=MODEL_TYPE,
        pad_token_id=config.pad_id,
        **family.hf_config(config, common, position_offset=0),
    )


def state_to_hf(config: GPTConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return family.state_to_hf(LAYOUT, weights, position_offset=0)


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    return family.state_from_hf(LAYOUT, hf, config, source, position_offset=0)


def classifier_to_hf(
    backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return family.classifier_to_hf(LAYOUT, backbone, head)
