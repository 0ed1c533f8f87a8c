"""Attention with causal and document masks: Triton flash-attention kernels and a torch SDPA fallback.

Two public functions, both dispatchers (``backend="auto"`` runs the Triton kernels on CUDA and torch's
``scaled_dot_product_attention`` elsewhere; the model calls these and never picks a kernel itself):

- ``flash_attention(q, k, v)`` for ``(B, T, H, D)`` tensors;
- ``flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen)`` for packed ``(total_tokens, H, D)``
  tensors, where ``cu_seqlens`` (int32) holds the document boundaries and no token attends across one.

Grouped-query attention comes free: ``k`` and ``v`` may have fewer heads than ``q`` (any divisor); query
head ``h`` reads K/V head ``h // (H // H_kv)`` by index arithmetic, nothing is repeated in memory.

How the kernels work (FlashAttention-2, written for packed documents):

- The packed token stream is cut into query blocks of ``BLOCK_M`` rows *globally*, not per document, so a
  block may hold the tail of one document and the head of the next. A dense ``(B, T)`` batch is the same
  stream with documents of length ``T``. Global tiling means no empty programs (flash-attn's varlen grid is
  ``max_seqlen`` x documents) and many tiny documents share one tile instead of each wasting one.
- Each row's document ``[start, end)`` comes from a binary search over ``cu_seqlens`` in the kernel. From
  the first and last row of the block follow the key range any row can see (``[kv_lo, kv_hi)``: block
  skipping from the document boundaries and, when causal, the diagonal) and the sub-range every row
  sees entirely (``[full_lo, full_hi)``). The key loop runs in three phases: masked blocks before the
  full range (earlier documents of a straddling block), whole unmasked blocks, then masked blocks after
  it (the diagonal, a document's partial tail). Only the masked phases build the element-wise mask.
- Online softmax in fp32, in base 2 (``exp2`` is one instruction; ``log2(e)`` is folded into the scale);
  the forward stores each row's log-sum-exp so the backward recomputes probabilities without a rescan.
- The backward is deterministic, with no atomics: a preprocessing kernel computes
  ``delta = rowsum(dO * O)``; a dK/dV kernel owns one key block (and sums over the query heads of its
  K/V group, which is how GQA gradients reduce without atomics) and loops over the query blocks that can
  see it, in the same three phases; a dQ kernel owns one query block and loops over key blocks as the
  forward does.

Triton is imported lazily, on the first call that needs the kernels, so the SDPA path works where triton
is absent. Kernels run on CUDA, or on the CPU when ``TRITON_INTERPRET=1`` (Triton's interpreter: how
the tests run them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ferrolm.kernels.configs import Blocks, Config, gpu_config

Backend = Literal["auto", "triton", "sdpa"]

__all__ = ["attention_reference", "flash_attention", "flash_attention_varlen"]

# Bound on the first call that needs the kernels (see _triton_kernels); module globals because Triton
# resolves the names a kernel uses (tl, the helper kernels) in its module's namespace.
triton: Any = None
tl: Any = None

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: a tile spans the whole head dimension
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------
# Public API


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention over ``(B, T, H, D)`` tensors; returns ``(B, T, H, D)``.

    ``k`` and ``v`` are ``(B, T, H_kv, D)`` with ``H_kv`` dividing ``H`` (grouped-query attention).
    ``softmax_scale`` defaults to ``1 / sqrt(D)``. ``backend``: ``"auto"`` (Triton on CUDA, SDPA
    elsewhere), ``"triton"`` (the kernels; on CPU only under ``TRITON_INTERPRET=1``) or ``"sdpa"``.

    >>> q = torch.randn(2, 8, 4, 16); kv = torch.randn(2, 8, 2, 16)
    >>> flash_attention(q, kv, kv).shape
    torch.Size([2, 8, 4, 16])
    """
    _check_qkv(q, k, v, packed=False)
    B, T, H, D = q.shape
    scale = _default_scale(softmax_scale, D)
    if _select_backend(backend, q) == "sdpa":
        return _sdpa_dense(q, k, v, causal, scale)
    if q.numel() == 0:
        return torch.empty_like(q)
    # A dense batch is a packed stream of B documents of length T: the same kernel, with each row's
    # document computed arithmetically instead of searched for.
    out = _flash(
        q.reshape(B * T, H, D),  # (B*T, H, D), a view when (B, T) are mergeable, as in a model's layout
        k.reshape(B * T, k.shape[2], D),
        v.reshape(B * T, v.shape[2], D),
        None,
        T,
        causal,
        scale,
    )
    return out.view(B, T, H, D)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention over packed documents: ``(total_tokens, H, D)`` in, ``(total_tokens, H, D)`` out.

    ``cu_seqlens`` is int32 ``[0, end_0, end_1, ..., total_tokens]``: document ``i`` holds tokens
    ``cu_seqlens[i]:cu_seqlens[i + 1]``, and no token attends to another document. Padding repeats the
    last value (zero-length documents, as the loader pads to a fixed length); empty documents anywhere
    are allowed. ``max_seqlen`` is accepted for drop-in compatibility with flash-attn's varlen call: the
    kernels tile the packed stream and do not need it. ``causal=False`` with documents is the mask
    masked-LM pretraining needs. Values of ``cu_seqlens`` are checked on the CPU only (on CUDA that would
    synchronize the device on every call).

    >>> q = torch.randn(10, 4, 16); kv = torch.randn(10, 1, 16)
    >>> cu = torch.tensor([0, 3, 10, 10], dtype=torch.int32)
    >>> flash_attention_varlen(q, kv, kv, cu, max_seqlen=7, causal=False).shape
    torch.Size([10, 4, 16])
    """
    _check_qkv(q, k, v, packed=True)
    _check_cu_seqlens(cu_seqlens, q)
    # Under torch.compile the check would guard on max_seqlen's value (which the kernels never read), so
    # a new longest document would recompile the model: checked in eager mode only.
    if not torch.compiler.is_compiling() and (not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    scale = _default_scale(softmax_scale, q.shape[-1])
    if _select_backend(backend, q) == "sdpa":
        return _sdpa_varlen(q, k, v, cu_seqlens, causal, scale)
    if q.numel() == 0:
        return torch.empty_like(q)
    return _flash(q, k, v, cu_seqlens, 0, causal, scale)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition, in float64 with an explicit boolean mask: what the kernels are tested against.

    ``(B, T, H, D)`` tensors, or packed ``(total_tokens, H, D)`` ones when ``cu_seqlens`` is given.
    Differentiable; returns float64. Memory grows with ``T**2``: for tests, not training.
    """
    packed = cu_seqlens is not None
    if packed:
        q, k, v = q[None], k[None], v[None]  # (1, N, H, D): one row holding every document
    _, T, H, D = q.shape
    group = H // k.shape[2]
    scale = _default_scale(softmax_scale, D)
    q64 = q.double().transpose(1, 2)  # (B, H, T, D)
    k64 = k.double().repeat_interleave(group, dim=2).transpose(1, 2)  # (B, H, T, D): K/V head h // group
    v64 = v.double().repeat_interleave(group, dim=2).transpose(1, 2)  # (B, H, T, D)
    visible = torch.ones(T, T, dtype=torch.bool, device=q.device)  # (T, T): query i may see key j
    if causal:
        visible = visible.tril()
    if packed:
        doc = _document_ids(cu_seqlens, T)  # (T,)
        visible = visible & (doc[:, None] == doc[None, :])
    scores = (q64 @ k64.transpose(-1, -2)) * scale  # (B, H, T, T)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v64  # (B, H, T, D); every row sees at least itself
    out = out.transpose(1, 2)  # (B, T, H, D)
    return out[0] if packed else out


# ----------------------------------------------------------------------------------------------------
# Dispatch and checks


def _select_backend(backend: str, q: torch.Tensor) -> Literal["triton", "sdpa"]:
    """The one place that chooses between the kernels and SDPA."""
    if backend == "sdpa":
        return "sdpa"
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'sdpa', got {backend!r}")
    reason = _triton_unsupported_reason(q)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run this call: {reason}")
        return "triton"
    # auto: the kernels on CUDA when they support the call (else SDPA, which supports everything);
    # never the interpreter, which is for tests.
    return "triton" if q.is_cuda and reason is None else "sdpa"


def _triton_unsupported_reason(q: torch.Tensor) -> str | None:
    if not (q.is_cuda or _interpret_mode()):
        return (
            f"the tensors are on {q.device}; the kernels need CUDA, or TRITON_INTERPRET=1 to run in "
            "Triton's CPU interpreter"
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not one of {KERNEL_DTYPES}"
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return "Triton's interpreter computes bfloat16 dot products wrongly (numpy has no bfloat16)"
    try:
        import triton  # noqa: F401  (only asking whether it is installed)
    except ImportError:
        return "triton is not installed (it comes with torch's Linux CUDA wheels)"
    return None


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _default_scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, packed: bool) -> None:
    layout = "(total_tokens, H, D)" if packed else "(B, T, H, D)"
    ndim = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on every dim but heads {layout}"
        )
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"q's {q.shape[-2]} heads must be a multiple of k/v's {k.shape[-2]} heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, q: torch.Tensor) -> None:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of at least 2 entries, got {cu_seqlens.dtype} "
            f"of shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    # Values are read on the CPU only in eager mode: on CUDA reading them would synchronize the device,
    # and under torch.compile it would break the graph (and recompile it for every new set of boundaries).
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != q.shape[0] or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(
                f"cu_seqlens must rise from 0 to total_tokens={q.shape[0]} without decreasing, "
                f"got {cu_seqlens.tolist()}"
            )


def _document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) index of the document holding each token; empty documents hold none."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # right=True: a token at a boundary belongs to the document that starts there (the last of equal
    # entries when empty documents repeat a boundary).
    return torch.searchsorted(cu_seqlens, positions, right=True) - 1


# ----------------------------------------------------------------------------------------------------
# SDPA fallback: same semantics, autograd through torch (documents: an explicit boolean mask)


def _sdpa_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    # is_causal rather than an explicit (T, T) mask: same result (queries and keys have the same
    # length), and SDPA then picks its fused CPU / flash paths instead of the masked one.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, H, T, D)
        k.transpose(1, 2),  # (B, H_kv, T, D)
        v.transpose(1, 2),
        is_causal=causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # (B, H, T, D)
    return out.transpose(1, 2)  # (B, T, H, D)


def _sdpa_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    total = q.shape[0]
    doc = _document_ids(cu_seqlens, total)  # (N,)
    # One (N, N) mask over the whole pack: memory grows with total_tokens**2, fine for CPU-sized batches.
    mask = doc[:, None] == doc[None, :]  # (N, N): same document
    if causal:
        mask = mask.tril()
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # (1, H, N, D)
        k.transpose(0, 1)[None],  # (1, H_kv, N, D)
        v.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )  # (1, H, N, D)
    return out[0].transpose(0, 1)  # (N, H, D)


# ----------------------------------------------------------------------------------------------------
# The kernels as torch custom operators, with autograd
#
# Custom operators rather than a torch.autograd.Function: torch.compile treats an operator as one opaque
# node (its shapes come from the fake implementation), where it would try to trace a Function's forward
# into the Triton launch code and fail or break the graph. A graph break inside the model's loop over
# blocks makes dynamo skip the whole forward.


@torch.library.custom_op("ferrolm::flash_attention_forward", mutates_args=())
def _flash_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (N, H, D) attention on the Triton kernels: (out (N, H, D), lse (H, N)). ``cu_seqlens``
    None means documents of ``seq_len`` tokens each (a dense batch)."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _triton_forward(q, k, v, cu_seqlens, seq_len, causal, scale)


@_flash_forward_op.register_fake
def _flash_forward_fake(q, k, v, cu_seqlens, seq_len, causal, scale):  # type: ignore[no-untyped-def]
    N, H, D = q.shape
    return q.new_empty((N, H, D)), q.new_empty((H, N), dtype=torch.float32)


@torch.library.custom_op("ferrolm::flash_attention_backward", mutates_args=())
def _flash_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of ``_flash_forward_op``, each contiguous."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _triton_backward(
        q, k, v, out, lse, _last_dim_contiguous(grad_out), cu_seqlens, seq_len, causal, scale
    )


@_flash_backward_op.register_fake
def _flash_backward_fake(q, k, v, out, lse, grad_out, cu_seqlens, seq_len, causal, scale):  # type: ignore[no-untyped-def]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, k, v, cu_seqlens, seq_len, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.seq_len, ctx.causal, ctx.scale = seq_len, causal, scale


def _flash_backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[Any, ...]:
    # lse is an internal output (nothing differentiates through it): its gradient is ignored.
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_backward_op(
        q, k, v, out, lse, grad_out, cu_seqlens, ctx.seq_len, ctx.causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None


_flash_forward_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def _flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    return _flash_forward_op(q, k, v, cu_seqlens, seq_len, causal, scale)[0]


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any row/head strides (a model's q/k/v are views of one projection) but need
    # unit stride along D for vector loads.
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here, uninitialised. The tests replace this function with one
    that fills NaN, so an element a kernel forgets to write fails instead of passing by luck."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# Launch configuration


# The GPU tables and the function that picks from them live in configs.py, shared with the ahead-of-time
# compile check (ferrolm.kernels.report), so the configs it checks are the ones launched here.
_Blocks = Blocks
_Config = Config
# The interpreter runs one numpy op per tile op: small, unequal tiles keep tests fast at T <= 256 and put
# document boundaries inside blocks, across blocks and on block edges.
_INTERPRETER_CONFIG = _Config(_Blocks(32, 16, 4, 1), _Blocks(16, 32, 4, 1), _Blocks(32, 16, 4, 1))


def _config(head_dim: int, device: torch.device) -> _Config:
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    return gpu_config(head_dim, torch.cuda.get_device_capability(device))


def _smaller(blocks: _Blocks) -> _Blocks | None:
    """The next config to try when a kernel does not fit the GPU's shared memory or registers."""
    if blocks.stages > 1:
        return _Blocks(blocks.m, blocks.n, blocks.warps, blocks.stages - 1)
    if max(blocks.m, blocks.n) > 16:
        if blocks.m >= blocks.n:
            return _Blocks(blocks.m // 2, blocks.n, blocks.warps, 2)
        return _Blocks(blocks.m, blocks.n // 2, blocks.warps, 2)
    return None


_fitted: dict[tuple[str, int, torch.dtype, int], _Blocks] = {}  # kernel launches that had to shrink


@dataclass(frozen=True)
class _Launch:
    """One kernel launch as the host code plans it: which kernel (a name in ``_triton_kernels()``), its
    tiles, grid, positional arguments and constexpr keywords. The runtime launches these; the compile
    check (ferrolm.kernels.report) compiles exactly these for targets it does not have."""

    kernel: str  # "fwd", "delta", "dkdv" or "dq"
    blocks: _Blocks
    grid: Callable[[_Blocks], tuple[int, ...]]
    args: tuple[Any, ...]
    constants: dict[str, Any]


def _launch(plan: _Launch, dtype: torch.dtype, device: torch.device) -> None:
    """Launch ``plan``, shrinking its tiles if the GPU runs out of shared memory (the tables in configs.py
    are checked for an A100's and an H100's; a consumer GPU has less) and remembering what fit."""
    kernel = getattr(_triton_kernels(), plan.kernel)
    key = (plan.kernel, plan.constants["HEAD_DIM"], dtype, device.index or 0)
    blocks = _fitted.get(key, plan.blocks)
    while True:
        try:
            kernel[plan.grid(blocks)](
                *plan.args, **plan.constants, BLOCK_M=blocks.m, BLOCK_N=blocks.n, num_warps=blocks.warps,
                num_stages=blocks.stages,
            )  # fmt: skip
            return
        except triton.runtime.errors.OutOfResources:
            smaller = _smaller(blocks)
            if smaller is None:
                raise
            blocks = _fitted[key] = smaller


# ----------------------------------------------------------------------------------------------------
# Host side of the kernels


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _documents(
    cu_seqlens: torch.Tensor | None, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, int, int, int, bool]:
    """Kernel arguments describing the documents: (cu_seqlens, its length, binary-search steps, seq_len,
    is_varlen). A dense batch passes a dummy pointer that the kernels never read."""
    if cu_seqlens is None:
        return torch.zeros(2, dtype=torch.int32, device=device), 2, 0, seq_len, False
    n_cu = cu_seqlens.numel()
    # The search narrows [0, n_cu - 2] by half per step; bit_length steps always suffice.
    return cu_seqlens, n_cu, max(1, (n_cu - 1).bit_length()), 1, True


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 on GPU (10-bit mantissa); fp32 is for tests, so exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    causal: bool,
    scale: float,
    config: _Config,
) -> tuple[list[_Launch], torch.Tensor, torch.Tensor]:
    """The forward's launches and the (not yet written) tensors they fill: out (N, H, D), lse (H, N)."""
    N, H, D = q.shape
    H_kv = k.shape[1]
    out = _empty((N, H, D), q.dtype, q.device)  # (N, H, D)
    lse = _empty((H, N), torch.float32, q.device)  # (H, N): per-head rows contiguous for the backward
    cu, n_cu, n_search, seq_len, is_varlen = _documents(cu_seqlens, seq_len, q.device)
    fwd = _Launch(
        "fwd",
        config.fwd,
        lambda b: (_cdiv(N, b.m), H),
        (q, k, v, out, lse, cu, n_cu, n_search, seq_len, N,
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
         out.stride(0), out.stride(1), scale * math.log2(math.e)),
        dict(GROUP=H // H_kv, HEAD_DIM=D, CAUSAL=causal, IS_VARLEN=is_varlen,
             DOT_PRECISION=_dot_precision(q.dtype)),
    )  # fmt: skip
    return [fwd], out, lse


def _backward_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    causal: bool,
    scale: float,
    config: _Config,
) -> tuple[list[_Launch], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's launches, in order, and the gradients they fill: dq, dk, dv."""
    N, H, D = q.shape
    H_kv = k.shape[1]
    cu, n_cu, n_search, seq_len, is_varlen = _documents(cu_seqlens, seq_len, q.device)
    docs = (cu, n_cu, n_search, seq_len, N)
    flags = dict(GROUP=H // H_kv, HEAD_DIM=D, CAUSAL=causal, IS_VARLEN=is_varlen,
                 DOT_PRECISION=_dot_precision(q.dtype))  # fmt: skip
    qk_scale = scale * math.log2(math.e)

    delta = _empty((H, N), torch.float32, q.device)  # (H, N): rowsum(dO * O), the softmax-gradient shift
    delta_launch = _Launch(
        "delta",
        config.dq,
        lambda b: (_cdiv(N, b.m), H),
        (out, grad_out, delta, N, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1)),
        dict(HEAD_DIM=D),
    )

    dk = _empty(k.shape, k.dtype, k.device)  # (N, H_kv, D)
    dv = _empty(v.shape, v.dtype, v.device)  # (N, H_kv, D)
    dkdv = _Launch(
        "dkdv",
        config.dkdv,
        lambda b: (_cdiv(N, b.n), H_kv),  # one program per key block and K/V head: no atomics
        (q, k, v, grad_out, dk, dv, lse, delta, *docs,
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
         grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
         qk_scale, scale),
        flags,
    )  # fmt: skip

    dq = _empty(q.shape, q.dtype, q.device)  # (N, H, D)
    dq_launch = _Launch(
        "dq",
        config.dq,
        lambda b: (_cdiv(N, b.m), H),
        (q, k, v, grad_out, dq, lse, delta, *docs,
         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
         grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1), qk_scale, scale),
        flags,
    )  # fmt: skip
    return [delta_launch, dkdv, dq_launch], dq, dk, dv


def _triton_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    config = _config(q.shape[-1], q.device)
    launches, out, lse = _forward_plan(q, k, v, cu_seqlens, seq_len, causal, scale, config)
    for plan in launches:
        _launch(plan, q.dtype, q.device)
    return out, lse


def _triton_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seq_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = _config(q.shape[-1], q.device)
    launches, dq, dk, dv = _backward_plan(
        q, k, v, out, lse, grad_out, cu_seqlens, seq_len, causal, scale, config
    )
    for plan in launches:  # in order: delta feeds dK/dV and dQ
        _launch(plan, q.dtype, q.device)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Lazy Triton: the kernels below are plain functions until the first call that needs them, which imports
# triton and wraps each with triton.jit. They must be module-level functions (not closures): Triton's
# interpreter re-executes a kernel's source in its module's globals, so helpers are found by global name.

_KERNEL_SOURCES: dict[str, Callable[..., Any]] = {}
_built_for: bool | None = None  # TRITON_INTERPRET value the kernels were wrapped for
_kernels_namespace: SimpleNamespace | None = None


def _triton_kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` to become a ``triton.jit`` function when triton is first needed."""
    _KERNEL_SOURCES[fn.__name__] = fn
    return fn


def _triton_kernels() -> SimpleNamespace:
    """Import triton and jit the kernels (again if TRITON_INTERPRET changed: triton reads it at jit time)."""
    global triton, tl, _built_for, _kernels_namespace
    interpret = _interpret_mode()
    if _kernels_namespace is None or _built_for != interpret:
        import triton as triton_module
        import triton.language as tl_module

        triton, tl = triton_module, tl_module
        for name, fn in _KERNEL_SOURCES.items():
            globals()[name] = triton.jit(fn)  # helpers resolve to the jitted versions by global name
        _built_for = interpret
        _kernels_namespace = SimpleNamespace(
            fwd=globals()["_attn_fwd_kernel"],
            delta=globals()["_attn_bwd_delta_kernel"],
            dkdv=globals()["_attn_bwd_dkdv_kernel"],
            dq=globals()["_attn_bwd_dq_kernel"],
        )
    return _kernels_namespace


# ----------------------------------------------------------------------------------------------------
# Triton kernels. Tensors are packed (N, H, D) with unit stride along D. Logits are in base 2:
# s2 = (q . k) * softmax_scale * log2(e), so softmax(s) = exp2(s2 - lse2) with lse2 the base-2 log-sum-exp.


@_triton_kernel
def _doc_bounds(idx, total, cu_seqlens, n_cu, n_search, seq_len, IS_VARLEN: tl.constexpr):
    """[start, end) of the document holding each token position in the vector ``idx``."""
    idx = tl.minimum(idx, total - 1)  # lanes past the end borrow the last token's document (never stored)
    if IS_VARLEN:
        # Largest i in [0, n_cu - 2] with cu_seqlens[i] <= idx: repeated entries (empty documents, the
        # loader's padding) resolve to the last repeat, the document that actually holds idx.
        lo = tl.zeros_like(idx)
        hi = tl.zeros_like(idx) + (n_cu - 2)
        for _ in range(n_search):
            mid = (lo + hi + 1) // 2
            go_right = tl.load(cu_seqlens + mid) <= idx
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid - 1)
        start = tl.load(cu_seqlens + lo)
        end = tl.load(cu_seqlens + lo + 1)
    else:
        start = (idx // seq_len) * seq_len
        end = start + seq_len
    return start, end


@_triton_kernel
def _query_block_ranges(
    m0, total, cu_seqlens, n_cu, n_search, seq_len,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """For the query rows [m0, m0 + BLOCK_M): each row's document and the three phases of keys.

    Returns (row_start, row_end, kv_lo, full_lo, full_end, kv_hi): rows see keys only in [kv_lo, kv_hi);
    every row sees every key of [full_lo, full_end), a whole number of BLOCK_N blocks.
    """
    rows = m0 + tl.arange(0, BLOCK_M)
    row_start, row_end = _doc_bounds(rows, total, cu_seqlens, n_cu, n_search, seq_len, IS_VARLEN)
    last = tl.minimum(m0 + BLOCK_M, total) - 1  # last real row
    # Document bounds rise with the row: first row's document start is the smallest, and so on.
    kv_lo = tl.min(row_start, 0)
    full_lo = tl.max(row_start, 0)  # keys at or after the last row's document start...
    full_hi = tl.min(row_end, 0)  # ...and before the first row's document end are every row's
    if CAUSAL:
        kv_hi = last + 1  # the diagonal: no row sees past itself
        full_hi = tl.minimum(full_hi, m0 + 1)  # keys <= the first row are below every row's diagonal
    else:
        kv_hi = tl.max(row_end, 0)
    n_full = tl.maximum(full_hi - full_lo, 0) // BLOCK_N
    full_end = full_lo + n_full * BLOCK_N
    return row_start, row_end, kv_lo, full_lo, full_end, kv_hi


@_triton_kernel
def _query_keeps(rows, cols, row_start, row_end, hi, CAUSAL: tl.constexpr):
    """(BM, BN): which keys ``cols`` each query row sees: its own document, before ``hi``, and (causal)
    not past itself. The forward pass and the dQ pass mask the same way."""
    keep = (cols[None, :] >= row_start[:, None]) & (cols[None, :] < row_end[:, None])
    keep = keep & (cols[None, :] < hi)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return keep


@_triton_kernel
def _attn_fwd_inner(
    acc, l_i, m_i, q, K, V, stride_kt, stride_vt, rows, row_start, row_end, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over the keys [lo, hi). MASKED phases apply the document/causal mask element-wise
    (and stop at hi); unmasked phases are whole blocks every row sees."""
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K + cols.to(tl.int64)[None, :] * stride_kt + dims[:, None]  # (D, BN)
        v_ptrs = V + cols.to(tl.int64)[:, None] * stride_vt + dims[None, :]  # (BN, D)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=cols[None, :] < hi, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < hi, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BM, BN) base-2 logits
        if MASKED:
            s = tl.where(_query_keeps(rows, cols, row_start, row_end, hi, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps max -inf; subtracting 0 instead keeps p and alpha at 0
            # rather than exp2(-inf - -inf) = NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])  # (BM, BN)
        alpha = tl.exp2(m_i - m_use)  # (BM,) rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # (BM, D)
        m_i = m_new
    return acc, l_i, m_i


@_triton_kernel
def _attn_fwd_kernel(
    Q, K, V, Out, LSE, cu_seqlens, n_cu, n_search, seq_len, total,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Highest query blocks first: under a causal mask they are the longest, and starting them first
    # shortens the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP  # grouped-query attention by index arithmetic
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < total
    row_start, row_end, kv_lo, full_lo, full_end, kv_hi = _query_block_ranges(
        m0, total, cu_seqlens, n_cu, n_search, seq_len, BLOCK_M, BLOCK_N, CAUSAL, IS_VARLEN
    )

    q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # (BM, D)
    K_h = K + kv_head * stride_kh
    V_h = V + kv_head * stride_vh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of the base-2 logits
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)  # (BM, D) running numerator

    # Earlier documents of a block straddling a boundary; whole blocks every row sees; then the diagonal
    # or the documents' ends.
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_h, V_h, stride_kt, stride_vt, rows, row_start, row_end, kv_lo, full_lo,
        qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_h, V_h, stride_kt, stride_vt, rows, row_start, row_end, full_lo, full_end,
        qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_h, V_h, stride_kt, stride_vt, rows, row_start, row_end, full_end, kv_hi,
        qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION,
    )  # fmt: skip

    # Every real row sees at least its own key, so l_i > 0 where it is stored.
    out = acc / l_i[:, None]  # (BM, D)
    o_ptrs = Out + rows.to(tl.int64)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + head.to(tl.int64) * total + rows, m_i + tl.log2(l_i), mask=row_ok)


@_triton_kernel
def _attn_bwd_delta_kernel(
    Out, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O): the term softmax's gradient subtracts, shared by the dK/dV and dQ passes."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < total
    rows64 = rows.to(tl.int64)
    o = tl.load(Out + rows64[:, None] * stride_ot + head * stride_oh + dims[None, :], mask=row_ok[:, None])
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=row_ok[:, None])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,)
    tl.store(DELTA + head.to(tl.int64) * total + rows, delta, mask=row_ok)


@_triton_kernel
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, cols, col_start, col_end, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate one key block's dK, dV over the query rows [lo, hi), one query head. Works transposed
    (keys as rows) so the accumulators need no transpose."""
    dims = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        qT_ptrs = Q + rows.to(tl.int64)[None, :] * stride_qt + dims[:, None]  # (D, BM)
        do_ptrs = DO + rows.to(tl.int64)[:, None] * stride_dot + dims[None, :]  # (BM, D)
        if MASKED:
            in_phase = rows < hi
            qT = tl.load(qT_ptrs, mask=in_phase[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=in_phase[:, None], other=0.0)
            lse = tl.load(LSE + rows, mask=in_phase, other=0.0)
            delta = tl.load(DELTA + rows, mask=in_phase, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE + rows)
            delta = tl.load(DELTA + rows)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale  # (BN, BM) base-2 logits
        if MASKED:
            # Same document: the query row lies in the key's document (an interval), which also drops
            # rows past the end of the pack (col_end <= total).
            keep = (rows[None, :] >= col_start[:, None]) & (rows[None, :] < col_end[:, None])
            keep = keep & in_phase[None, :]
            if CAUSAL:
                keep = keep & (rows[None, :] >= cols[:, None])
            sT = tl.where(keep, sT, float("-inf"))
        pT = tl.exp2(sT - lse[None, :])  # (BN, BM) probabilities, recomputed from the stored lse
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)  # (BN, D)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])  # (BN, BM) gradient of the logits (before the scale)
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)  # (BN, D)
    return dk, dv


@_triton_kernel
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, cu_seqlens, n_cu, n_search, seq_len, total,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    kv_head = tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < total
    col_start, col_end = _doc_bounds(cols, total, cu_seqlens, n_cu, n_search, seq_len, IS_VARLEN)
    last = tl.minimum(n0 + BLOCK_N, total) - 1  # last real key

    # Query rows that can see some key of this block: [q_lo, q_hi); rows that see all of them:
    # [full_lo, full_end), whole BLOCK_M blocks.
    q_hi = tl.max(col_end, 0)
    full_hi = tl.min(col_end, 0)  # before the first key's document end...
    if CAUSAL:
        q_lo = n0  # no row sees a key after itself
        full_lo = last + 1  # ...and past the block, so on or above every key's diagonal
    else:
        q_lo = tl.min(col_start, 0)
        full_lo = tl.max(col_start, 0)  # ...and in the last key's document
    n_full = tl.maximum(full_hi - full_lo, 0) // BLOCK_M
    full_end = full_lo + n_full * BLOCK_M

    k = tl.load(K + cols.to(tl.int64)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=col_ok[:, None], other=0.0)  # (BN, D)  # fmt: skip
    v = tl.load(V + cols.to(tl.int64)[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                mask=col_ok[:, None], other=0.0)  # (BN, D)  # fmt: skip
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    # The query heads sharing this K/V head add into one accumulator: GQA's reduction, deterministic.
    for g in range(GROUP):
        head = kv_head * GROUP + g
        Q_h = Q + head * stride_qh
        DO_h = DO + head * stride_doh
        LSE_h = LSE + head.to(tl.int64) * total
        DELTA_h = DELTA + head.to(tl.int64) * total
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, cols, col_start, col_end,
            q_lo, full_lo, qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, cols, col_start, col_end,
            full_lo, full_end, qk_scale, HEAD_DIM, BLOCK_M, False, CAUSAL, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, Q_h, DO_h, LSE_h, DELTA_h, stride_qt, stride_dot, cols, col_start, col_end,
            full_end, q_hi, qk_scale, HEAD_DIM, BLOCK_M, True, CAUSAL, DOT_PRECISION,
        )  # fmt: skip

    dk = dk * sm_scale  # d(logits)/dk carries the softmax scale; dv does not
    dk_ptrs = DK + cols.to(tl.int64)[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :]
    dv_ptrs = DV + cols.to(tl.int64)[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@_triton_kernel
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta, K, V, stride_kt, stride_vt, rows, row_start, row_end, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate one query block's dQ over the keys [lo, hi)."""
    dims = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K + cols.to(tl.int64)[None, :] * stride_kt + dims[:, None]  # (D, BN)
        vT_ptrs = V + cols.to(tl.int64)[None, :] * stride_vt + dims[:, None]  # (D, BN)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=cols[None, :] < hi, other=0.0)
            vT = tl.load(vT_ptrs, mask=cols[None, :] < hi, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale  # (BM, BN) base-2 logits
        if MASKED:
            s = tl.where(_query_keeps(rows, cols, row_start, row_end, hi, CAUSAL), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # (BM, BN)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)  # (BM, BN)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)  # (BM, D)
    return dq


@_triton_kernel
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, cu_seqlens, n_cu, n_search, seq_len, total,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first, as in the forward
    head = tl.program_id(1)
    kv_head = head // GROUP
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < total
    row_start, row_end, kv_lo, full_lo, full_end, kv_hi = _query_block_ranges(
        m0, total, cu_seqlens, n_cu, n_search, seq_len, BLOCK_M, BLOCK_N, CAUSAL, IS_VARLEN
    )

    rows64 = rows.to(tl.int64)
    q = tl.load(Q + rows64[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # (BM, D)  # fmt: skip
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + dims[None, :],
                 mask=row_ok[:, None], other=0.0)  # (BM, D)  # fmt: skip
    lse = tl.load(LSE + head.to(tl.int64) * total + rows, mask=row_ok, other=0.0)  # (BM,)
    delta = tl.load(DELTA + head.to(tl.int64) * total + rows, mask=row_ok, other=0.0)  # (BM,)
    K_h = K + kv_head * stride_kh
    V_h = V + kv_head * stride_vh
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K_h, V_h, stride_kt, stride_vt, rows, row_start, row_end, kv_lo, full_lo,
        qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K_h, V_h, stride_kt, stride_vt, rows, row_start, row_end, full_lo, full_end,
        qk_scale, HEAD_DIM, BLOCK_N, False, CAUSAL, DOT_PRECISION,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K_h, V_h, stride_kt, stride_vt, rows, row_start, row_end, full_end, kv_hi,
        qk_scale, HEAD_DIM, BLOCK_N, True, CAUSAL, DOT_PRECISION,
    )  # fmt: skip

    dq = dq * sm_scale
    dq_ptrs = DQ + rows64[:, None] * stride_dqt + head * stride_dqh + dims[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
