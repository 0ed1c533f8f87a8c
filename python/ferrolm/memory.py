"""How much memory a model needs, estimated before it is built, so that an impossible config
(``n_layer=100000``, a manifest claiming ``vocab_size=10**12``) is refused with the figure instead of
trying a 256 GB allocation (an abort, an OOM kill, or minutes of swapping).

The estimate is deliberately simple and a LOWER bound: the parameters counted exactly from the config
(the same layers ``ferrolm.model.GPT`` builds), times the bytes each needs:

- a model: its float32 weights, 4 bytes per parameter;
- training with AdamW: weights + gradients + the two moments, 4 x 4 = 16 bytes per parameter (FSDP
  shards all four over the ranks).

Activations, the KV cache, the allocator's slack and the CUDA context are not counted, so a config
that passes can still run out of memory; one that fails this check cannot possibly run. The limit is
the machine's physical RAM (CPU) or the device's total memory (CUDA), not what is free right now: the
verdict does not change from one run to the next.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ferrolm._core import FerrolmError

if TYPE_CHECKING:
    import torch

    from ferrolm.model import GPTConfig

__all__ = ["BYTES_PER_PARAMETER", "check_memory", "device_memory", "parameter_count"]

#: float32 weights; + float32 gradients and AdamW's two float32 moments when training.
BYTES_PER_PARAMETER = {"weights": 4, "training": 16}


def parameter_count(config: GPTConfig) -> int:
    """The number of parameters ``GPT(config)`` holds (a tied LM head once), without allocating it.

    The architecture specs decide what a model holds, so the count asks the model itself: it builds a
    1-layer and a 2-layer copy on PyTorch's "meta" device (shapes, no storage) and extrapolates, the
    blocks being identical: exact for every architecture, and fast for any depth or vocabulary."""
    import dataclasses

    import torch

    from ferrolm.model import GPT

    def count(n_layer: int) -> int:
        with torch.device("meta"):
            return GPT(dataclasses.replace(config, n_layer=n_layer)).num_params(non_embedding=False)

    one, two = count(1), count(2)
    return one + (config.n_layer - 1) * (two - one)


def device_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes, description) of the memory available to ``device``: physical RAM for the CPU, the
    device's total memory for CUDA."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"{props.name} (cuda:{index})"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def check_memory(
    config: GPTConfig,
    device: torch.device | str = "cpu",
    *,
    training: bool = False,
    shards: int = 1,
    source: str = "model config",
) -> int:
    """Raise ``FerrolmError`` (with the figures in GB) when the model (``training``: and its gradients
    and AdamW moments, split over ``shards`` FSDP ranks) cannot fit in ``device``'s memory; returns the
    estimate in bytes."""
    parameters = parameter_count(config)
    per_parameter = BYTES_PER_PARAMETER["training" if training else "weights"]
    needed = parameters * per_parameter // max(shards, 1)
    available, where = device_memory(device)
    if needed > available:
        what = "training it with AdamW (weights, gradients, 2 moments)" if training else "its weights"
        raise FerrolmError(
            f"{source}: {parameters:,} parameters (n_layer={config.n_layer}, n_embd={config.n_embd}, "
            f"vocab_size={config.vocab_size}): {what} need at least {needed / 1e9:,.1f} GB, more than "
            f"{where} ({available / 1e9:,.1f} GB); choose a smaller model"
        )
    return needed
