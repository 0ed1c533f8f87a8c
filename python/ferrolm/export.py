"""Hugging Face export: a ferrolm model (or run directory) -> a directory ``transformers`` loads.

Writes ``config.json`` (``GPT2LMHeadModel`` or ``LlamaForCausalLM``; for a ``ferrolm finetune`` classifier
``GPT2ForSequenceClassification`` or ``LlamaForSequenceClassification``), ``model.safetensors`` (metadata
``{"format": "pt"}``, vocabulary padding cropped), ``generation_config.json``, and the tokenizer:
``tokenizer.json`` plus a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, so that
``AutoTokenizer.from_pretrained`` works too. Every file goes through a temporary name and a rename.

>>> export_run("runs/tiny", "hf/tiny")                                   # doctest: +SKIP
>>> GPT2LMHeadModel.from_pretrained("hf/tiny")                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ferrolm.model import GPT, GPTConfig, config_to_hf, state_to_hf

__all__ = ["export_classifier", "export_hf", "export_run"]


def export_hf(
    model: GPT,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_file: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer_file``, a ``tokenizer.json``) as a Hugging Face directory."""
    return _write_hf(out_dir, model.config, state_to_hf(model), tokenizer_file)


def export_classifier(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Export a ``ferrolm finetune`` output as ``GPT2ForSequenceClassification`` (or
    ``LlamaForSequenceClassification``): the backbone as in the LM export without its LM head,
    ``score.weight``, ``num_labels``, ``id2label``/``label2id`` (label names as strings, as Hugging Face
    keeps them) and ``pad_token_id`` (the padding the classifier was trained with)."""
    from ferrolm.finetune import Classifier

    classifier = Classifier.load(run_dir)
    meta, gpt = classifier.meta, classifier.model.gpt
    state = state_to_hf(gpt)
    state.pop("lm_head.weight", None)  # an untied LM head: the classification class has none
    state["score.weight"] = classifier.model.score.weight
    labels = [str(label) for label in meta["labels"]]
    head = dict(
        architectures=[
            "GPT2ForSequenceClassification" if gpt.config.arch == "gpt2" else "LlamaForSequenceClassification"
        ],
        num_labels=len(labels),
        id2label={str(i): label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
        pad_token_id=meta["pad_token_id"],
        problem_type="single_label_classification",
    )
    return _write_hf(out_dir, gpt.config, state, Path(run_dir) / "tokenizer.json", head)


def _write_hf(
    out_dir: str | os.PathLike[str],
    config: GPTConfig,
    hf_state: dict[str, torch.Tensor],
    tokenizer_file: str | os.PathLike[str] | None,
    head: dict[str, Any] | None = None,
) -> Path:
    """config.json (the LM config, updated by a classification ``head``), weights, tokenizer files."""
    from safetensors.torch import save_file

    from ferrolm._files import atomic_file, atomic_write_text, copy_file_atomic
    from ferrolm.checkpoint import check_finite, check_vocab

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos_id = bos_id = None
    eos_token = None
    if tokenizer_file is not None:
        from ferrolm import Tokenizer

        tok = Tokenizer.from_pretrained(tokenizer_file)
        check_vocab(tok.vocab_size, config.vocab_size, tokenizer_file, "being exported")
        eos_id = bos_id = tok.eot_token
        eos_token = next((name for name, i in tok.special_tokens.items() if i == eos_id), None)
    hf_config = {**config_to_hf(config, bos_id=bos_id, eos_id=eos_id), **(head or {})}
    state = {k: v.detach().float().cpu().contiguous() for k, v in hf_state.items()}
    check_finite(state, "export", ": the weights diverged; nothing was exported")
    with atomic_file(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n")
    generation: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    if tokenizer_file is not None:
        copy_file_atomic(tokenizer_file, out / "tokenizer.json")
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.block_size,
            "bos_token": eos_token,
            "eos_token": eos_token,
            "unk_token": None,
        }
        if head is not None:  # a classifier pads batches, with the token it was trained with
            tok_config["pad_token"] = eos_token if head["pad_token_id"] == eos_id else None
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    return out


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Export the latest checkpoint of a ``ferrolm pretrain`` run directory, or a ``ferrolm finetune``
    output (a classifier, see ``export_classifier``)."""
    from ferrolm.checkpoint import load_model
    from ferrolm.finetune import CLASSIFIER_FILE

    if (Path(run_dir) / CLASSIFIER_FILE).is_file():
        return export_classifier(run_dir, out_dir)
    model = load_model(run_dir)
    tokenizer = Path(run_dir) / "tokenizer.json"
    return export_hf(model, out_dir, tokenizer_file=tokenizer if tokenizer.is_file() else None)
