"""Checkpoints of a ``ferrolm pretrain`` run: what one holds, how it is written, and everything that is
checked before one is trusted.

A run directory holds ``checkpoints/step-NNNNNNNN/`` (``model.safetensors``, ``optimizer.safetensors``,
``state.json``) and the pointer ``checkpoints/latest`` naming the newest complete one. No pickle:
tensors in safetensors, everything else in JSON.

- Writing (convention 8): the directory is built under a temporary name, each file fsynced, renamed
  into place (``ferrolm._files.publish_directory``), and only then ``latest`` replaced: a crash at any
  point leaves the last good checkpoint and its pointer intact. Weights holding NaN or infinity are
  refused: a checkpoint is always one a run can continue from.
- Reading: ``latest`` must name a ``step-NNNNNNNN`` directory inside ``checkpoints/`` (no ``../``, no
  absolute path, no symlink out); every field of ``state.json`` is type- and range-checked; ``files``
  lists every tensor file with its size and sha256, each verified; a safetensors file that ``files``
  does not list is refused. Each problem is one ``FerrolmError`` naming the file and the field.
"""

from __future__ import annotations

import base64
import binascii
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, NoReturn

import torch

from ferrolm._core import FerrolmError
from ferrolm._files import (
    atomic_write_json,
    atomic_write_text,
    publish_directory,
    read_json,
    read_text,
    sha256_file,
)
from ferrolm.model import GPT, GPTConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TENSOR_FILES",
    "check_file",
    "check_finite",
    "check_vocab",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "model_config_from",
    "read_tensors",
    "read_versioned_json",
    "save_checkpoint",
    "validate_state",
    "write_checkpoint",
]

CHECKPOINT_FORMAT = "ferrolm-checkpoint"
# 2: ``files`` records each tensor file's size and sha256 (1 recorded the sha256 only).
CHECKPOINT_VERSION = 2
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")  # every tensor file a resume reads
STEP_NAME = re.compile(r"step-[0-9]{8,}")  # what ``latest`` may name
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------------------------------
# Random generators and the optimizer as JSON + flat tensors


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_state(mlm_generator: torch.Generator | None) -> dict[str, Any]:
    """Every random stream of this process: Python's, torch CPU and CUDA, the masked-LM masker."""
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "mlm": _b64(mlm_generator.get_state()) if mlm_generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], mlm_generator: torch.Generator | None, source: str) -> None:
    """The inverse of ``rng_state``; a malformed record is one error naming ``source``."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(_unb64(state["torch_cpu"]))
        if state["torch_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])
        if mlm_generator is not None and state["mlm"] is not None:
            mlm_generator.set_state(_unb64(state["mlm"]))
    except (KeyError, TypeError, ValueError, RuntimeError, binascii.Error) as error:
        raise FerrolmError(f"{source}: rng: not a random-generator state ({error})") from None


def optimizer_tensors(
    optimizer: torch.optim.Optimizer | dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW's state (an optimizer, or its state dict in torch.optim's index layout) as flat tensors
    ``state.{param index}.{exp_avg|exp_avg_sq|step}`` plus JSON groups."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": value.detach().cpu().contiguous()
        for index, entries in sd["state"].items()
        for key, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str) -> dict[str, Any]:
    """The inverse of ``optimizer_tensors``: a state dict ``optimizer.load_state_dict`` takes."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise FerrolmError(f"{source}: tensor {name[:80]!r} is not an optimizer state.INDEX.KEY")
        state.setdefault(int(parts[1]), {})[parts[2]] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------------------
# Checks shared by checkpoints, export, generation and fine-tuning


def check_finite(tensors: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Refuse weights holding NaN or infinity (a diverged run): naming the first such tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise FerrolmError(
                f"{source}: {name} holds {bad} NaN or infinite value(s) of {tensor.numel()}{hint}"
            )


def check_vocab(tokenizer_size: int, model_vocab: int, tokenizer_source: Any, model_source: Any) -> None:
    """A tokenizer whose ids reach past the model's embedding rows cannot be used with it."""
    if tokenizer_size > model_vocab:
        raise FerrolmError(
            f"{tokenizer_source}: the tokenizer has {tokenizer_size} tokens but the model {model_source} "
            f"has vocab_size {model_vocab}: its ids would index past the embedding; use the tokenizer "
            "the model was trained with"
        )


def check_file(file: Path, sha256: str | None, named_by: Path, size: int | None = None) -> None:
    """``file`` exists, is a regular file and (when given) has the size and digest ``named_by``
    recorded for it."""
    if not file.is_file():
        raise FerrolmError(f"{file}: missing (named by {named_by})")
    if size is not None and file.stat().st_size != size:
        raise FerrolmError(
            f"{file}: corrupt ({file.stat().st_size} bytes, {named_by} records {size}: truncated or replaced)"
        )
    if sha256 is not None and sha256_file(file) != sha256:
        raise FerrolmError(f"{file}: corrupt (sha256 differs from the one recorded in {named_by})")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FerrolmError(f"{path}: no such file (expected a safetensors file)")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors' own error type for malformed files
        raise FerrolmError(f"{path}: not a readable safetensors file ({error})") from None


def read_versioned_json(path: Path, format_name: str, version: int, kind: str) -> dict[str, Any]:
    """A ferrolm JSON record (checkpoint state, classifier) whose ``format`` and ``version`` must match."""
    data = read_json(path, f"a ferrolm {kind} record (JSON)")
    found = data.get("format") if isinstance(data, dict) else None
    if found != format_name:
        raise FerrolmError(f"{path}: not a ferrolm {kind} (format={_short(found)})")
    if data.get("version") != version:
        raise FerrolmError(
            f"{path}: {kind} format version {_short(data.get('version'))}; this ferrolm reads version {version}"
        )
    return data


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def model_config_from(data: Any, source: Any) -> GPTConfig:
    """A GPTConfig from a recorded ``model_config``; any bad field is one error naming ``source``."""
    if not isinstance(data, dict):
        raise FerrolmError(f"{source}: model_config must be an object, got {_short(data)}")
    try:
        return GPTConfig.from_dict(data)
    except (FerrolmError, TypeError, ValueError) as error:
        raise FerrolmError(f"{source}: model_config: {error}") from None


# ----------------------------------------------------------------------------------------------------
# state.json


def validate_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Type- and range-check every field a resume, an export or a load reads; return ``state``."""

    def fail(field: str, expected: str) -> NoReturn:
        raise FerrolmError(f"{path}: {field} must be {expected}, got {_short(state.get(field, '(missing)'))}")

    for field in ("step", "tokens"):
        value = state.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(field, "an integer >= 0")
    for field in ("model_config", "train_config", "scheduler", "loader", "rng", "optimizer"):
        if not isinstance(state.get(field), dict):
            fail(field, "an object")
    if not isinstance(state.get("tokenizer_sha256"), str) or not _SHA256.fullmatch(state["tokenizer_sha256"]):
        fail("tokenizer_sha256", "a sha256 (64 hex digits)")
    world = state.get("world_size", 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        fail("world_size", "an integer >= 1")
    groups = state["optimizer"].get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise FerrolmError(f"{path}: optimizer.param_groups must be a list of objects, got {_short(groups)}")
    ranks = state.get("rng_by_rank", [state["rng"]])
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) for r in ranks):
        fail("rng_by_rank", "a list of objects")
    files = state.get("files")
    if not isinstance(files, dict):
        fail("files", "an object naming each tensor file")
    for name in TENSOR_FILES:
        if name not in files:
            raise FerrolmError(f"{path}: files does not list {name} (every tensor file must be listed)")
    for name, entry in files.items():
        if name not in TENSOR_FILES:
            raise FerrolmError(
                f"{path}: files lists {_short(name)}; a checkpoint holds {', '.join(TENSOR_FILES)}"
            )
        if (
            not isinstance(entry, dict)
            or isinstance(entry.get("size"), bool)
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.fullmatch(entry["sha256"])
        ):
            raise FerrolmError(
                f"{path}: files[{name!r}] must be {{'size': bytes, 'sha256': 64 hex digits}}, got {_short(entry)}"
            )
    return state


# ----------------------------------------------------------------------------------------------------
# Writing and reading


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically, then point checkpoints/latest at it."""
    return write_checkpoint(run_dir, step, model.weights(), optimizer.state_dict(), meta, keep)


def write_checkpoint(
    run_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """``save_checkpoint`` from tensors: the model's weights (no tied duplicate) and the optimizer's
    state dict in torch.optim's index layout (what ``ferrolm.distributed`` gathers on rank 0)."""
    from safetensors.torch import save_file

    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    root = Path(run_dir) / "checkpoints"
    check_finite(
        weights,
        f"step {step}",
        f": the run diverged, nothing was checkpointed (the last good checkpoint is in {root}); "
        "lower --lr or --grad-clip and --resume",
    )
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    with publish_directory(root / name) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        opt_tensors, opt_meta = optimizer_tensors(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
        files = {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in TENSOR_FILES}
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "files": files,
            "optimizer": opt_meta,
            **meta,
        }
        atomic_write_json(tmp / "state.json", state)
    atomic_write_text(root / "latest", name + "\n")  # last: its presence means `name` is complete
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, its state.json) of a run's latest checkpoint, checked for completeness
    (``verify=False``: file sizes only, without hashing, for a caller that only needs state.json)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoint ({pointer} does not exist)")
    name = read_text(pointer, "the name of the latest checkpoint (step-NNNNNNNN)").strip()
    if not STEP_NAME.fullmatch(name):
        raise FerrolmError(
            f"{pointer}: names {_short(name)}, expected a checkpoint directory step-NNNNNNNN inside {root}"
        )
    path = root / name
    if path.exists() and path.resolve().parent != root.resolve():
        raise FerrolmError(f"{pointer}: {path} resolves to {path.resolve()}, outside {root}")
    state_path = path / "state.json"
    if not state_path.is_file():
        raise FerrolmError(f"{pointer} names {path.name}, which has no state.json (incomplete checkpoint)")
    state = validate_state(
        read_versioned_json(state_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint"), state_path
    )
    if path.name != f"step-{state['step']:08d}":
        raise FerrolmError(f"{state_path}: step is {state['step']}, but the directory is {path.name}")
    for name, entry in state["files"].items():
        check_file(path / name, entry["sha256"] if verify else None, state_path, size=entry["size"])
    unlisted = sorted(p.name for p in path.glob("*.safetensors") if p.name not in state["files"])
    if unlisted:
        raise FerrolmError(
            f"{path}: {', '.join(unlisted)} not listed in {state_path} (not part of this checkpoint)"
        )
    return path, state


def load_model(run_dir: str | os.PathLike[str], device: str = "cpu", **overrides: Any) -> GPT:
    """The model of a run's latest checkpoint, in eval mode; ``overrides`` change GPTConfig fields
    that do not change the weights' shapes (e.g. dropout)."""
    path, state = load_checkpoint(run_dir)
    model = GPT(model_config_from({**state["model_config"], **overrides}, path / "state.json"))
    model.load_weights(read_tensors(path / "model.safetensors"), source=str(path / "model.safetensors"))
    return model.to(device).eval()


def load_pretrained(path: str | os.PathLike[str], device: str = "cpu", **overrides: Any) -> GPT:
    """The model of a ferrolm run directory (its latest checkpoint) or of a Hugging Face directory
    (``ferrolm export`` output, GPT-2 / Llama files), in eval mode."""
    if (Path(path) / "checkpoints" / "latest").is_file():
        return load_model(path, device, **overrides)
    if (Path(path) / "config.json").is_file():
        return GPT.from_pretrained(path, **overrides).to(device).eval()
    raise FileNotFoundError(
        f"{path}: neither a ferrolm run (checkpoints/latest) nor a Hugging Face directory"
    )
