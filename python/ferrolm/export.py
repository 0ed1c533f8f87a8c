"""Hugging Face export: a ferrolm model (or run directory) -> a directory ``transformers`` loads.

Writes ``config.json`` (``GPT2LMHeadModel``, ``LlamaForCausalLM``, or for an encoder
``RobertaForMaskedLM`` / ``ModernBertForMaskedLM``; for a ``ferrolm finetune`` classifier the family's
``...ForSequenceClassification``: the adapters of ``ferrolm.hf`` say which), ``model.safetensors``
(metadata ``{"format": "pt"}``, vocabulary padding cropped), ``generation_config.json``, and the
tokenizer: ``tokenizer.json`` plus a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, so
that ``AutoTokenizer.from_pretrained`` works too (an encoder's tokenizer frames texts as its family's
does: ``<s> text </s>``, ``[CLS] text [SEP]``). Every file goes through a temporary name and a rename.

>>> export_run("runs/tiny", "hf/tiny")                                   # doctest: +SKIP
>>> GPT2LMHeadModel.from_pretrained("hf/tiny")                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ferrolm.hf import classifier_to_hf
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
    """Export a ``ferrolm finetune`` output as ``GPT2ForSequenceClassification``,
    ``LlamaForSequenceClassification``, ``RobertaForSequenceClassification`` or
    ``ModernBertForSequenceClassification`` (the backbone's family): the backbone as in the LM export
    without its LM head, the head under the class's names (``score``; RoBERTa's ``classifier.dense`` +
    ``classifier.out_proj``; ModernBERT's ``head`` + ``classifier``), ``num_labels``, ``id2label``/``label2id``
    (label names as strings, as Hugging Face keeps them) and ``pad_token_id`` (the padding the classifier
    was trained with)."""
    from ferrolm.finetune import Classifier

    classifier = Classifier.load(run_dir)
    meta, gpt = classifier.meta, classifier.model.gpt
    state, architecture = classifier_to_hf(gpt, classifier.model.head_weights())
    labels = [str(label) for label in meta["labels"]]
    head = dict(
        architectures=[architecture],
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
    specials: dict[str, int] = {}
    if tokenizer_file is not None:
        from ferrolm import Tokenizer

        tok = Tokenizer.from_pretrained(tokenizer_file)
        check_vocab(tok.vocab_size, config.vocab_size, tokenizer_file, "being exported")
        specials = tok.special_tokens
        eos_id = bos_id = tok.eot_token
        eos_token = next((name for name, i in tok.special_tokens.items() if i == eos_id), None)
        frame = config.spec.frame_tokens  # an encoder's: <s> (or [CLS]) begins a text, </s> ([SEP]) ends it
        if frame:
            bos_id, eos_id = specials.get(frame[0], bos_id), specials.get(frame[1], eos_id)
    hf_config = {**config_to_hf(config, bos_id=bos_id, eos_id=eos_id), **(head or {})}
    state = {k: v.detach().float().cpu().contiguous() for k, v in hf_state.items()}
    check_finite(state, "export", ": the weights diverged; nothing was exported")
    with atomic_file(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n")
    generation: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    if tokenizer_file is not None and config.spec.frame_tokens:
        framed = _framed_tokenizer_json(Path(tokenizer_file), config, specials)
        atomic_write_text(out / "tokenizer.json", framed)
        roles = _encoder_token_roles(config, specials)
        atomic_write_text(out / "tokenizer_config.json", json.dumps(roles, indent=2) + "\n")
    elif tokenizer_file is not None:
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


def _framed_tokenizer_json(path: Path, config: GPTConfig, specials: dict[str, int]) -> str:
    """The tokenizer.json with the family's post-processor (RoBERTa's ``<s> text </s>``, ModernBERT's
    ``[CLS] text [SEP]``): what ``ferrolm.finetune.text_frame`` feeds the classifier."""
    from ferrolm._core import FerrolmError
    from ferrolm.hf import adapter

    missing = [name for name in config.spec.frame_tokens if name not in specials]
    if missing:
        raise FerrolmError(f"{path}: a {config.arch} tokenizer needs {', '.join(missing)}")
    data = json.loads(path.read_text(encoding="utf-8"))
    for token in data.get("added_tokens") or []:
        if token.get("content") == config.spec.mask_token:  # "a <mask>" fills the word and its space
            token["lstrip"] = True
    data["post_processor"] = adapter(config.arch).post_processor(specials)
    return json.dumps(data, ensure_ascii=False)


def _encoder_token_roles(config: GPTConfig, specials: dict[str, int]) -> dict[str, Any]:
    """tokenizer_config.json of an encoder: its special tokens by role (the adapter's names)."""
    from ferrolm.hf import adapter

    roles = adapter(config.arch).TOKEN_ROLES
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.block_size,
        **{role: name if name in specials else None for role, name in roles.items()},
    }


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
