"""Hugging Face export: a ferrolm model (or run directory) -> a directory ``transformers`` loads.

Writes ``config.json`` (``GPT2LMHeadModel`` or ``LlamaForCausalLM``), ``model.safetensors`` (metadata
``{"format": "pt"}``, vocabulary padding cropped), ``generation_config.json``, and the tokenizer:
``tokenizer.json`` plus a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, so that
``AutoTokenizer.from_pretrained`` works too. Every file goes through a temporary name and a rename.

>>> export_run("runs/tiny", "hf/tiny")                                   # doctest: +SKIP
>>> GPT2LMHeadModel.from_pretrained("hf/tiny")                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ferrolm.model import GPT, config_to_hf, state_to_hf

__all__ = ["export_hf", "export_run"]


def export_hf(
    model: GPT,
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_file: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer_file``, a ``tokenizer.json``) as a Hugging Face directory."""
    from safetensors.torch import save_file

    from ferrolm.train import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos_id = bos_id = None
    eos_token = None
    if tokenizer_file is not None:
        from ferrolm import Tokenizer

        tok = Tokenizer.from_pretrained(tokenizer_file)
        eos_id = bos_id = tok.eot_token
        eos_token = next((name for name, i in tok.special_tokens.items() if i == eos_id), None)
    hf_config = config_to_hf(model.config, bos_id=bos_id, eos_id=eos_id)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state_to_hf(model).items()}
    tmp = out / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    atomic_write_text(out / "config.json", json.dumps(hf_config, indent=2) + "\n")
    generation: dict[str, Any] = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    atomic_write_text(out / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    if tokenizer_file is not None:
        tmp = out / ".tokenizer.json.tmp"
        shutil.copyfile(tokenizer_file, tmp)
        os.replace(tmp, out / "tokenizer.json")
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.config.block_size,
            "bos_token": eos_token,
            "eos_token": eos_token,
            "unk_token": None,
        }
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_config, indent=2) + "\n")
    return out


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Export the latest checkpoint of a ``ferrolm pretrain`` run directory."""
    from ferrolm.train import load_model

    model = load_model(run_dir)
    tokenizer = Path(run_dir) / "tokenizer.json"
    return export_hf(model, out_dir, tokenizer_file=tokenizer if tokenizer.is_file() else None)
