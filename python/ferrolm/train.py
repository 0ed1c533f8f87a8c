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
- Distributed (``torchrun -m ferrolm pretrain``, ``ferrolm.distributed``): ``global_batch_size`` rows per
  optimizer step, split as world_size ranks x grad_accum micro-steps x batch_size rows; each rank reads its
  slice of the loader's global stream, the loss is normalised by the target count of the whole job's
  window, so N ranks take the step one process takes on the same rows (up to summation order). Only rank 0
  writes files; checkpoints are gathered into the single-device layout, so they resume on any number of
  ranks with the same global batch and export as usual.
- Files: checkpoints (written atomically, every field checked on the way back) are
  ``ferrolm.checkpoint``; crash-safe writes and reads that name the file are ``ferrolm._files``. A resume
  removes the temporaries a killed run left (only ours) and drops a torn last line of metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ferrolm import distributed
from ferrolm._core import FerrolmError
from ferrolm._files import (
    atomic_file,
    atomic_write_text,
    copy_file_atomic,
    read_jsonl,
    remove_stale_temporaries,
    sha256_file,
)
from ferrolm._progress import ProgressLine
from ferrolm.checkpoint import (
    load_checkpoint,
    load_model,
    load_pretrained,
    model_config_from,
    optimizer_state,
    read_tensors,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from ferrolm.config import CONFIG_FILE, TrainConfig, dump_toml
from ferrolm.memory import check_memory
from ferrolm.model import GPT, IGNORE_INDEX, GPTConfig, mask_tokens

__all__ = ["TrainConfig", "load_checkpoint", "load_model", "load_pretrained", "plot_metrics", "pretrain"]

# Dense bf16 tensor-core peaks (no sparsity) for MFU: H100 SXM 989 TFLOP/s, A100 312 TFLOP/s.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# ----------------------------------------------------------------------------------------------------
# Config: TrainConfig (every option, its default, help and rules) is ferrolm.config's


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FerrolmError(
            f"--device {name} requested but CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); use --device cpu"
        )
    return torch.device(name)


def lr_at(
    step: int, total_steps: int, *, lr: float, warmup: int, decay: str = "cosine", min_lr_ratio: float = 0.0
) -> float:
    """The learning rate of both trainers: linear warmup over ``warmup`` steps, then a decay from ``lr``
    to ``lr * min_lr_ratio`` at ``total_steps``: ``"cosine"`` (pretraining, as GPT-3; Chinchilla's 10x
    lower floor) or ``"linear"`` (fine-tuning, BERT's schedule, to 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if decay == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)  # 0 -> 1
        shape = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # 1 -> 0
    elif decay == "linear":
        shape = max(0.0, (total_steps - step) / max(1, total_steps - warmup))  # 1 -> 0
    else:
        raise FerrolmError(f"lr_at: decay must be cosine or linear, got {decay!r}")
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)


def _pretrain_lr(step: int, config: TrainConfig, max_steps: int) -> float:
    # The warmup is capped at the run's length: a short run still reaches the peak.
    warmup = min(config.warmup, max_steps)
    return lr_at(step, max_steps, lr=config.lr, warmup=warmup, min_lr_ratio=config.min_lr_ratio)


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
            # The row length bounds every document and never changes: under torch.compile the
            # batch's own maximum (a new int each step) would be a new guard, a recompile.
            max_seqlen=batch["input_ids"].shape[1],
        )
    _, loss = model(batch["input_ids"], batch["labels"], reduction=reduction, **kwargs)
    return loss


def pretrain(config: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train from ``config.data`` into ``config.out``; ``resume`` continues the latest checkpoint
    exactly. Returns a summary: steps, tokens, final train and val loss, run directory.

    Under ``torchrun`` every process calls it (``torchrun --nproc_per_node=N -m ferrolm pretrain``):
    ``config.parallel`` picks DDP or FSDP2, each rank trains on its slice of every global batch."""
    # Every check that needs no peer runs first: each rank sees the same config and environment, so
    # each raises the same error, and none is left waiting in a collective for one that stopped.
    config.validate()
    _, world_size, _ = distributed.world_from_env()
    grad_accum, global_batch = config.batch_layout(world_size)
    device = resolve_device(config.device)
    ctx = distributed.init(config.parallel, device, reduce_dtype=config.reduce_dtype)
    with ctx:  # on leaving, the ranks meet and leave the group (see Context.close)
        return _train(config, ctx, grad_accum, global_batch, resume)


def _train(
    config: TrainConfig, ctx: distributed.Context, grad_accum: int, global_batch: int, resume: bool
) -> dict[str, Any]:
    """The loop of ``pretrain``, as one rank runs it (a single process is rank 0 of 1)."""
    from ferrolm.data import Manifest, PackedLoader

    device = ctx.device
    run_dir = Path(config.out)
    manifest = Manifest.load(config.data)
    tokenizer_sha = manifest.data["tokenizer"]["sha256"]

    # --- where we start: a checkpoint, another run or a Hugging Face model, or random weights ------
    # Rank 0 reads the run directory; every rank gets its state.json (so all agree on the step) or
    # its error.
    start_state: dict[str, Any] | None = None
    if resume:
        start_state = ctx.on_main(_resume_state, config, tokenizer_sha, global_batch, share=True)
        model_config = model_config_from(
            start_state["model_config"], Path(start_state["path"]) / "state.json"
        )
    else:
        ctx.on_main(_check_new_run, run_dir)
        model_config = None
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    random.seed(config.seed)
    model: GPT | None = None
    if model_config is None and config.init_from:
        model = ctx.agreed(_pretrained_model, config.init_from, config.model)
        model_config = model.config
    else:
        # An encoder takes <mask> / <pad> from the tokenizer (RoBERTa needs both).
        specials = manifest.tokenizer().special_tokens
        model_config = model_config or _model_config(config, manifest.vocab_size).with_tokenizer(specials)
    if model_config.vocab_size != manifest.vocab_size:
        raise FerrolmError(
            f"{config.data}: the shards' tokenizer has {manifest.vocab_size} tokens, the model "
            f"{model_config.vocab_size}: shard the corpus with the model's tokenizer"
        )
    # Before any allocation: an impossible size is refused with its figure (ferrolm.memory).
    shards = ctx.world_size if ctx.parallel == "fsdp" else 1
    check_memory(model_config, device, training=True, shards=shards, source="pretrain")
    if model is None:
        model = GPT(model_config)
    seq_len = config.seq_len or model_config.block_size
    if seq_len > model_config.block_size:
        raise FerrolmError(f"seq_len {seq_len} exceeds the model's context {model_config.block_size}")
    tokens_per_step = global_batch * seq_len  # the whole job's, every rank's rows
    max_steps = config.max_steps or (
        math.ceil(config.max_tokens / tokens_per_step) if config.max_tokens else 1000
    )
    ctx.on_main(_prepare_run_dir, run_dir, manifest, config)

    if start_state is not None:  # rank 0 reads the weights; broadcast_module gives them to every rank
        ckpt_path = Path(start_state["path"])
        ctx.on_main(_load_weights, model, ckpt_path / "model.safetensors")
    model.to(device)
    ctx.broadcast_module(model)
    flops_per_token = model.flops_per_token(seq_len)
    wrapped = ctx.wrap(model)  # DDP, FSDP2 (model sharded in place) or the model itself
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(config.weight_decay),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        # One kernel for all parameters on CUDA; FSDP's sharded (DTensor) parameters use foreach.
        fused=device.type == "cuda" and ctx.parallel != "fsdp",
    )
    loader = PackedLoader(
        config.data,
        batch_size=config.batch_size,
        seq_len=seq_len,
        split="train",
        packing=config.packing,
        seed=config.seed,
        rank=ctx.rank,  # a global step takes world_size * batch_size rows of one stream; this
        world_size=ctx.world_size,  # rank's are its slice, whatever the number of ranks
        mask_boundary_labels=config.doc_mask,  # no target across a boundary the model cannot see
    )
    # Dropout and masking draw from a stream per rank (rank 0's is the single-process one).
    if ctx.rank > 0:
        torch.manual_seed(_rank_seed(config.seed, ctx.rank))
        random.seed(_rank_seed(config.seed, ctx.rank))
    mlm_generator = None
    special_ids: tuple[int, ...] = ()
    if config.objective == "mlm":
        mlm_generator = torch.Generator(device=device).manual_seed(_rank_seed(config.seed, ctx.rank))
        special_ids = tuple(i for i in (loader.pad_id, manifest.eos_id, manifest.bos_id) if i is not None)

    step, tokens = 0, 0
    metrics_path = run_dir / "metrics.jsonl"
    if start_state is not None:
        optimizer_state = ctx.on_main(_read_optimizer, ckpt_path, start_state["optimizer"])
        ctx.load_optimizer_state(model, optimizer, optimizer_state or {})
        try:  # the global stream: any world size continues it
            loader.load_state_dict(start_state["loader"])
        except (TypeError, ValueError) as error:
            raise FerrolmError(f"{Path(start_state['path']) / 'state.json'}: loader: {error}") from None
        _restore_rng(start_state, ctx.rank, mlm_generator, config.seed)
        step, tokens = start_state["step"], start_state["tokens"]
    ctx.on_main(_start_metrics, metrics_path, step if start_state is not None else None)

    train_model = torch.compile(wrapped) if config.compile else wrapped
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    peak = _peak_flops(device)
    progress = _Progress(config.progress and ctx.is_main, max_steps, step)

    def mask(batch: dict[str, Any], generator: torch.Generator) -> None:
        """mlm: mask_prob of the tokens become the targets, corrupted as BERT does (80/10/10)."""
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], model_config, generator, mask_prob=config.mask_prob, special_ids=special_ids
        )

    def next_window() -> list[dict[str, Any]]:
        """This rank's micro-batches of the next optimizer step, on the device, masked for mlm."""
        micro = [_to_device(next(loader), device) for _ in range(grad_accum)]
        if mlm_generator is not None:
            for batch in micro:
                mask(batch, mlm_generator)
        return micro

    def evaluate() -> dict[str, float] | None:
        if "val" not in manifest.data["splits"] or manifest.tokens("val") == 0:
            return None
        val_loader = PackedLoader(  # eval_batches steps of world_size * batch_size rows: each rank its slice
            config.data,
            batch_size=config.batch_size,
            seq_len=seq_len,
            split="val",
            packing=config.packing,
            seed=config.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            mask_boundary_labels=config.doc_mask,
        )
        generator = torch.Generator(device=device).manual_seed(config.seed + 1)  # the same masks each time
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast:
            for _ in range(config.eval_batches):
                batch = _to_device(next(val_loader), device)
                if mlm_generator is not None:
                    mask(batch, generator)
                total += float(_forward(train_model, batch, config.doc_mask, "sum"))
                count += int((batch["labels"] != IGNORE_INDEX).sum())
        val_loader.close()
        model.train()
        sums = ctx.all_reduce(torch.tensor([total, count], dtype=torch.float64, device=device))
        val_loss = float(sums[0]) / max(float(sums[1]), 1.0)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def record(entry: dict[str, Any]) -> None:
        if ctx.is_main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def checkpoint() -> None:
        model_sd, optimizer_sd = ctx.full_state(model, optimizer)  # on rank 0 (FSDP: all-gathered)
        rng = ctx.gather_json(rng_state(mlm_generator))  # every rank's random streams
        meta = {
            "tokens": tokens,
            "model_config": model_config.to_dict(),
            # The global batch, not grad_accum: that depends on the number of ranks of the next run.
            "train_config": {
                **dataclasses.asdict(config),
                "global_batch_size": global_batch,
                "grad_accum": None,
            },
            "scheduler": {
                "kind": "warmup_cosine",
                "lr": _pretrain_lr(step, config, max_steps),
                "max_steps": max_steps,
                "warmup": config.warmup,
                "min_lr_ratio": config.min_lr_ratio,
            },
            "loader": loader.state_dict(),  # a position in the global stream (the same on every rank)
            "rng": rng[0],
            **({"rng_by_rank": rng} if len(rng) > 1 else {}),
            "tokenizer_sha256": tokenizer_sha,
            "world_size": ctx.world_size,
            "parallel": ctx.parallel,
        }
        weights = {
            k: v for k, v in model_sd.items() if not (k == "lm_head.weight" and model_config.tie_embeddings)
        }
        ctx.on_main(write_checkpoint, run_dir, step, weights, optimizer_sd, meta, config.keep_checkpoints)

    if start_state is None and (result := evaluate()) is not None:
        record({"kind": "val", "step": 0, "tokens": 0, **result})
        progress.note(f"step 0: val loss {result['val_loss']:.4f}")
    elif start_state is None and ctx.is_main:
        warnings.warn(
            f"{config.data}: the val split is empty, so this run will not validate "
            "(shard with a larger val_fraction to get one)",
            UserWarning,
            stacklevel=2,
        )

    model.train()
    last_train_loss, last_val = float("nan"), None
    while step < max_steps:
        started = time.perf_counter()
        lr = _pretrain_lr(step, config, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Fetch the whole accumulation window first: the loss is normalised by ITS target count, over
        # every rank. A loader error on one rank raises on every rank (agreed), not a hang.
        micro = ctx.agreed(next_window)
        local_targets = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in micro]).sum()
        n_targets = int(ctx.all_reduce(local_targets))  # the job's targets in this step
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            # Gradients are reduced over ranks once, after the last micro-step (no_sync before it).
            with ctx.grad_sync(wrapped, sync=i == len(micro) - 1):
                with autocast:
                    loss = _forward(
                        train_model, batch, config.doc_mask, "sum"
                    )  # summed over this micro-batch
                # DDP and FSDP average gradients over ranks; x world_size makes that average a sum, so
                # the gradient is the global batch's summed loss over its target count.
                (loss * ctx.world_size / max(n_targets, 1)).backward()
            loss_sum += loss.detach()
        # The job's mean loss: the same number on every rank, so all agree on the check below.
        train_loss = float(ctx.all_reduce(loss_sum)) / max(n_targets, 1)
        if not math.isfinite(train_loss):
            raise FerrolmError(
                f"the training loss is {train_loss} at step {step + 1} (lr {lr:.3g}); the weights were not "
                f"updated, the last good checkpoint is in {run_dir / 'checkpoints'}: lower --lr or "
                "--grad-clip and --resume"
            )
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # honest timing
        elapsed = time.perf_counter() - started
        step += 1
        tokens += tokens_per_step
        last_train_loss = train_loss
        tokens_per_s = tokens_per_step / max(elapsed, 1e-9)  # the whole job
        entry: dict[str, Any] = {
            "kind": "train",
            "step": step,
            "tokens": tokens,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / ctx.world_size,
        }
        if peak:  # the job's FLOP/s over all its devices' peak: also each (identical) device's MFU
            entry["mfu"] = flops_per_token * tokens_per_s / (peak * ctx.world_size)
        if step % config.log_interval == 0 or step == max_steps:
            record(entry)
        progress.update(step, train_loss, lr, tokens_per_s, world_size=ctx.world_size, mfu=entry.get("mfu"))
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
    if ctx.is_main:
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
        "world_size": ctx.world_size,
    }


# Rank 0's jobs at start-up (each called through ctx.on_main: its error stops every rank).


def _resume_state(config: TrainConfig, tokenizer_sha: str, global_batch: int) -> dict[str, Any]:
    """The latest checkpoint's state.json (plus its ``path``), checked against the config, after the
    temporaries a killed run left in the run directory are removed (only ours: see ``_files``)."""
    run_dir = Path(config.out)
    for directory in (run_dir, run_dir / "checkpoints"):
        remove_stale_temporaries(directory)
    path, state = load_checkpoint(run_dir)
    _check_resume_compatible(config, state, tokenizer_sha, path, global_batch)
    return {**state, "path": str(path)}


def _check_new_run(run_dir: Path) -> None:
    if (run_dir / "checkpoints" / "latest").exists():
        raise FerrolmError(f"{run_dir} already holds a run: pass --resume to continue it, or another --out")


def _prepare_run_dir(run_dir: Path, manifest: Any, config: TrainConfig) -> None:
    """The run directory, with a copy of the shards' tokenizer (for export and generate) and the
    configuration this start resolved (``--config RUN/config.toml`` repeats it; a resume rewrites it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_toml(config))
    tok_copy = run_dir / "tokenizer.json"
    if not tok_copy.exists():
        copy_file_atomic(manifest.directory / manifest.data["tokenizer"]["file"], tok_copy)


def _start_metrics(path: Path, step: int | None) -> None:
    """A fresh metrics.jsonl, or (resuming at ``step``) the old one without what came after it."""
    if step is not None:
        _truncate_metrics(path, step)  # records written after the checkpoint are redone
    elif path.exists():
        path.unlink()


def _pretrained_model(init_from: str, overrides: dict[str, Any]) -> GPT:
    """``init_from``: a ferrolm run directory (its latest checkpoint) or a Hugging Face directory."""
    return load_pretrained(init_from, **overrides).train()


def _load_weights(model: GPT, path: Path) -> None:
    model.load_weights(read_tensors(path), source=str(path.parent))


def _read_optimizer(ckpt_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    path = ckpt_path / "optimizer.safetensors"
    return optimizer_state(read_tensors(path), meta, str(path))


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps ``seed`` (a single process's stream); the others get distinct derived seeds."""
    return seed if rank == 0 else (seed * 1_000_003 + rank) % (1 << 63)


def _restore_rng(state: dict[str, Any], rank: int, mlm_generator: torch.Generator | None, seed: int) -> None:
    """Each rank continues its own random streams; ranks the checkpoint did not have (a resume on more
    processes) start fresh ones derived from the seed and the step."""
    states = state.get("rng_by_rank") or [state["rng"]]
    if rank < len(states):
        set_rng_state(states[rank], mlm_generator, str(Path(state["path"]) / "state.json"))
        return
    derived = _rank_seed(seed + state["step"], rank)
    torch.manual_seed(derived)
    random.seed(derived)
    if mlm_generator is not None:
        mlm_generator.manual_seed(derived)


# What fixes the data stream and the model, compared on resume; with the global batch (batch_size,
# global_batch_size) a checkpoint must record them. Everything else (max_steps, intervals, the number of
# ranks and how the global batch splits into them...) may change.
RESUME_FIELDS = ("preset", "model", "objective", "seq_len", "packing", "doc_mask", "seed")


def saved_train_config(state: dict[str, Any], path: Path) -> TrainConfig:
    """The TrainConfig a checkpoint (directory ``path``) was trained with; a bad field names the file.
    The fields a resume compares must be recorded: a default is a guess, not what the run used."""
    missing = [
        k for k in (*RESUME_FIELDS, "batch_size", "global_batch_size") if k not in state["train_config"]
    ]
    if missing:
        raise FerrolmError(f"{path / 'state.json'}: train_config does not record {', '.join(missing)}")
    try:
        return TrainConfig.from_dict(state["train_config"], source="train config").validate()
    except (TypeError, ValueError) as error:
        raise FerrolmError(f"{path / 'state.json'}: train_config: {error}") from None


def _check_resume_compatible(
    config: TrainConfig, state: dict[str, Any], tokenizer_sha: str, path: Path, global_batch: int
) -> None:
    state_path = path / "state.json"
    if state["tokenizer_sha256"] != tokenizer_sha:
        raise FerrolmError(
            f"{config.data}: its tokenizer differs from the one {path} was trained with (sha256 "
            f"{tokenizer_sha[:12]}... vs {state['tokenizer_sha256'][:12]}...)"
        )
    # The run's own copy, the one export and generate use, must be the tokenizer the weights know.
    tok_copy = Path(config.out) / "tokenizer.json"
    if tok_copy.is_file() and sha256_file(tok_copy) != state["tokenizer_sha256"]:
        raise FerrolmError(
            f"{tok_copy}: not the tokenizer {path} was trained with (its sha256 differs from "
            f"tokenizer_sha256 in {state_path}); restore it or delete it to copy it again from {config.data}"
        )
    saved = saved_train_config(state, path)
    for key in RESUME_FIELDS:
        if getattr(saved, key) != getattr(config, key):
            raise FerrolmError(
                f"--resume: {key} is {getattr(config, key)!r} but the checkpoint {path} was trained with "
                f"{getattr(saved, key)!r}"
            )
    saved_global = saved.global_batch_size or saved.batch_size * (saved.grad_accum or 1)
    if saved_global != global_batch:
        raise FerrolmError(
            f"--resume: the global batch is {global_batch} rows (batch_size is {config.batch_size} per "
            f"rank) but the checkpoint {path} was trained with {saved_global}: the data order continues "
            f"only with the same global batch (--global-batch-size {saved_global})"
        )


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step``; a torn last line (a crash mid-append) is dropped."""
    if not path.exists():
        return
    kept = [json.dumps(record) for record in read_metrics(path.parent) if record["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class _Progress:
    """One line on stderr: step, loss, lr, tokens/s, ETA (redrawn on a terminal 4 times a second,
    plain lines in a log: ``ferrolm._progress``)."""

    def __init__(self, enabled: bool, max_steps: int, start_step: int) -> None:
        self.max_steps, self.start_step = max_steps, start_step
        self.started = time.perf_counter()
        self.line = ProgressLine(enabled)

    def update(
        self,
        step: int,
        loss: float,
        lr: float,
        tokens_per_s: float,
        *,
        world_size: int = 1,
        mfu: float | None = None,
    ) -> None:
        """``tokens_per_s``: the whole job's; with several devices, each one's share follows."""
        if not self.line.due(final=step == self.max_steps):
            return
        now = time.perf_counter()
        rate = (step - self.start_step) / max(now - self.started, 1e-9)  # steps/s since (re)start
        eta = (self.max_steps - step) / rate if rate > 0 else 0.0
        width = 20
        filled = int(width * step / self.max_steps)
        bar = "#" * filled + "." * (width - filled)
        speed = f"{tokens_per_s:,.0f} tok/s"
        if world_size > 1:
            speed += f" ({tokens_per_s / world_size:,.0f}/device x {world_size})"
        if mfu is not None:
            speed += f" | MFU {mfu:.1%}"
        self.line.show(
            f"[{bar}] step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{speed} | ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        )

    def note(self, text: str) -> None:
        self.line.note(text)

    def close(self) -> None:
        self.line.close()


# ----------------------------------------------------------------------------------------------------
# Metrics plot


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a torn last line (a crash mid-append) is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (not a ferrolm run directory?)")
    what = "ferrolm metrics: one JSON object with kind and an integer step per line"
    records = []
    for line, record in read_jsonl(path, what, torn_tail=True):
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or "kind" not in record:
            raise FerrolmError(f"{path}:{line}: expected {what}, got {str(record)[:80]}")
        records.append(record)
    return records


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
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
