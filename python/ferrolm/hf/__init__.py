"""Hugging Face layouts, one adapter per architecture: ``config.json`` fields and tensor names, both ways.

Each adapter module (``gpt2``, ``llama``, ``roberta``, ``bert``, ``modernbert``) states only what is its own: how its config.json
maps to ``GPTConfig``, how its tensors are named and laid out, which ``transformers`` classes it
becomes, and its classification head. What every architecture shares lives here: choosing the adapter,
the vocabulary padding (ferrolm pads the embedding to a multiple of ``vocab_multiple``; Hugging Face
files have exactly ``vocab_size`` rows), tied LM heads, float32 tensors, and reading safetensors
directories. Export (files on disk) is ``ferrolm.export``; import is ``GPT.from_pretrained``.

>>> hf_config = config_to_hf(model.config, bos_id=0, eos_id=0)          # doctest: +SKIP
>>> model.load_weights(state_from_hf(hf_state, config, "dir/"))          # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ferrolm._core import FerrolmError

if TYPE_CHECKING:
    import torch

    from ferrolm.model import GPT, GPTConfig

__all__ = [
    "adapter",
    "classifier_to_hf",
    "config_from_hf",
    "config_to_hf",
    "read_safetensors_dir",
    "state_from_hf",
    "state_to_hf",
]

# ferrolm tensors with one row per vocabulary entry (padded in ferrolm, exact in Hugging Face files)
VOCAB_TENSORS = ("transformer.wte.weight", "lm_head.weight", "lm_head.bias")


def _adapters() -> dict[str, ModuleType]:
    from ferrolm.hf import bert, gpt2, llama, modernbert, roberta

    return {"gpt2": gpt2, "llama": llama, "roberta": roberta, "bert": bert, "modernbert": modernbert}


def adapter(arch: str) -> ModuleType:
    """The adapter module of a ferrolm ``arch``."""
    adapters = _adapters()
    if arch not in adapters:
        raise FerrolmError(f"no Hugging Face adapter for arch {arch!r} (adapters: {', '.join(adapters)})")
    return adapters[arch]


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    """A Hugging Face ``config.json`` (as a dict) -> ``GPTConfig``, by its ``model_type``."""
    model_type = hf.get("model_type")
    for module in _adapters().values():
        if module.MODEL_TYPE == model_type:
            return module.config_from_hf(hf, source)
    known = " or ".join(module.MODEL_TYPE for module in _adapters().values())
    raise FerrolmError(f"{source}: model_type {model_type!r} is not supported ({known})")


def config_to_hf(
    config: GPTConfig, *, bos_id: int | None = None, eos_id: int | None = None
) -> dict[str, Any]:
    """The ``config.json`` of ``config``'s Hugging Face LM class (causal LM, or masked LM for an encoder)."""
    if not config.causal and not config.spec.encoder_only:
        raise FerrolmError(
            f"export: masked-LM encoders have no Hugging Face equivalent in arch {config.arch!r} (a "
            "bidirectional pre-norm GPT); pretrain with --preset tiny-roberta (arch 'roberta') for one "
            "that exports as RobertaForMaskedLM"
        )
    common = dict(
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        torch_dtype="float32",
    )
    return adapter(config.arch).config_to_hf(config, common)


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """ferrolm weights -> Hugging Face names and layouts, vocabulary rows cropped to ``vocab_size``."""
    config = model.config
    weights = model.weights()  # a tied lm_head.weight is not in it: the Hugging Face file omits it too
    for name in VOCAB_TENSORS:
        if name in weights:
            weights[name] = weights[name][: config.vocab_size]  # drop the padding rows
    out = adapter(config.arch).state_to_hf(config, weights)
    return {name: t.contiguous() for name, t in out.items()}


def state_from_hf(hf: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts -> ferrolm weights, vocabulary rows padded with zeros."""
    out = adapter(config.arch).state_from_hf(hf, config, source)
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)  # some files store the tied copy too
    for name in VOCAB_TENSORS:
        if name in out:
            t = out[name]
            if t.shape[0] != config.vocab_size:
                raise FerrolmError(
                    f"{source}: {name} has {t.shape[0]} rows, config vocab_size {config.vocab_size}"
                )
            padded = t.new_zeros(config.padded_vocab_size, *t.shape[1:])  # (V_padded, C) or (V_padded,)
            padded[: t.shape[0]] = t
            out[name] = padded
    return {k: v.float() for k, v in out.items()}


def classifier_to_hf(model: GPT, head: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, architecture) of a ``ferrolm.finetune`` classifier as its Hugging Face sequence
    classification class: the backbone's tensors without the LM head, and the head's under its names."""
    module = adapter(model.config.arch)
    return module.classifier_to_hf(state_to_hf(model), head), module.CLASSIFIER_CLASS


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards a ``model.safetensors.index.json`` names."""
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


def split_layer_name(name: str) -> tuple[str, str]:
    """``transformer.h.{layer}.{rest}`` -> (layer, rest)."""
    _, _, layer, rest = name.split(".", 3)
    return layer, rest
