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

# Per GPU generation and head dim, from the compile check's table (bf16, causal, varlen, GQA group 4 while
# tuning; then every case of tests/test_attention_aot.py). Where the untuned tiles already stayed in
# registers they are kept. What changed, and why:
# - dK/dV, head dim 128: 64 queries x 128 keys kept two (128, 128) fp32 accumulators plus K and V as
#   operands in 255 registers: 1.7-6.4 KB of stack on sm_80, 136-216 B on sm_90. Smaller query tiles
#   (FlashAttention-2's and Triton's tutorial choice for this pass) free the registers the (BN, BM)
#   probability tiles need: 32 queries x 64 keys, with 3 stages on sm_80 (24-40 B) and 2 on sm_90 (0-96
#   B). 32 x 128 on sm_90 stayed at 88 B with documents but spilled 160 B on dense batches; 16 x 128
#   spills nothing but feeds the dK/dV accumulation 16-deep matrix products.
# - dK/dV, head dim 256: 32 x 32 keys on sm_90 (0 B, was 472-480 B at 32 x 64) and sm_80 (0 B; 32 x 64
#   spilled 232 B on dense batches, fp16, group 4).
# - dQ on sm_80: head dim 128 as 128 x 32 (0 B, was 264-408 B); 256 as 32 x 32 (0 B, was 1,368 B).
# - forward, head dim 256, sm_80: 32 x 64 with 4 warps (8 B, was up to 4,112 B at 64 x 64 x 8 warps).
# - head dim 64, sm_80: forward 64 x 64 (0 B; 128 x 64 spilled 152 B without a mask, fp16, group 4) and
#   dK/dV 32 x 64 x 3 stages (8 B; 64 x 128 spilled 160 B unmasked with documents, group 4).
# Ampere (sm_80: A100, 163 KiB shared memory per block) also serves sm_86/89 (99 KiB): what does not fit
# there shrinks at run time (attention._launch).
_SM80 = {
    **_UNTUNED,
    64: Config(Blocks(64, 64, 4, 3), Blocks(32, 64, 8, 3), Blocks(128, 64, 8, 2)),
    128: Config(Blocks(128, 64, 8, 3), Blocks(32, 64, 8, 3), Blocks(128, 32, 8, 2)),
    256: Config(Blocks(32, 64, 4, 2), Blocks(32, 32, 8, 1), Blocks(32, 32, 8, 1)),
}
_SM90 = {
    **_UNTUNED,
    128: Config(Blocks(128, 64, 8, 3), Blocks(32, 64, 8, 2), Blocks(128, 64, 8, 2)),
    256: Config(Blocks(64, 64, 8, 2), Blocks(32, 32, 8, 1), Blocks(64, 32, 8, 1)),
}
GPU_CONFIGS: dict[str, dict[int, Config]] = {
    "sm80": _SM80,
    "sm90": _SM90,
    # Blackwell (B200, 227 KiB): the untuned tiles but dK/dV at head dims 64 and 128, where 64 x 128 spilled
    # 296 B / 328 B with GQA group 4; 32 x 64 keeps 0 B / 104 B.
    "sm100": {
        **_UNTUNED,
        64: Config(Blocks(128, 64, 4, 3), Blocks(32, 64, 8, 2), Blocks(128, 64, 8, 2)),
        128: Config(Blocks(128, 64, 8, 3), Blocks(32, 64, 8, 2), Blocks(128, 64, 8, 2)),
    },
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
