"""Pretraining: shards in, a trained model and its checkpoints out.

Reads top to bottom like nanoGPT's train.py: the config, the schedule, checkpoints (write, read), the
loop, then metrics and the plot. ``ferrolm pretrain`` is a thin shell over ``pretrain(TrainConfig)``.

- Loss normalisation: with gradient accumulation, each micro-step's summed loss is divided by the number
  of target tokens in the WHOLE accumulation window, so every target token weighs the same however the
  tokens fall into micro-batches (per-micro-step means overweight micro-batches with fewer targets,
  which packing with padding or masked labels produces).
- Exact resume (as llm.c): a checkpoint holds the weights, the AdamW moments, the step, the loader's
  position and every random generator (Python, torch CPU and CUDA, the masked-LM masker), so k steps,
  a resume and N - k more steps give the same losses, bit for bit on CPU, as N straight steps.
- Files (convention 8): a checkpoint is written into a temporary directory, each file fsynced, the
  directory renamed to ``checkpoints/step-NNNNNNNN``, and only then the ``checkpoints/latest`` pointer
  replaced; a crash at any point leaves the last good checkpoint and its pointer intact. No pickle:
  tensors in safetensors, everything else in JSON.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ferrolm._core import FerrolmError
from ferrolm.model import GPT, IGNORE_INDEX, GPTConfig, mask_tokens

__all__ = ["TrainConfig", "load_checkpoint", "load_model", "plot_metrics", "pretrain"]

CHECKPOINT_FORMAT = "ferrolm-checkpoint"
CHECKPOINT_VERSION = 1
# Dense bf16 tensor-core peaks (no sparsity) for MFU: H100 SXM 989 TFLOP/s, A100 312 TFLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    data: str = ""  # shard directory (ferrolm shard output)
    out: str = ""  # run directory: checkpoints/, metrics.jsonl, loss.png, tokenizer.json
    preset: str = "tiny"  # model size, see ferrolm.model.PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields overriding the preset
    init_from: str | None = None  # a Hugging Face directory to start from instead of random weights
    objective: str = "clm"  # "clm" next-token prediction (decoder) or "mlm" masked-LM (encoder)
    mask_prob: float = 0.15  # mlm: fraction of tokens predicted (BERT)
    max_steps: int | None = None  # optimizer steps; or derived from max_tokens; default 1000
    max_tokens: int | None = None  # training tokens (batch_size * seq_len * grad_accum per step)
    batch_size: int = 8  # rows per micro-step
    seq_len: int | None = None  # tokens per row; None = the model's context (block_size)
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 6e-4  # peak learning rate (GPT-3 paper's value for 125M models)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this (Chinchilla: 10x lower)
    warmup: int = 100  # linear warmup steps (capped at max_steps)
    weight_decay: float = 0.1  # AdamW decoupled decay on matmul weights only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # second-moment decay; 0.95 (not 0.999) is steadier for LMs (GPT-3)
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when available)
    compile: bool = False  # torch.compile the model (CUDA: faster after a minute of compiling)
    packing: str = "concat"  # loader packing: "concat" or "best_fit"
    doc_mask: bool = False  # attend within documents only (cu_seqlens), positions restart per document
    eval_interval: int = 100  # evaluate on the val split every N steps (and at the end)
    eval_batches: int = 10  # val batches per evaluation (the same ones each time)
    checkpoint_interval: int = 500  # checkpoint every N steps (and at the end)
    keep_checkpoints: int = 3  # older checkpoints are deleted after a new one is complete
    log_interval: int = 1  # append a train record to metrics.jsonl every N steps
    seed: int = 0  # model init, loader order, dropout and masking
    progress: bool = True  # progress line on stderr

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FerrolmError(f"{source}: unknown keys {unknown} (known: {sorted(known)})")
        return cls(**data)

    def validate(self) -> TrainConfig:
        if not self.data:
            raise FerrolmError("train config: data (a shard directory) is required")
        if not self.out:
            raise FerrolmError("train config: out (a run directory) is required")
        if self.objective not in ("clm", "mlm"):
            raise FerrolmError(f"train config: objective must be 'clm' or 'mlm', got {self.objective!r}")
        if self.packing not in ("concat", "best_fit"):
            raise FerrolmError(f"train config: packing must be 'concat' or 'best_fit', got {self.packing!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise FerrolmError(f"train config: device must be cpu, cuda or auto, got {self.device!r}")
        for name in (
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
            "keep_checkpoints",
            "log_interval",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FerrolmError(f"train config: {name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "max_tokens", "seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FerrolmError(f"train config: {name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or self.warmup < 0 or self.grad_clip < 0:
            raise FerrolmError("train config: lr must be > 0, warmup and grad_clip >= 0")
        return self


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run.toml: top-level keys are TrainConfig fields; a [model] table overrides GPTConfig fields."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise FerrolmError(f"{path}: not valid TOML: {error}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FerrolmError(
            f"--device {name} requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); use --device cpu"
        )
    return torch.device(name)


def lr_at(step: int, config: TrainConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from lr to lr * min_lr_ratio at max_steps."""
    warmup = min(config.warmup, max_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)  # 0 -> 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 1 -> 0
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write to a temporary name in the same directory, fsync, rename (convention 8)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state(mlm_generator: torch.Generator | None) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "mlm": _b64(mlm_generator.get_state()) if mlm_generator is not None else None,
    }


def _set_rng_state(state: dict[str, Any], mlm_generator: torch.Generator | None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["torch_cuda"]])
    if mlm_generator is not None and state["mlm"] is not None:
        mlm_generator.set_state(_unb64(state["mlm"]))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW's state as flat tensors ``state.{param index}.{exp_avg|exp_avg_sq|step}`` plus JSON groups."""
    sd = optimizer.state_dict()
    tensors = {
        f"state.{index}.{key}": value.detach().cpu().contiguous()
        for index, entries in sd["state"].items()
        for key, value in entries.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically, then point checkpoints/latest at it."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.cpu() for k, v in model.weights().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
    files = {f: _sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")}
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "files": files,
        "optimizer": opt_meta,
        **meta,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    for f in tmp.iterdir():  # every byte on disk before the rename makes the directory visible
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # a re-run of the same step (after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")  # last: its presence means `name` is complete
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, its state.json) of a run's latest checkpoint, checked for completeness."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{run_dir}: no checkpoint ({pointer} does not exist)")
    path = root / pointer.read_text(encoding="utf-8").strip()
    state_path = path / "state.json"
    if not state_path.is_file():
        raise FerrolmError(f"{pointer} names {path.name}, which has no state.json (incomplete checkpoint)")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FerrolmError(f"{state_path}: corrupt checkpoint state ({error})") from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise FerrolmError(f"{state_path}: not a ferrolm checkpoint (format={state.get('format')!r})")
    for name, digest in state["files"].items():
        file = path / name
        if not file.is_file():
            raise FerrolmError(f"{file}: missing from the checkpoint")
        if _sha256(file) != digest:
            raise FerrolmError(f"{file}: corrupt (sha256 differs from the one recorded in state.json)")
    return path, state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors' own error type for malformed files
        raise FerrolmError(f"{path}: not a readable safetensors file ({error})") from None


def load_model(run_dir: str | os.PathLike[str], device: str = "cpu") -> GPT:
    """The model of a run's latest checkpoint, in eval mode."""
    path, state = load_checkpoint(run_dir)
    model = GPT(GPTConfig.from_dict(state["model_config"]))
    model.load_weights(_read_tensors(path / "model.safetensors"), source=str(path / "model.safetensors"))
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------
# The loop


def _model_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    model_config = GPTConfig.preset(config.preset, vocab_size=vocab_size, **config.model)
    if config.seq_len is not None and config.seq_len > model_config.block_size:
        model_config.block_size = config.seq_len  # a longer context than the preset's
    model_config.causal = config.objective == "clm"
    return model_config.validate()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"  # the loader pins its tensors when CUDA is available
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _forward(model: Any, batch: dict[str, Any], doc_mask: bool, reduction: str) -> torch.Tensor:
    """Summed or mean loss of one micro-batch; the document mask when asked for."""
    kwargs: dict[str, Any] = {}
    if doc_mask:
        kwargs = dict(
            position_ids=batch["position_ids"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=int(batch["max_seqlen"]),
        )
    _, loss = model(batch["input_ids"], batch["labels"], reduction=reduction, **kwargs)
    return loss


def pretrain(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train from ``config.data`` into ``config.out``; ``resume`` continues the latest checkpoint
    exactly. Returns a summary: steps, tokens, final train and val loss, run directory."""
    from ferrolm.data import Manifest, PackedLoader

    config.validate()
    device = resolve_device(config.device)
    run_dir = Path(config.out)
    manifest = Manifest.load(config.data)
    tokenizer_sha = manifest.data["tokenizer"]["sha256"]

    # --- where we start: a checkpoint, a Hugging Face model, or random weights --------------------
    start_state: dict[str, Any] | None = None
    if resume:
        ckpt_path, start_state = load_checkpoint(run_dir)
        _check_resume_compatible(config, start_state, tokenizer_sha, ckpt_path)
        model_config = GPTConfig.from_dict(start_state["model_config"])
    else:
        if (run_dir / "checkpoints" / "latest").exists():
            raise FerrolmError(
                f"{run_dir} already holds a run: pass --resume to continue it, or another --out"
            )
        model_config = None
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if model_config is None and config.init_from:
        model = GPT.from_pretrained(config.init_from, **config.model)
        model_config = model.config
    else:
        model_config = model_config or _model_config(config, manifest.vocab_size)
        model = GPT(model_config)
    if model_config.vocab_size != manifest.vocab_size:
        raise FerrolmError(
            f"{config.data}: the shards' tokenizer has {manifest.vocab_size} tokens, the model "
            f"{model_config.vocab_size}: shard the corpus with the model's tokenizer"
        )
    seq_len = config.seq_len or model_config.block_size
    if seq_len > model_config.block_size:
        raise FerrolmError(f"seq_len {seq_len} exceeds the model's context {model_config.block_size}")
    tokens_per_step = config.batch_size * seq_len * config.grad_accum
    max_steps = config.max_steps or (
        math.ceil(config.max_tokens / tokens_per_step) if config.max_tokens else 1000
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    tok_copy = run_dir / "tokenizer.json"
    if not tok_copy.exists():
        shutil.copyfile(manifest.directory / manifest.data["tokenizer"]["file"], tok_copy)

    model.to(device)
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=device.type == "cuda",  # one kernel for all parameters on CUDA
    )
    loader = PackedLoader(
        config.data,
        batch_size=config.batch_size,
        seq_len=seq_len,
        split="train",
        packing=config.packing,
        seed=config.seed,
        mask_boundary_labels=config.doc_mask,  # no target across a boundary the model cannot see
    )
    mlm_generator = None
    special_ids: tuple[int, ...] = ()
    if config.objective == "mlm":
        mlm_generator = torch.Generator(device=device).manual_seed(config.seed)
        special_ids = tuple(i for i in (loader.pad_id, manifest.eos_id, manifest.bos_id) if i is not None)

    step, tokens = 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if start_state is not None:
        model.load_weights(_read_tensors(ckpt_path / "model.safetensors"), source=str(ckpt_path))
        _load_optimizer(
            optimizer, _read_tensors(ckpt_path / "optimizer.safetensors"), start_state["optimizer"]
        )
        loader.load_state_dict(start_state["loader"])
        _set_rng_state(start_state["rng"], mlm_generator)
        step, tokens = start_state["step"], start_state["tokens"]
        _truncate_metrics(metrics_path, step)  # records written after the checkpoint are redone
    elif metrics_path.exists():
        metrics_path.unlink()

    train_model = torch.compile(model) if config.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    flops_per_token = model.flops_per_token(seq_len)
    peak = _peak_flops(device)
    progress = _Progress(config.progress, max_steps, step)

    def evaluate() -> dict[str, float] | None:
        if "val" not in manifest.data["splits"] or manifest.tokens("val") == 0:
            return None
        val_loader = PackedLoader(
            config.data,
            batch_size=config.batch_size,
            seq_len=seq_len,
            split="val",
            packing=config.packing,
            seed=config.seed,
            mask_boundary_labels=config.doc_mask,
        )
        generator = torch.Generator(device=device).manual_seed(config.seed + 1)  # the same masks each time
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast:
            for _ in range(config.eval_batches):
                batch = _to_device(next(val_loader), device)
                if mlm_generator is not None:
                    batch["input_ids"], batch["labels"] = mask_tokens(
                        batch["input_ids"],
                        model_config,
                        generator,
                        mask_prob=config.mask_prob,
                        special_ids=special_ids,
                    )
                total += float(_forward(train_model, batch, config.doc_mask, "sum"))
                count += int((batch["labels"] != IGNORE_INDEX).sum())
        val_loader.close()
        model.train()
        val_loss = total / max(count, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def record(entry: dict[str, Any]) -> None:
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def checkpoint() -> Path:
        meta = {
            "tokens": tokens,
            "model_config": model_config.to_dict(),
            "train_config": dataclasses.asdict(config),
            "scheduler": {
                "kind": "warmup_cosine",
                "lr": lr_at(step, config, max_steps),
                "max_steps": max_steps,
                "warmup": config.warmup,
                "min_lr_ratio": config.min_lr_ratio,
            },
            "loader": loader.state_dict(),
            "rng": _rng_state(mlm_generator),
            "tokenizer_sha256": tokenizer_sha,
        }
        return save_checkpoint(run_dir, step, model, optimizer, meta, config.keep_checkpoints)

    if start_state is None and (result := evaluate()) is not None:
        record({"kind": "val", "step": 0, "tokens": 0, **result})
        progress.note(f"step 0: val loss {result['val_loss']:.4f}")

    model.train()
    last_train_loss, last_val = float("nan"), None
    while step < max_steps:
        started = time.perf_counter()
        lr = lr_at(step, config, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Fetch the whole accumulation window first: the loss is normalised by ITS target count.
        micro = [_to_device(next(loader), device) for _ in range(config.grad_accum)]
        if mlm_generator is not None:
            for batch in micro:
                batch["input_ids"], batch["labels"] = mask_tokens(
                    batch["input_ids"],
                    model_config,
                    mlm_generator,
                    mask_prob=config.mask_prob,
                    special_ids=special_ids,
                )
        n_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        loss_sum = torch.zeros((), device=device)
        for batch in micro:
            with autocast:
                loss = _forward(train_model, batch, config.doc_mask, "sum")  # summed over this micro-batch
            (loss / max(n_targets, 1)).backward()
            loss_sum += loss.detach()
        train_loss = float(loss_sum) / max(n_targets, 1)
        if not math.isfinite(train_loss):
            raise FerrolmError(
                f"the training loss is {train_loss} at step {step + 1} (lr {lr:.3g}); the weights were not "
                f"updated, the last good checkpoint is in {run_dir / 'checkpoints'}: lower --lr or "
                "--grad-clip and --resume"
            )
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # honest timing
        elapsed = time.perf_counter() - started
        step += 1
        tokens += tokens_per_step
        last_train_loss = train_loss
        tokens_per_s = tokens_per_step / max(elapsed, 1e-9)
        entry = {
            "kind": "train",
            "step": step,
            "tokens": tokens,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
        }
        if peak:
            entry["mfu"] = flops_per_token * tokens_per_s / peak
        if step % config.log_interval == 0 or step == max_steps:
            record(entry)
        progress.update(step, train_loss, lr, tokens_per_s)
        if step % config.eval_interval == 0 or step == max_steps:
            if (last_val := evaluate()) is not None:
                record({"kind": "val", "step": step, "tokens": tokens, **last_val})
                progress.note(
                    f"step {step}: val loss {last_val['val_loss']:.4f} (ppl {last_val['val_ppl']:.1f})"
                )
        if step % config.checkpoint_interval == 0 or step == max_steps:
            checkpoint()
    progress.close()
    loader.close()
    try:
        plot_metrics(run_dir)
    except ImportError:  # matplotlib is optional: the metrics are in metrics.jsonl either way
        progress.note("loss.png not written: matplotlib is not installed (pip install matplotlib)")
    return {
        "run_dir": str(run_dir),
        "steps": step,
        "tokens": tokens,
        "train_loss": last_train_loss,
        "val_loss": last_val["val_loss"] if last_val else None,
    }


def _check_resume_compatible(
    config: TrainConfig, state: dict[str, Any], tokenizer_sha: str, path: Path
) -> None:
    if state["tokenizer_sha256"] != tokenizer_sha:
        raise FerrolmError(
            f"{config.data}: its tokenizer differs from the one {path} was trained with (sha256 "
            f"{tokenizer_sha[:12]}... vs {state['tokenizer_sha256'][:12]}...)"
        )
    saved = state["train_config"]
    # What fixes the data stream and the model; everything else (max_steps, intervals...) may change.
    for key in (
        "preset",
        "model",
        "objective",
        "batch_size",
        "seq_len",
        "grad_accum",
        "packing",
        "doc_mask",
        "seed",
    ):
        if saved[key] != getattr(config, key):
            raise FerrolmError(
                f"--resume: {key} is {getattr(config, key)!r} but the checkpoint {path} was trained with {saved[key]!r}"
            )


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class _Progress:
    """One line on stderr: step, loss, lr, tokens/s, ETA (throttled to 4 updates a second)."""

    def __init__(self, enabled: bool, max_steps: int, start_step: int) -> None:
        self.enabled, self.max_steps, self.start_step = enabled, max_steps, start_step
        self.started, self.last = time.perf_counter(), 0.0

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.25 and step != self.max_steps):
            return
        self.last = now
        rate = (step - self.start_step) / max(now - self.started, 1e-9)  # steps/s since (re)start
        eta = (self.max_steps - step) / rate if rate > 0 else 0.0
        width = 20
        filled = int(width * step / self.max_steps)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(
            f"\r[{bar}] step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{tokens_per_s:,.0f} tok/s | ETA {int(eta // 60)}m{int(eta % 60):02d}s "
        )
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text + " " * 20 + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------------------------------
# Metrics plot


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (not a ferrolm run directory?)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Training and validation loss against step, as a PNG (default RUN/loss.png)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"ferrolm: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
