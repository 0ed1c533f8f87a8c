"""Packed-batch loading over shard directories (``ferrolm.data.shard_corpus`` output).

The work happens in Rust: shards are memory-mapped and checked against their manifest, rows are
drawn in a seeded order computed on the fly (a Feistel bijection, nothing materialized), packed,
and a background thread keeps a few batches ready. ``next(loader)`` only pops a finished batch
and wraps its arrays (no copy).

>>> loader = PackedLoader("shards/", batch_size=8, seq_len=1024)    # doctest: +SKIP
>>> batch = next(loader)                                            # doctest: +SKIP
>>> batch["input_ids"].shape, batch["labels"].dtype                 # doctest: +SKIP
(torch.Size([8, 1024]), torch.int64)
>>> state = loader.state_dict()          # save it with the model    # doctest: +SKIP
>>> loader.load_state_dict(state)        # continue exactly there    # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

from ferrolm._core import CoreLoader, FerrolmError

__all__ = ["PackedLoader"]

STATE_FORMAT = "ferrolm-packed-loader"
STATE_VERSION = 1
BATCH_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "num_cu_seqlens", "max_seqlen")

PathLike = str | os.PathLike[str]


_STATE_KEYS = (
    "fingerprint",
    "seed",
    "seq_len",
    "packing",
    "position",
    "epochs",
    "epoch_starts",
    "source_rows",
)


def _state_int(value: Any, field: str) -> int:
    """A loader-state integer: an int (not a bool, float or string) in [0, 2^64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**64:
        raise FerrolmError(f"loader state: {field} must be an integer in [0, 2^64), got {value!r}")
    return int(value)


def _integer_weights(weights: Sequence[float | int]) -> list[int]:
    """Mixing weights as the smallest integers with the same ratios (floats read as decimals
    with at most 4 digits: 0.7/0.3 -> 7/3)."""
    fractions = []
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float, Fraction)) or not w > 0:
            raise FerrolmError(f"mixing weights must be positive numbers, got {list(weights)!r}")
        fractions.append(Fraction(w).limit_denominator(10_000))
    denominator = math.lcm(*(f.denominator for f in fractions))
    integers = [int(f * denominator) for f in fractions]
    divisor = math.gcd(*integers)
    integers = [i // divisor for i in integers]
    if sum(integers) > 1 << 20:
        raise FerrolmError(
            f"mixing weights {list(weights)!r} need integers {integers} summing above 2^20: use simpler ratios"
        )
    return integers


def _sources(
    shards: PathLike | Sequence[PathLike] | Mapping[PathLike, float],
    weights: Sequence[float] | None,
) -> tuple[list[str], list[int]]:
    if isinstance(shards, (str, os.PathLike)):
        directories = [os.fspath(shards)]
    elif isinstance(shards, Mapping):
        if weights is not None:
            raise FerrolmError("give weights either in the mapping or as weights=, not both")
        directories = [os.fspath(d) for d in shards]
        weights = list(shards.values())
    else:
        directories = [os.fspath(d) for d in shards]
    if not directories:
        raise FerrolmError("give at least one shard directory")
    if weights is None:
        weights = [1] * len(directories)
    if len(weights) != len(directories):
        raise FerrolmError(f"{len(weights)} weights for {len(directories)} shard directories")
    return directories, _integer_weights(list(weights))


def _distributed_defaults() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when torch is already imported and a process
    group is initialised; (0, 1) otherwise. Never imports torch."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


class PackedLoader:
    """Endless batches of packed rows from one or several shard directories.

    Every batch is a dict:

    - ``input_ids``, ``labels``: ``[batch_size, seq_len]`` int64; ``labels`` are the next tokens
      (``-100`` on padding, and across document boundaries with ``mask_boundary_labels=True``).
    - ``position_ids``: ``[batch_size, seq_len]`` int64, restarting at 0 at every document (piece).
    - ``cu_seqlens``: int32 boundaries of every document segment in the flattened
      ``batch_size * seq_len`` inputs, for ``flash_attn_varlen_func``; its length is FIXED per
      loader (``loader.cu_seqlens_len``), padded by repeating the total (zero-length trailing
      segments), so ``torch.compile`` sees one shape. ``num_cu_seqlens`` counts the valid entries
      and ``max_seqlen`` is the longest segment (``seq_len`` is always a valid static value).

    ``shards``: a directory, a list of directories (with ``weights=``, default equal), or a mapping
    ``{directory: weight}``. Rows of several directories are interleaved by a smooth weighted
    round-robin: in every period of ``sum(weights)`` rows (weights reduced to integers: 0.7/0.3 ->
    7/3), each directory gives exactly its weight's rows.

    ``packing="concat"``: the token stream cut into windows of ``seq_len + 1`` tokens (window k
    starts at token ``k * seq_len``, so every token is a label once per epoch), in a shuffled
    order. ``packing="best_fit"``: rows start at document starts; documents longer than a row
    are split into row-sized pieces; each row takes the largest piece of a ``buffer_size``-piece
    buffer that fits the space left, until none fits; nothing is cropped, the rest is padding
    (``loader.stats()``).

    Order and resume: the rows form one global stream that depends only on the data, ``seq_len``,
    ``packing``, ``buffer_size``, the weights and ``seed`` (each epoch reshuffled with
    ``(seed, epoch)``). A global step takes the next ``world_size * batch_size`` rows; rank ``r``
    takes its block of ``batch_size`` of them. ``state_dict()`` records the position in that
    stream, so ``load_state_dict`` continues with the exact next row, also with another
    ``world_size`` or ``batch_size``. ``rank``/``world_size`` default to torch.distributed's
    when a process group is initialised.

    ``verify``: ``None`` (default) checks each shard's sha256 the first time a batch reads it (in
    the background thread), ``True`` checks all of them before returning, ``False`` never (sizes,
    headers, document offsets and token ids < vocabulary size are always checked).
    ``format``: ``"torch"`` (tensors, pinned when ``pin_memory``, default: CUDA available) or
    ``"numpy"``; the default is ``"torch"`` when PyTorch is installed and ``"numpy"`` otherwise, so
    the loader works with numpy alone (pass it explicitly for the same output everywhere). ``buffer_size``: pieces held by best_fit's buffer (more: less padding, but a
    short document may wait longer for its row). ``prefetch``: batches kept ready by the
    background thread. Batches are views of a few reusable memory slots (no copy, and the same
    tensor objects come back once nothing holds them): a batch, or anything made from it (a view,
    ``detach()``, a tensor saved for backward), that is still referenced is never overwritten,
    so there is no need to ``clone()`` what you keep. After ``fork`` (DataLoader workers) a child restarts its own thread from
    the last batch returned; shards are shared memory maps, never copies. ``plan(start, count)``
    shows which documents rows are made of, without reading tokens.

    >>> loader = PackedLoader({"web/": 0.7, "code/": 0.3}, batch_size=8, seq_len=2048,
    ...                       packing="best_fit", format="numpy")       # doctest: +SKIP
    >>> batch = next(loader)                                            # doctest: +SKIP
    >>> n = batch["num_cu_seqlens"]; batch["cu_seqlens"][:n]            # doctest: +SKIP
    """

    def __init__(
        self,
        shards: PathLike | Sequence[PathLike] | Mapping[PathLike, float],
        *,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        packing: str = "concat",
        weights: Sequence[float] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        buffer_size: int = 1024,
        mask_boundary_labels: bool = False,
        verify: bool | None = None,
        prefetch: int = 4,
        format: str | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        if format is None:
            # find_spec looks for the package without importing it (import ferrolm stays torch-free).
            format = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
        if format not in ("torch", "numpy"):
            raise FerrolmError(f"format must be 'torch' or 'numpy', got {format!r}")
        # packing is the core's to parse (Packing::parse); these are ints the core takes as unsigned,
        # where a negative one would fail as an OverflowError that names nothing.
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("prefetch", prefetch)):
            if not isinstance(value, int) or value < 1:
                raise FerrolmError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise FerrolmError(f"seed must be an integer in [0, 2^64), got {seed!r}")
        default_rank, default_world = _distributed_defaults()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise FerrolmError(f"rank must be in [0, world_size): got rank={rank}, world_size={world_size}")
        directories, integer_weights = _sources(shards, weights)
        self._core = CoreLoader(
            directories,
            integer_weights,
            split=split,
            batch_size=batch_size,
            seq_len=seq_len,
            packing=packing,
            seed=seed,
            rank=rank,
            world_size=world_size,
            buffer_size=buffer_size,
            mask_boundary_labels=mask_boundary_labels,
            verify={None: "lazy", True: "eager", False: "off"}[verify],
            prefetch=prefetch,
        )
        self.format = format
        self.split = split
        self._pin = pin_memory
        self._torch: Any = None

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        slot, arrays, objects, num_cu, max_seqlen = self._core.next()
        if objects is None:
            objects = self._attach(slot, arrays)
        if self._pin and self.format == "torch":
            # pin_memory() copies into torch's pinned pool (which keeps a copy alive while a
            # non_blocking transfer reads it), so the slot is free again at once.
            objects = tuple(t.pin_memory() for t in objects)
        return {
            "input_ids": objects[0],
            "labels": objects[1],
            "position_ids": objects[2],
            "cu_seqlens": objects[3],
            "num_cu_seqlens": num_cu,
            "max_seqlen": max_seqlen,
        }

    def _attach(self, slot: int, arrays: tuple[Any, ...]) -> tuple[Any, ...]:
        """What a new batch slot hands out, made once: batches live in a few reusable slots
        (Rust memory refilled in place), so the arrays and tensors of a slot are made the first
        time it comes and returned again after (a cold ``torch.from_numpy`` costs 10-15 us,
        more than the rest of a step's loading). The loader refills a slot only when nothing
        else holds what it handed out (``CoreLoader.attach`` says what it counts), so a batch
        the caller keeps is never overwritten: its slot stays out and another one is used."""
        if self.format == "numpy":
            self._core.attach(slot, arrays)
            return arrays
        torch = self._torch or self._import_torch()
        tensors = tuple(torch.from_numpy(a) for a in arrays)
        count = getattr(torch._C, "_storage_Use_Count", None)
        if count is None or not hasattr(tensors[0], "_use_count"):
            # This torch lacks the counters that show a kept reference: never refill the slot.
            self._core.release(slot, False)
            return tensors
        self._core.attach(slot, tensors, tuple(t.untyped_storage() for t in tensors), count)
        return tensors

    def _import_torch(self) -> Any:
        try:
            import torch
        except ImportError:
            raise FerrolmError("format='torch' needs PyTorch; install it or pass format='numpy'") from None
        if self._pin is None:
            self._pin = bool(torch.cuda.is_available())
        self._torch = torch
        return torch

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands after the last batch returned: a few integers and a
        fingerprint of the data. Plain ints and strings (JSON- and torch.save-friendly); the same
        on every rank."""
        position, sources = self._core.state()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": self._core.fingerprint,
            "seed": self._core.seed,
            "seq_len": self._core.seq_len,
            "packing": self._core.packing,
            "position": position,
            "epochs": [s[0] for s in sources],
            "epoch_starts": [s[1] for s in sources],
            "source_rows": [s[2] for s in sources],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue right after the batch where ``state`` was taken (any world or batch size)."""
        if not isinstance(state, Mapping):
            raise FerrolmError(f"a PackedLoader state is a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise FerrolmError(
                f"not a PackedLoader state (format={state.get('format')!r}, version={state.get('version')!r})"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise FerrolmError(f"loader state: missing field(s) {missing}")
        position = _state_int(state["position"], "position")
        n = len(self._core.weights)
        columns = {}
        for key in ("epochs", "epoch_starts", "source_rows"):
            values = state[key]
            if not isinstance(values, (list, tuple)) or len(values) != n:
                raise FerrolmError(
                    f"loader state: {key} must be a list of {n} integers (one per source), got {values!r}"
                )
            columns[key] = [_state_int(v, f"{key}[{i}]") for i, v in enumerate(values)]
        for key in ("seq_len", "packing", "seed"):
            mine = getattr(self._core, key)
            if state[key] != mine:
                raise FerrolmError(f"the state was saved with {key}={state[key]!r}; this loader has {mine!r}")
        if not isinstance(state["fingerprint"], str) or state["fingerprint"] != self._core.fingerprint:
            raise FerrolmError(
                f"the state's data fingerprint {state['fingerprint']} differs from this loader's "
                f"{self._core.fingerprint}: different shards, split, mixing weights or buffer_size"
            )
        sources = list(zip(columns["epochs"], columns["epoch_starts"], columns["source_rows"], strict=True))
        self._core.load_state(position, sources)

    # -- inspection --------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """Totals over the batches this object returned. Rows hold ``seq_len + 1`` tokens;
        ``cropped_tokens`` is always 0 (ferrolm splits long documents, it never drops tokens)."""
        rows, tokens, padded, segments = self._core.stats()
        total = max(rows * (self._core.seq_len + 1), 1)
        return {
            "rows": rows,
            "tokens": tokens,
            "padded_tokens": padded,
            "cropped_tokens": 0,
            "padded_fraction": padded / total,
            "cropped_fraction": 0.0,
            "segments": segments,
            "segments_per_row": segments / max(rows, 1),
        }

    def plan(self, start: int, count: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
        """Rows ``[start, start + count)`` of the global stream without their tokens:
        ``(source, epoch, [(first token in the source's token stream, length), ...])``."""
        return self._core.plan(start, count)

    def verify(self) -> None:
        """Check every shard's sha256 now (raises naming the first bad file)."""
        self._core.verify()

    def close(self) -> None:
        """Stop the prefetch thread (iterating again restarts it where it stopped)."""
        self._core.close()

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def batch_size(self) -> int:
        return self._core.batch_size

    @property
    def seq_len(self) -> int:
        return self._core.seq_len

    @property
    def packing(self) -> str:
        return self._core.packing

    @property
    def rank(self) -> int:
        return self._core.rank

    @property
    def world_size(self) -> int:
        return self._core.world_size

    @property
    def seed(self) -> int:
        return self._core.seed

    @property
    def weights(self) -> list[int]:
        """The integer mixing weights in use."""
        return self._core.weights

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    @property
    def pad_id(self) -> int:
        """The token id put in padding (EOS, else BOS, else 0); its labels are -100."""
        return self._core.pad_id

    @property
    def cu_seqlens_len(self) -> int:
        """The fixed length of ``cu_seqlens``: ``batch_size * segments_per_row + 1``."""
        return self._core.cu_seqlens_len

    @property
    def segments_per_row(self) -> int:
        """The bound on document segments in one row's inputs, from the shortest document."""
        return self._core.segments_per_row

    @property
    def rows_per_epoch(self) -> list[int | None]:
        """Per directory: rows in one epoch (concat); None for best_fit (known after packing)."""
        return self._core.rows_per_epoch

    @property
    def epochs(self) -> list[int]:
        """Per directory: the epoch of the last row returned."""
        return list(self.state_dict()["epochs"])

    @property
    def fingerprint(self) -> str:
        return self._core.fingerprint

    def __repr__(self) -> str:
        dirs = [str(d) for d, _, _ in self._core.sources]
        return (
            f"PackedLoader({dirs}, split={self.split!r}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"packing={self.packing!r}, rank={self.rank}, world_size={self.world_size})"
        )
