"""Attention kernels and their SDPA fallback against a float64 reference with an explicit mask.

The Triton kernels run on the CPU in Triton's interpreter. TRITON_INTERPRET is set per test by the
`interpreter` fixture (monkeypatch.setenv, undone after each test) rather than at import time: triton
reads the variable when a function is wrapped by triton.jit, not when triton is imported, and
ferrolm.kernels wraps its kernels lazily, on the first call that needs them, rebuilding them whenever the
variable's value has changed. So the interpreter tests behave the same whatever ran before them in the
pytest process (even code that imported triton), and the variable never leaks into other test files.

Every kernel output (O, the log-sum-exp, dQ, dK, dV, delta) is allocated through attention._empty, which
the fixture replaces with a NaN fill: an element a kernel forgets to write fails the comparison.
Inputs are fresh per case (a generator seeded from the case's name, so a failure reproduces).
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from collections.abc import Callable

import pytest
import torch

from ferrolm.kernels import attention, attention_reference, flash_attention, flash_attention_varlen

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 runs exact dot products in the interpreter: errors are ~1e-6, bugs (a missed or doubled key) ~1e-2.
# fp16 rounds every output and gradient to 11 bits: SDPA's own fp16 errors are ~4e-3 here.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1.5e-2, rtol=1e-2)}


def _nan_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention, "_empty", _nan_empty)


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _inputs(
    name: str, lead: tuple[int, ...], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """q, k, v (requiring grad) and an output gradient, shaped lead + (heads, head_dim)."""
    gen = _generator(name)

    def randn(h: int) -> torch.Tensor:
        return torch.randn(*lead, h, head_dim, generator=gen).to(dtype)

    # A larger q makes softmax peaky, so the online max really moves between key blocks.
    q = (2.0 * randn(heads)).requires_grad_()
    k, v = randn(kv_heads).requires_grad_(), randn(kv_heads).requires_grad_()
    return q, k, v, randn(heads)


def _forward_backward(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of fn(q, k, v) with output gradient `grad`, the inputs cast to `dtype` first
    (float64 for the reference, whose gradients must not round to the inputs' dtype)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def _assert_matches(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> None:
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), w, **TOLERANCE[dtype], msg=lambda m, n=name: f"{n}: {m}")


def _cu(*boundaries: int) -> torch.Tensor:
    return torch.tensor(boundaries, dtype=torch.int32)


def _cu_from_lengths(lengths: list[int], pad_to: int = 0) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    bounds += [bounds[-1]] * max(0, pad_to - len(bounds))  # the loader's padding: zero-length documents
    return _cu(*bounds)


# Interpreter tiles: fwd 32x16, dK/dV 32 keys x 16 queries, dQ 32x16 (attention._INTERPRETER_CONFIG).
LAYOUTS = {
    "single": _cu(0, 96),
    "tiny": _cu_from_lengths([1 + (7 * i) % 5 for i in range(20)]),  # 60 tokens, documents of 1..5
    "length_one": _cu(*range(41)),  # 40 documents of one token: each sees only itself
    "inside": _cu(0, 7, 40, 41, 77, 120, 120, 120),  # boundaries inside tiles; padded
    "empty_middle": _cu(0, 0, 20, 20, 20, 53, 64, 64),  # empty documents first and between
    "multiples": _cu(0, 32, 64, 128, 128),  # boundaries on tile edges
    "long": _cu(0, 100, 256),  # T = 256
}

# (layout, causal, heads, kv_heads, head_dim): every layout causal and not; GQA ratios 1/2/4 and head dims
# 16/32/64 spread across mask kinds.
VARLEN_CASES = [
    ("single", True, 4, 1, 32),
    ("single", False, 2, 2, 64),
    ("tiny", True, 2, 2, 16),
    ("tiny", False, 4, 1, 32),
    ("length_one", True, 4, 2, 16),
    ("length_one", False, 2, 2, 32),
    ("inside", True, 4, 2, 64),
    ("inside", False, 4, 1, 16),
    ("empty_middle", True, 2, 2, 32),
    ("empty_middle", False, 4, 2, 64),
    ("multiples", True, 4, 1, 16),
    ("multiples", False, 4, 2, 32),
    ("long", True, 2, 1, 16),
    ("long", False, 2, 2, 16),
]

# (B, T, heads, kv_heads, head_dim, causal): T a tile multiple, not one, and T = 1.
DENSE_CASES = [
    (2, 64, 2, 2, 32, True),
    (2, 64, 4, 1, 16, False),
    (3, 50, 4, 2, 64, True),
    (1, 37, 2, 1, 32, False),
    (2, 1, 2, 2, 16, True),
]


def _varlen_id(case: tuple) -> str:
    layout, causal, h, hkv, d = case
    return f"{layout}-{'causal' if causal else 'full'}-h{h}kv{hkv}-d{d}"


def _dense_id(case: tuple) -> str:
    b, t, h, hkv, d, causal = case
    return f"B{b}T{t}-{'causal' if causal else 'full'}-h{h}kv{hkv}-d{d}"


def _check_varlen(case: tuple, backend: str, dtype: torch.dtype) -> None:
    layout, causal, heads, kv_heads, head_dim = case
    cu = LAYOUTS[layout]
    n = int(cu[-1])
    name = f"{_varlen_id(case)}-{backend}-{dtype}"
    q, k, v, grad = _inputs(name, (n,), heads, kv_heads, head_dim, dtype)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    got = _forward_backward(
        lambda q, k, v: flash_attention_varlen(q, k, v, cu, max_seqlen, causal, backend=backend),
        q, k, v, grad,
    )  # fmt: skip
    want = _forward_backward(
        lambda q, k, v: attention_reference(q, k, v, causal, cu_seqlens=cu), q, k, v, grad, torch.float64
    )
    _assert_matches(got, want, dtype)


def _check_dense(case: tuple, backend: str, dtype: torch.dtype) -> None:
    B, T, heads, kv_heads, head_dim, causal = case
    name = f"{_dense_id(case)}-{backend}-{dtype}"
    q, k, v, grad = _inputs(name, (B, T), heads, kv_heads, head_dim, dtype)
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, causal, backend=backend), q, k, v, grad)
    want = _forward_backward(
        lambda q, k, v: attention_reference(q, k, v, causal), q, k, v, grad, torch.float64
    )
    _assert_matches(got, want, dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels in the interpreter


@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_id)
def test_triton_varlen_matches_reference(interpreter: None, case: tuple) -> None:
    _check_varlen(case, "triton", torch.float32)


@pytest.mark.parametrize("case", DENSE_CASES, ids=_dense_id)
def test_triton_dense_matches_reference(interpreter: None, case: tuple) -> None:
    _check_dense(case, "triton", torch.float32)


@pytest.mark.parametrize(
    "case", [("inside", True, 4, 2, 32), ("tiny", False, 2, 1, 64)], ids=_varlen_id
)  # fmt: skip
def test_triton_fp16_matches_reference(interpreter: None, case: tuple) -> None:
    _check_varlen(case, "triton", torch.float16)


def test_triton_fp16_dense(interpreter: None) -> None:
    _check_dense((2, 48, 4, 1, 32, True), "triton", torch.float16)


@pytest.mark.parametrize(
    "case", [("inside", True, 4, 2, 32), ("empty_middle", False, 2, 1, 16), ("long", True, 2, 2, 16)],
    ids=_varlen_id,
)  # fmt: skip
def test_triton_other_tile_shapes(interpreter: None, monkeypatch: pytest.MonkeyPatch, case: tuple) -> None:
    """Key tiles wider than query tiles in the forward and dQ passes, narrower in dK/dV: the
    phase arithmetic must not assume the default shapes."""
    wide = attention._Config(
        attention._Blocks(16, 32, 4, 1), attention._Blocks(32, 16, 4, 1), attention._Blocks(16, 32, 4, 1)
    )
    monkeypatch.setattr(attention, "_INTERPRETER_CONFIG", wide)
    _check_varlen(case, "triton", torch.float32)


def _tile() -> int:
    config = attention._INTERPRETER_CONFIG
    return max(config.fwd.m, config.fwd.n, config.dkdv.m, config.dkdv.n, config.dq.m, config.dq.n)


# NaN inputs make numpy warn inside the interpreter; the NaN is the point here.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_skips_other_documents(interpreter: None, causal: bool) -> None:
    """Block skipping, observed: NaN in one document's K and V (then its Q and dO) must not reach any
    other document, which it would if a tile of theirs read it (0 * NaN is NaN). Documents are tile
    multiples, so no tile legitimately spans two."""
    tile = _tile()
    cu = _cu(*(i * tile for i in range(5)))
    n = int(cu[-1])
    poisoned = slice(2 * tile, 3 * tile)  # document 2
    others = torch.ones(n, dtype=torch.bool)
    others[poisoned] = False
    q, k, v, grad = _inputs(f"skip-docs-{causal}", (n,), 4, 2, 16, torch.float32)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attention_varlen(q, k, v, cu, tile, causal, backend="triton")

    want = _forward_backward(
        lambda q, k, v: attention_reference(q, k, v, causal, cu_seqlens=cu), q, k, v, grad, torch.float64
    )
    nan_kv = [t.detach().clone() for t in (k, v)]
    for t in nan_kv:
        t[poisoned] = float("nan")
    out, dq, _, _ = _forward_backward(run, q, *nan_kv, grad)
    for got, ref in ((out, want[0]), (dq, want[1])):
        torch.testing.assert_close(got[others].double(), ref[others], **TOLERANCE[torch.float32])

    nan_q, nan_grad = q.detach().clone(), grad.clone()
    nan_q[poisoned] = float("nan")
    nan_grad[poisoned] = float("nan")
    _, _, dk, dv = _forward_backward(run, nan_q, k, v, nan_grad)
    for got, ref in ((dk, want[2]), (dv, want[3])):
        torch.testing.assert_close(got[others].double(), ref[others], **TOLERANCE[torch.float32])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_skips_keys_above_the_diagonal(interpreter: None) -> None:
    """Causal skipping, observed: NaN keys in the last tile must not reach earlier query tiles, and NaN
    queries in the first tile must not reach the gradients of later keys."""
    tile = _tile()
    n = 4 * tile
    q, k, v, grad = _inputs("skip-diagonal", (1, n), 2, 1, 32, torch.float32)
    want = _forward_backward(lambda q, k, v: attention_reference(q, k, v, True), q, k, v, grad, torch.float64)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attention(q, k, v, True, backend="triton")

    nan_kv = [t.detach().clone() for t in (k, v)]
    for t in nan_kv:
        t[:, -tile:] = float("nan")
    out, dq, _, _ = _forward_backward(run, q, *nan_kv, grad)
    for got, ref in ((out, want[0]), (dq, want[1])):
        torch.testing.assert_close(got[:, :-tile].double(), ref[:, :-tile], **TOLERANCE[torch.float32])

    nan_q, nan_grad = q.detach().clone(), grad.clone()
    nan_q[:, :tile] = float("nan")
    nan_grad[:, :tile] = float("nan")
    _, _, dk, dv = _forward_backward(run, nan_q, k, v, nan_grad)
    for got, ref in ((dk, want[2]), (dv, want[3])):
        torch.testing.assert_close(got[:, tile:].double(), ref[:, tile:], **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_strided_views_of_one_projection(interpreter: None, backend: str) -> None:
    """A model's q, k, v are views of one (B, T, 3, H, D) projection; a transposed tensor has no unit
    stride along D. Gradients must flow back to the projection."""
    B, T, H, D = 2, 40, 2, 16
    qkv = torch.randn(B, T, 3, H, D, generator=_generator(f"strided-{backend}")).requires_grad_()
    other = torch.randn(B, T, D, H, generator=_generator("strided-t")).requires_grad_()
    grad = torch.randn(B, T, H, D, generator=_generator("strided-grad"))
    leaves = (qkv, other)

    def run(attend: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        for t in leaves:
            t.grad = None
        q, k = qkv[:, :, 0], qkv[:, :, 1]  # (B, T, H, D) views, row stride 3*H*D
        v = qkv[:, :, 2] + other.transpose(2, 3)  # (B, T, H, D) with stride(-1) == H
        out = attend(q, k, v)
        out.backward(grad.to(out.dtype))
        return [out.detach().double(), *(t.grad.double() for t in leaves)]

    got = run(lambda q, k, v: flash_attention(q, k, v, True, backend=backend))
    want = run(lambda q, k, v: attention_reference(q, k, v, True))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOLERANCE[torch.float32])


def test_kernels_follow_the_interpreter_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels first jitted for the GPU (as when GPU tests run earlier in the same pytest process) are
    jitted again for the interpreter once TRITON_INTERPRET is set, and back."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compiled = attention._triton_kernels().fwd
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = attention._triton_kernels().fwd
    assert type(compiled).__name__ == "JITFunction"
    assert type(interpreted).__name__ == "InterpretedFunction"
    _check_dense((1, 20, 2, 1, 16, True), "triton", torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert type(attention._triton_kernels().fwd).__name__ == "JITFunction"


def test_triton_empty_input(interpreter: None) -> None:
    q = torch.randn(0, 2, 16)
    assert flash_attention_varlen(q, q, q, _cu(0, 0), 0, backend="triton").shape == (0, 2, 16)
    assert flash_attention(q[None], q[None], q[None], backend="triton").shape == (1, 0, 2, 16)


# ----------------------------------------------------------------------------------------------------
# SDPA fallback: what the CPU trainer runs


@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_id)
def test_sdpa_varlen_matches_reference(case: tuple) -> None:
    _check_varlen(case, "sdpa", torch.float32)


@pytest.mark.parametrize("case", DENSE_CASES, ids=_dense_id)
def test_sdpa_dense_matches_reference(case: tuple) -> None:
    _check_dense(case, "sdpa", torch.float32)


def test_sdpa_bfloat16() -> None:
    """Loose: bf16 keeps 8 bits, and this is what the CPU trainer runs under autocast."""
    layout, causal, heads, kv_heads, head_dim = case = ("inside", True, 4, 2, 32)
    cu = LAYOUTS[layout]
    q, k, v, grad = _inputs("sdpa-bf16", (int(cu[-1]),), heads, kv_heads, head_dim, torch.bfloat16)
    got = _forward_backward(
        lambda q, k, v: flash_attention_varlen(q, k, v, cu, 40, causal, backend="sdpa"), q, k, v, grad
    )
    want = _forward_backward(
        lambda q, k, v: attention_reference(q, k, v, causal, cu_seqlens=cu), q, k, v, grad, torch.float64
    )
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16, case
        torch.testing.assert_close(g.double(), w, atol=0.1, rtol=0.05)


# ----------------------------------------------------------------------------------------------------
# Dispatch and argument checks


def test_auto_picks_sdpa_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even with the interpreter on: `auto` never runs tests' slow path in a CPU trainer."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def forbidden(*args: object) -> None:
        raise AssertionError("auto ran the Triton kernels on the CPU")

    monkeypatch.setattr(attention, "_triton_forward", forbidden)
    q = torch.randn(2, 8, 2, 16)
    flash_attention(q, q, q)
    flash_attention_varlen(q[0], q[0], q[0], _cu(0, 3, 8), 5)


def test_forced_triton_without_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        flash_attention(q, q, q, backend="triton")


def test_unsupported_calls_fall_back_or_explain(interpreter: None) -> None:
    q = torch.randn(1, 8, 2, 24)  # head dim 24: no kernel
    with pytest.raises(RuntimeError, match="head dim 24"):
        flash_attention(q, q, q, backend="triton")
    torch.testing.assert_close(
        flash_attention(q, q, q, backend="auto").double(), attention_reference(q, q, q), atol=1e-5, rtol=1e-5
    )
    bf16 = torch.randn(1, 8, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        flash_attention(bf16, bf16, bf16, backend="triton")


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "message"),
    [
        ((2, 8, 4, 16), (2, 8, 3, 16), "multiple"),  # 4 query heads over 3 K/V heads
        ((2, 8, 4, 16), (2, 9, 4, 16), "agree"),
        ((8, 4, 16), (8, 4, 16), r"\(B, T, H, D\)"),
    ],
)
def test_bad_shapes(q_shape: tuple, kv_shape: tuple, message: str) -> None:
    q, kv = torch.randn(q_shape), torch.randn(kv_shape)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, kv, kv)


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        (torch.tensor([0, 8], dtype=torch.int64), "int32"),
        (_cu(0, 5), "total_tokens=8"),
        (_cu(0, 6, 4, 8), "without decreasing"),
        (_cu(1, 8), "from 0"),
    ],
)
def test_bad_cu_seqlens(cu: torch.Tensor, message: str) -> None:
    q = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match=message):
        flash_attention_varlen(q, q, q, cu, 8)


def test_bad_backend() -> None:
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="backend"):
        flash_attention(q, q, q, backend="flash")  # type: ignore[arg-type]


def test_imports_stay_lazy() -> None:
    """`import ferrolm` must not import torch; `import ferrolm.kernels` must not import triton."""
    code = (
        "import sys, ferrolm; assert 'torch' not in sys.modules, 'ferrolm imported torch'; "
        "import ferrolm.kernels; assert 'triton' not in sys.modules, 'ferrolm.kernels imported triton'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------
# On a GPU (skipped without one)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_kernels_match_reference(dtype: torch.dtype, head_dim: int, causal: bool) -> None:
    """Real tile sizes and 16-bit tensor cores. FlashAttention's criterion: no more than twice the error
    of PyTorch's own attention in the same dtype (plus a floor for values that round to zero error)."""
    torch.manual_seed(head_dim + causal)
    cu = _cu_from_lengths([300, 1, 517, 64, 1000, 142], pad_to=10).cuda()  # 2024 tokens
    n = int(cu[-1])
    q, k, v, grad = (t.detach().cuda() for t in _inputs("gpu", (n,), 8, 2, head_dim, dtype))
    want = _forward_backward(
        lambda q, k, v: attention_reference(q, k, v, causal, cu_seqlens=cu), q, k, v, grad, torch.float64
    )
    got = _forward_backward(
        lambda q, k, v: flash_attention_varlen(q, k, v, cu, 1000, causal, backend="triton"), q, k, v, grad
    )
    torch_same_dtype = _forward_backward(
        lambda q, k, v: flash_attention_varlen(q, k, v, cu, 1000, causal, backend="sdpa"), q, k, v, grad
    )
    for name, g, t, w in zip(("out", "dq", "dk", "dv"), got, torch_same_dtype, want, strict=True):
        ours, theirs = (g.double() - w).abs().max().item(), (t.double() - w).abs().max().item()
        assert ours <= 2 * theirs + 1e-3, f"{name}: error {ours:.2e} vs torch's {theirs:.2e}"


@pytest.mark.gpu
@requires_cuda
def test_gpu_backward_is_deterministic() -> None:
    cu = _cu_from_lengths([700, 300, 1048]).cuda()
    q, k, v, grad = (t.detach().cuda() for t in _inputs("det", (2048,), 8, 2, 64, torch.bfloat16))

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attention_varlen(q, k, v, cu, 1048, True)

    first, second = _forward_backward(run, q, k, v, grad), _forward_backward(run, q, k, v, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_uses_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = attention._triton_forward
    monkeypatch.setattr(attention, "_triton_forward", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
    flash_attention(q, q, q)
    assert calls
