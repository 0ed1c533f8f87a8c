"""Data parallelism over ``torch.distributed``: the small layer pretraining and fine-tuning share.

A run launched by ``torchrun`` (or SLURM / Kubernetes through it) reads its place from the environment
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), joins a process
group (NCCL on CUDA, one GPU per process, ``cuda:LOCAL_RANK``; gloo on the CPU) and wraps its model in
PyTorch's own engines: ``DistributedDataParallel`` (``"ddp"``: every rank holds the whole model and
optimizer, gradients are all-reduced) or FSDP2's ``fully_shard`` (``"fsdp"``: parameters, gradients and
AdamW moments are sharded; parameters are all-gathered block by block for the forward and the backward,
gradients reduce-scattered). Nothing here is home-made communication except a few tiny JSON messages.

How a training loop uses it (``ferrolm.train.pretrain`` is the worked example; a fine-tuning loop calls
the same functions in the same order)::

    ctx = distributed.init(parallel, device)           # before: validate the config (no collective yet)
    with ctx:
        state = ctx.on_main(read_checkpoint, share=True)   # rank 0 reads files; all get it or its error
        model = build(); ctx.on_main(load_weights, model)  # rank 0 loads the weights ...
        model.to(ctx.device); ctx.broadcast_module(model)  # ... every rank receives them
        wrapped = ctx.wrap(model)                          # DDP or fully_shard (per block, then the root)
        optimizer = AdamW(model.parameters())              # after wrap: FSDP's parameters are sharded
        ctx.load_optimizer_state(model, optimizer, optim_sd_on_rank0)
        for step ...:
            window = ctx.agreed(fetch_batches)             # a loader error on one rank stops every rank
            n = ctx.all_reduce(local_targets)              # normalise by the GLOBAL target count ...
            for i, batch in enumerate(window):
                with ctx.grad_sync(wrapped, i == last):    # ... no gradient collective until the last
                    (summed_loss(batch) * ctx.world_size / n).backward()
            model_sd, optim_sd = ctx.full_state(model, optimizer)    # full tensors on rank 0
            ctx.on_main(write_checkpoint, model_sd, optim_sd)
    # leaving the `with`: the ranks meet, then leave the group (no meeting after an error)

Gradient equivalence: DDP and FSDP average gradients over ranks, so a loss scaled by
``world_size / global_targets`` gives the gradient of the global batch's summed loss divided by its
target count: exactly what one process computes from the same rows, up to floating-point summation order.

Failures: a configuration error is found before any collective (every rank reads the same config and
environment, so every rank raises the same message). What only one rank can see (rank 0 reading a
checkpoint, a shard that fails its check on one rank) goes through a collective that every rank reaches
(``on_main``, ``agreed``), so every rank raises the same error instead of waiting for a peer that is gone.
A rank that dies outright (killed, out of memory inside a collective) is torchrun's to handle: it stops
the others.

Checkpoints: gathered on rank 0, not ``torch.distributed.checkpoint`` (DCP) files. ``full_state``
all-gathers the sharded parameters and AdamW moments into full CPU tensors on rank 0 (DCP's
``get_model_state_dict``/``get_optimizer_state_dict`` with ``full_state_dict`` and ``cpu_offload``),
maps the optimizer's parameter names to the index layout ``torch.optim`` uses, and the trainer writes
the same ``model.safetensors`` + ``optimizer.safetensors`` + ``state.json`` as a single-device run. So
``ferrolm export``, ``ferrolm generate``, single-GPU resume and resume on any other number of GPUs read it
with no converter, and a checkpoint is still files a user can open with ``safetensors``. The price: rank 0
needs host memory for the full model and its two AdamW moments (12 bytes per parameter: 4.2 GB for
gpt2-medium), and the save is bounded by one process's write speed. DCP's sharded files (one per rank,
written in parallel, resharded on load) would scale further but need DCP to read them back and a
conversion step for everything else; at the sizes ferrolm trains (up to ~1B parameters) one file wins.
Loading goes the other way: rank 0 reads the files, ``broadcast_module`` sends the weights before the
model is wrapped, and ``load_optimizer_state`` sends the moments with DCP's ``broadcast_from_rank0``
(each rank keeps its shard). Only rank 0 reads the checkpoint's tensors. (DCP's broadcast sends the
state's key structure with ``broadcast_object_list``, a pickle in memory between the job's own
processes; nothing pickled is ever written or read from a file.)

Limits: every rank builds the whole model before sharding (no meta-device initialisation), so a model
must fit one process's memory at start-up; FSDP then shards it for training. ``import ferrolm`` does not
import this module (it imports torch).
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ferrolm._core import FerrolmError
from ferrolm.config import PARALLEL_MODES

__all__ = ["PARALLEL_MODES", "Context", "init", "resolve_parallel", "world_from_env"]


# Exception types re-raised as themselves on the ranks that did not fail (the CLI prints these as one
# line); anything else becomes a FerrolmError carrying the type's name.
_AGREED_TYPES: dict[str, type[Exception]] = {
    t.__name__: t
    for t in (
        FerrolmError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        OSError,
        ValueError,
        KeyError,
    )
}


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) outside torchrun; rank and
    world size from the process group when the caller already started one. Runs no collective, so a
    configuration check may use it before ``init``."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name)
        try:
            values[name] = default if text is None else int(text)
        except ValueError:
            raise FerrolmError(f"environment variable {name}={text!r} is not an integer") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise FerrolmError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def resolve_parallel(parallel: str, world_size: int) -> str:
    """``"auto"`` is DDP with more than one process and nothing otherwise."""
    if parallel not in PARALLEL_MODES:
        raise FerrolmError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise FerrolmError(
            f"parallel='none' but torchrun started {world_size} processes: use --parallel ddp or fsdp"
        )
    return parallel


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job, and the collectives a training loop needs.

    With ``world_size == 1`` and ``parallel == "none"`` every method is the plain single-process
    operation (no process group exists), so a loop written against a Context costs nothing alone."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: str  # "none", "ddp" or "fsdp" (resolved)
    reduce_dtype: torch.dtype = torch.float32  # FSDP on CUDA: gradient reduce-scatter dtype
    owns_group: bool = False  # init() created the process group, so close() destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, metrics, plots and checkpoints."""
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        """A process group is in use (ddp or fsdp, even with one process)."""
        return self.parallel != "none"

    def close(self, finished: bool = True) -> None:
        """Leave the process group if ``init`` created it (a caller's own group is left alone).

        ``finished``: every rank got here the same way (the job ended normally). Then the ranks
        first wait for each other and drop what is left of their collectives while the interpreter
        is still whole: a rank that tears its group down while its peer still talks to it, or that
        leaves gloo's threads holding tensors until interpreter shutdown, can be aborted by C++
        ("terminate called without an active exception", seen under load). After an error no
        rank waits: the others may be anywhere, and a barrier there could hang."""
        if not (self.owns_group and dist.is_initialized()):
            return
        if finished and self.world_size > 1:
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()

    def __enter__(self) -> Context:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.close(finished=kind is None)

    # -- the model ---------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
        """The module to run forward/backward through: ``model`` itself (none), a DDP wrapper, or
        ``model`` sharded in place by ``fully_shard`` per block of ``blocks`` (default
        ``model.transformer.h``), then the root (embeddings, final norm, head). Call it after
        ``model.to(ctx.device)`` and ``broadcast_module``, before building the optimizer."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # The only buffers are RoPE tables, equal everywhere: no copy before every forward (the
            # option's name changed in torch 2.15).
            names = inspect.signature(DistributedDataParallel.__init__).parameters
            buffers = "forward_sync_buffers" if "forward_sync_buffers" in names else "broadcast_buffers"
            no_buffer_sync: dict[str, Any] = {buffers: False}
            return DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no copy
                **no_buffer_sync,
            )
        if self.parallel == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if self.device.type == "cuda":  # bf16 compute and all-gathers; reduce in reduce_dtype
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=self.reduce_dtype)
            else:  # CPU: fp32 throughout (gloo and CPU matmuls gain nothing from bf16 here)
                policy = MixedPrecisionPolicy()
            # GPT.forward returns its logits as a view (the vocabulary padding cropped); nothing edits
            # them in place, which is what FSDP2's warning about returned views guards against.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            for block in blocks if blocks is not None else model.transformer.h:  # type: ignore[union-attr]
                fully_shard(block, mp_policy=policy, reshard_after_forward=True)  # gathered again in backward
            # The root (embeddings, final norm, head) is needed first in the backward: keep it gathered.
            fully_shard(model, mp_policy=policy, reshard_after_forward=False)
            return model
        return model

    @contextmanager
    def grad_sync(self, wrapped: nn.Module, sync: bool) -> Iterator[None]:
        """Backward inside runs the gradient collectives only when ``sync``: the non-final micro-steps
        of an accumulation window just add into local gradients (DDP ``no_sync``; FSDP2
        ``set_requires_gradient_sync(False)``), the final one reduces the sum once."""
        if sync or self.parallel == "none":
            yield
        elif self.parallel == "ddp":
            with wrapped.no_sync():  # type: ignore[operator]
                yield
        else:
            wrapped.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)  # type: ignore[operator]

    @torch.no_grad()
    def broadcast_module(self, model: nn.Module, src: int = 0) -> None:
        """Copy rank ``src``'s parameters and buffers into every rank's (unwrapped) ``model``, so that
        every rank shards or replicates the same weights. A no-op without a process group."""
        if not self.grouped or self.world_size == 1:
            return
        for tensor in [*model.parameters(), *model.buffers()]:  # a tied weight is listed once
            dist.broadcast(tensor.data, src=src)

    # -- collectives -------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` summed (or ``"max"``/``"min"``) over ranks, in place; returned for chaining."""
        if self.grouped and self.world_size > 1:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s JSON-serialisable ``obj`` on every rank (the others pass anything)."""
        if not self.grouped or self.world_size == 1:
            return obj
        data = json.dumps(obj).encode("utf-8") if self.rank == src else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=src)
        buffer = torch.empty(int(size), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, src=src)
        return json.loads(bytes(buffer.cpu().numpy()).decode("utf-8"))

    def gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-serialisable ``obj``, in rank order, on every rank."""
        if not self.grouped or self.world_size == 1:
            return [obj]
        data = json.dumps(obj).encode("utf-8")
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=self.device))
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        chunks = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(chunks, mine)
        return [
            json.loads(bytes(c[: int(s)].cpu().numpy()).decode("utf-8"))
            for c, s in zip(chunks, sizes, strict=True)
        ]

    def agreed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on every rank; if it raises on any rank, raise on every rank (the lowest
        failing rank's exception type and message), so no rank goes on to wait in a collective for a
        peer that has failed. One tiny all-reduce when nothing fails."""
        if not self.grouped or self.world_size == 1:
            return fn(*args)
        result, error = None, None
        try:
            result = fn(*args)
        except Exception as caught:
            error = caught
        first = torch.tensor([self.rank if error is not None else self.world_size], device=self.device)
        failing = int(self.all_reduce(first, "min"))
        if failing < self.world_size:
            self._raise(self.broadcast_json(_describe(error), src=failing), failing, error)
        return result

    def on_main(self, fn: Callable[..., Any], *args: Any, share: bool = False) -> Any:
        """Run ``fn(*args)`` on rank 0 only (reading or writing files). If it raises, every rank raises
        the same error. Rank 0 gets the result; the other ranks get it too with ``share=True`` (it must
        then be JSON-serialisable), ``None`` otherwise. One broadcast."""
        if not self.grouped or self.world_size == 1:
            return fn(*args)
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args)
            except Exception as caught:
                error = caught
        status = {"error": _describe(error), "result": result if share and error is None else None}
        status = self.broadcast_json(status)
        if status["error"] is not None:
            self._raise(status["error"], 0, error)
        return result if self.is_main else status["result"]

    def _raise(self, described: dict[str, str], src: int, error: BaseException | None) -> None:
        """Rank ``src`` re-raises its own exception (traceback intact); the others a copy of it."""
        if self.rank == src and error is not None:
            raise error
        kind = _AGREED_TYPES.get(described["type"])
        message = f"{described['message']} (reported by rank {src})"
        if kind is None:
            raise FerrolmError(f"{described['type']}: {message}")
        raise kind(message)

    # -- checkpoints ---------------------------------------------------------------------------------

    def full_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model state dict, optimizer state dict) as full tensors on rank 0, ``({}, {})`` on the
        others. The optimizer's is in ``torch.optim``'s layout (``state`` keyed by the parameter's
        index over the param groups, ``param_groups[i]["params"]`` lists of indices), the one a
        single-device ``optimizer.state_dict()`` has. ``model`` is the unwrapped module. A collective
        with FSDP (the shards are all-gathered); free otherwise (every rank holds everything)."""
        if self.parallel != "fsdp":
            return (model.state_dict(), optimizer.state_dict()) if self.is_main else ({}, {})
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 only, on the CPU
        model_sd = self.full_model_state(model)
        optim_sd: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=options)  # type: ignore[assignment]
        if not self.is_main:
            return {}, {}
        # Parameter names -> indices: the position over the param groups, as torch.optim numbers them.
        index = {name: i for i, name in enumerate(n for g in optim_sd["param_groups"] for n in g["params"])}
        return model_sd, {
            "state": {index[name]: entries for name, entries in optim_sd["state"].items()},
            "param_groups": [
                {**group, "params": [index[n] for n in group["params"]]} for group in optim_sd["param_groups"]
            ],
        }

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict as full tensors on rank 0 (on the CPU with FSDP), ``{}`` on the others:
        the model half of ``full_state``, for a loop that keeps no optimizer state (fine-tuning's best
        epoch). ``model`` is the unwrapped module. A collective with FSDP; free otherwise."""
        if self.parallel != "fsdp":
            return model.state_dict() if self.is_main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 only, on the CPU
        state: dict[str, Any] = get_model_state_dict(model, options=options)
        return state if self.is_main else {}

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load a full optimizer state dict in ``torch.optim``'s index layout, given on rank 0 (the
        other ranks pass ``{}``), into ``optimizer`` on every rank: each FSDP rank keeps its shard of
        the moments, each DDP rank a full copy. ``model`` is the unwrapped module the optimizer was
        built on (after ``wrap``). A collective with a process group."""
        if not self.grouped:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        named: dict[str, Any] = {}
        if self.is_main:  # indices -> the parameter names DCP keys its state by
            names = {id(p): n for n, p in model.named_parameters()}
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            named = {
                "state": {order[int(i)]: entries for i, entries in state["state"].items()},
                "param_groups": [
                    {**group, "params": [order[int(i)] for i in group["params"]]}
                    for group in state["param_groups"]
                ],
            }
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, named, options=options)


def init(
    parallel: str = "auto", device: torch.device | str = "cpu", *, reduce_dtype: str = "float32"
) -> Context:
    """Join torchrun's process group (or start a one-process group for ``ddp``/``fsdp`` outside
    torchrun) and pick this rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK``. Returns a Context;
    call ``close()`` at the end (or use it as a context manager)."""
    rank, world_size, local_rank = world_from_env()
    mode = resolve_parallel(parallel, world_size)
    if reduce_dtype not in ("float32", "bfloat16"):
        raise FerrolmError(f"reduce_dtype must be 'float32' or 'bfloat16', got {reduce_dtype!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None and world_size > 1:
            raise FerrolmError(
                f"device {device} names one GPU, but {world_size} processes each need their own: "
                "pass --device cuda (each process takes cuda:LOCAL_RANK)"
            )
        index = device.index if device.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise FerrolmError(
                f"LOCAL_RANK {local_rank} needs cuda:{index}, but {torch.cuda.device_count()} GPUs are "
                "visible"
            )
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise FerrolmError(f"distributed training runs on cpu or cuda devices, got {device}")
    owns = False
    if mode != "none" and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_available() or (backend == "gloo" and not dist.is_gloo_available()):
            raise FerrolmError(f"this torch build has no {backend} backend for --parallel {mode}")
        if "MASTER_ADDR" in os.environ:  # torchrun: rendezvous through its environment
            dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=_device_id(device))
        elif world_size == 1:  # one process, no torchrun: a group of one through an in-memory store
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            raise FerrolmError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun "
                "(torchrun --nproc_per_node=N -m ferrolm ...)"
            )
        owns = True
    dtype = torch.float32 if reduce_dtype == "float32" else torch.bfloat16
    return Context(rank, world_size, local_rank, device, mode, dtype, owns)


def _describe(error: BaseException | None) -> dict[str, str] | None:
    """An exception as JSON: its type's name and its message (a KeyError's without the quotes)."""
    if error is None:
        return None
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return {"type": type(error).__name__, "message": str(message)}


def _device_id(device: torch.device) -> torch.device | None:
    """NCCL binds its communicator to the device eagerly when told which one (faster first collective)."""
    return device if device.type == "cuda" else None
