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
    """The number of parameters ``GPT(config)`` holds (a tied LM head once), from the config alone."""
    C, M = config.n_embd, config.mlp_hidden or 4 * config.n_embd
    H, H_kv = config.n_head, config.n_kv_head or config.n_head
    D = C // H
    gpt2 = config.arch == "gpt2"  # biases and LayerNorm (weight + bias); llama: RMSNorm, no biases
    norm = 2 * C if gpt2 else C
    qkv = (H + 2 * H_kv) * D
    attention = C * qkv + C * C + ((qkv + C) if gpt2 else 0)
    mlp = (C * M + M * C + M + C) if gpt2 else 3 * C * M
    block = 2 * norm + attention + mlp
    embeddings = config.padded_vocab_size * C + (config.block_size * C if gpt2 else 0)
    head = 0 if config.tie_embeddings else config.padded_vocab_size * C
    return embeddings + config.n_layer * block + norm + head


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
