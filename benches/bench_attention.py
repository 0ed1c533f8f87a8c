"""ferrolm's attention kernels against the peers a user would otherwise pick, side by side.

    python benches/bench_attention.py                       # full sweep on the current GPU, bf16
    python benches/bench_attention.py --seqlens 1024,4096 --head-dims 64 --impls ferrolm,flex
    python benches/bench_attention.py --dtype fp16 --chart attention.png

Peers: torch SDPA with its flash and cuDNN backends (no document masks: shown as "-" there),
FlexAttention with a document mask (compiled; its block mask is built once per shape, outside the
timing, as a trainer builds it once per batch and shares it across layers), and flash-attn
(flash_attn_func / flash_attn_varlen_func) when installed.

TFLOP/s count the FLOPs the mask actually needs: 4 * D * H per visible (query, key) pair in the forward,
where a causal mask halves the pairs and documents make them the sum of squared document lengths; the
backward is 2.5x the forward (five matmuls to two), so forward+backward is 3.5x. Each configuration keeps
--tokens tokens per batch (B = tokens / T) and H = --model-dim / D heads.

Before timing, a correctness preamble checks the kernels against the float64 reference (and every peer's
output against ferrolm's, so all of them compute the same thing). Without CUDA the preamble runs in
Triton's CPU interpreter and the script exits cleanly, saying timings need a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

import ferrolm.kernels
from ferrolm.kernels import attention_reference, flash_attention, flash_attention_varlen
from ferrolm.kernels.attention import Backend

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    seqlen: int  # T: tokens per row
    head_dim: int
    causal: bool
    documents: bool  # rows packed with several documents, attention masked to each


@dataclass
class Problem:
    """One configuration's inputs in each implementation's native layout (converted outside the timing)."""

    shape: Shape
    q: torch.Tensor  # (B, T, H, D)
    k: torch.Tensor  # (B, T, H_kv, D)
    v: torch.Tensor
    grad: torch.Tensor  # (B, T, H, D) output gradient
    cu_seqlens: torch.Tensor  # (n_docs + 1,) int32 over the flattened (B*T) stream; one doc per row if none
    doc_ids: torch.Tensor  # (B, T) document index within its row, for FlexAttention's mask
    max_seqlen: int
    visible_pairs: int  # (query, key) pairs the mask lets through, per head


def document_lengths(T: int, mean_len: int, gen: torch.Generator) -> list[int]:
    """Uniform random cut points: roughly exponential lengths, at least two documents per row."""
    n_docs = max(2, T // mean_len)
    cuts = torch.randperm(T - 1, generator=gen)[: n_docs - 1] + 1
    bounds = [0, *sorted(cuts.tolist()), T]
    return [b - a for a, b in itertools.pairwise(bounds)]


def make_problem(shape: Shape, args: argparse.Namespace, device: torch.device) -> Problem:
    T, D = shape.seqlen, shape.head_dim
    B = max(1, args.tokens // T)
    H = args.model_dim // D
    H_kv = H // args.gqa
    gen = torch.Generator().manual_seed(T * 1000 + D)
    dtype = DTYPES[args.dtype]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    rows = [document_lengths(T, args.mean_doc_len, gen) if shape.documents else [T] for _ in range(B)]
    lengths = [n for row in rows for n in row]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    doc_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in rows])  # (B, T)
    pairs = sum(n * (n + 1) // 2 if shape.causal else n * n for n in lengths)
    return Problem(
        shape=shape,
        q=randn(B, T, H, D),
        k=randn(B, T, H_kv, D),
        v=randn(B, T, H_kv, D),
        grad=randn(B, T, H, D),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
        doc_ids=doc_ids.to(device),
        max_seqlen=max(lengths),
        visible_pairs=pairs,
    )


# ----------------------------------------------------------------------------------------------------
# Implementations: each returns a function (q, k, v) -> out in its own layout, or None where it cannot
# express the configuration. `prepare` converts ferrolm's (B, T, H, D) inputs to that layout once.


@dataclass
class Impl:
    name: str
    build: Callable[[Problem], Callable[..., torch.Tensor] | None]
    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # (B, T, H, D) -> native layout
    restore: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # native output -> (B, T, H, D)


def _ferrolm(p: Problem) -> Callable[..., torch.Tensor]:
    s = p.shape
    if not s.documents:
        return lambda q, k, v: flash_attention(q, k, v, s.causal, backend="triton")
    B, T = p.q.shape[:2]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        flat = [t.view(B * T, *t.shape[2:]) for t in (q, k, v)]  # (B*T, H, D): one packed stream
        out = flash_attention_varlen(*flat, p.cu_seqlens, p.max_seqlen, s.causal, backend="triton")
        return out.view(B, T, *out.shape[1:])

    return run


def _sdpa(backend_name: str) -> Callable[[Problem], Callable[..., torch.Tensor] | None]:
    def build(p: Problem) -> Callable[..., torch.Tensor] | None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if p.shape.documents:
            return None  # a document mask would need an explicit (T, T) mask: not these backends
        backend = getattr(SDPBackend, backend_name)
        gqa = p.q.shape[2] != p.k.shape[2]

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=p.shape.causal, enable_gqa=gqa
                )

        return run

    return build


def _flex(p: Problem) -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc, causal = p.doc_ids, p.shape.causal

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = doc[b, q_idx] == doc[b, kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    B, T = doc.shape
    block_mask = create_block_mask(mask_mod, B, None, T, T, device=doc.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = p.q.shape[2] != p.k.shape[2]
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _flash_attn(p: Problem) -> Callable[..., torch.Tensor] | None:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    s = p.shape
    if not s.documents:
        return lambda q, k, v: flash_attn_func(q, k, v, causal=s.causal)
    B, T = p.q.shape[:2]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        flat = [t.view(B * T, *t.shape[2:]) for t in (q, k, v)]
        out = flash_attn_varlen_func(
            *flat, p.cu_seqlens, p.cu_seqlens, p.max_seqlen, p.max_seqlen, causal=s.causal
        )
        return out.view(B, T, *out.shape[1:])

    return run


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous()  # (B, T, H, D) -> (B, H, T, D)


IMPLS = {
    "ferrolm": Impl("ferrolm", _ferrolm),
    "sdpa-flash": Impl("sdpa-flash", _sdpa("FLASH_ATTENTION"), _heads_first, _heads_first),
    "sdpa-cudnn": Impl("sdpa-cudnn", _sdpa("CUDNN_ATTENTION"), _heads_first, _heads_first),
    "flex": Impl("flex", _flex, _heads_first, _heads_first),
    "flash-attn": Impl("flash-attn", _flash_attn),
}


# ----------------------------------------------------------------------------------------------------
# Correctness preamble


def check_against_reference(device: torch.device, dtype: torch.dtype, head_dims: list[int]) -> bool:
    """ferrolm's forward and gradients against the float64 reference on small packed and dense shapes.

    On CUDA the criterion is FlashAttention's (at most twice the error of torch's attention in the same
    dtype, plus 1e-3); in the interpreter (fp32, exact dots) a fixed 1e-4."""
    lengths = [1, 37, 64, 5, 100, 49] if device.type == "cuda" else [1, 13, 32, 5, 20]
    bounds = [0, *itertools.accumulate(lengths), sum(lengths)]  # the repeated end: loader-style padding
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    ok = True
    for head_dim in head_dims:
        for causal in (True, False):
            for documents in (True, False):
                ok &= _check_case(device, cu if documents else None, head_dim, causal, dtype, gen)
    return ok


def _check_case(
    device: torch.device,
    cu: torch.Tensor | None,  # documents, or None for one dense sequence
    head_dim: int,
    causal: bool,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> bool:
    n = int(cu[-1]) if cu is not None else 100
    q, k, v, grad = (
        torch.randn(n, h, head_dim, generator=gen).to(device=device, dtype=dtype) for h in (4, 2, 2, 4)
    )

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend) -> torch.Tensor:
        if cu is not None:
            return flash_attention_varlen(q, k, v, cu, n, causal, backend=backend)
        return flash_attention(q[None], k[None], v[None], causal, backend=backend)[0]

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if cu is not None:
            return attention_reference(q, k, v, causal, cu_seqlens=cu)
        return attention_reference(q[None], k[None], v[None], causal)[0]

    want = _outputs_and_grads(reference, q, k, v, grad, torch.float64)
    got = _outputs_and_grads(lambda *t: attend(*t, "triton"), q, k, v, grad)
    errors = [(g.double() - w).abs().max().item() for g, w in zip(got, want, strict=True)]
    if device.type == "cuda":
        theirs = _outputs_and_grads(lambda *t: attend(*t, "sdpa"), q, k, v, grad)
        limits = [2 * (t.double() - w).abs().max().item() + 1e-3 for t, w in zip(theirs, want, strict=True)]
    else:
        limits = [1e-4] * 4
    passed = all(e <= b for e, b in zip(errors, limits, strict=True))
    label = f"D={head_dim:<3} {'causal' if causal else 'full  '} {'dense' if cu is None else 'docs '}"
    detail = "  ".join(f"{name} {e:.1e}" for name, e in zip(("out", "dq", "dk", "dv"), errors, strict=True))
    print(f"  {label}  max error: {detail}  {'ok' if passed else 'FAIL'}")
    return passed


def _outputs_and_grads(
    fn: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(t.grad for t in leaves)]


# ----------------------------------------------------------------------------------------------------
# Timing


def tflops(problem: Problem, ms: float, backward: bool) -> float:
    _, _, H, D = problem.q.shape
    flops = 4 * D * H * problem.visible_pairs * (3.5 if backward else 1.0)
    return flops / (ms * 1e-3) / 1e12


def bench(impl: Impl, problem: Problem, reference_out: torch.Tensor | None) -> dict[str, float | str]:
    """{"fwd": TFLOP/s, "fwd+bwd": TFLOP/s}, or {"note": a short cell, "detail": the reason}."""
    import triton.testing

    try:
        fn = impl.build(problem)
    except Exception as error:  # a peer missing on this torch: report and move on
        return {"note": "unavailable", "detail": f"{type(error).__name__}: {error}"}
    if fn is None:
        return {"note": "-"}
    q, k, v, grad = (impl.prepare(t).detach() for t in (problem.q, problem.k, problem.v, problem.grad))
    try:
        out = impl.restore(fn(q, k, v))
    except Exception as error:
        return {"note": "error", "detail": f"{type(error).__name__}: {error}"}
    if reference_out is not None and (out.float() - reference_out.float()).abs().max().item() > 0.05:
        return {"note": "MISMATCH", "detail": "output differs from ferrolm's by more than 0.05"}
    result: dict[str, float | str] = {}
    result["fwd"] = tflops(problem, triton.testing.do_bench(lambda: fn(q, k, v), return_mode="median"), False)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    ms = triton.testing.do_bench(
        lambda: fn(*leaves).backward(grad), grad_to_none=leaves, return_mode="median"
    )
    result["fwd+bwd"] = tflops(problem, ms, True)
    return result


def table_row(shape: Shape, mode: str, results: dict[str, dict[str, float | str]], impls: list[str]) -> str:
    mask = ("causal" if shape.causal else "full") + ("+docs" if shape.documents else "")
    line = f"{shape.seqlen:>6} {shape.head_dim:>4} {mask:<13} {mode:<8}"
    for name in impls:
        value = results[name].get(mode, results[name].get("note", "-"))
        line += f"{value:>14.1f}" if isinstance(value, float) else f" {value:>13.13}"
    for peer, width in (("sdpa-flash", 19), ("flex", 14)):
        ours, theirs = results.get("ferrolm", {}).get(mode), results.get(peer, {}).get(mode)
        ratio = f"{ours / theirs:.2f}x" if isinstance(ours, float) and isinstance(theirs, float) else "-"
        line += f"{ratio:>{width}}"
    return line


def chart(rows: list[tuple[Shape, dict[str, dict[str, float | str]]]], impls: list[str], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no chart written to {path})")
        return
    panels = [(c, d) for d in (False, True) for c in (True, False)]
    head_dims = sorted({shape.head_dim for shape, _ in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 8), squeeze=False)
    for row, mode in enumerate(("fwd", "fwd+bwd")):
        for col, (causal, documents) in enumerate(panels):
            ax = axes[row][col]
            for color, name in enumerate(impls):  # color: implementation; line style: head dim
                for head_dim, style in zip(head_dims, itertools.cycle(("-", "--", ":", "-."))):
                    points = [
                        (s.seqlen, r[name][mode])
                        for s, r in rows
                        if (s.causal, s.documents, s.head_dim) == (causal, documents, head_dim)
                        and isinstance(r[name].get(mode), float)
                    ]
                    if points:
                        xs, ys = zip(*points, strict=True)
                        ax.plot(xs, ys, style, color=f"C{color}", marker="o", label=f"{name} D={head_dim}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, {'causal' if causal else 'full'}{', documents' if documents else ''}")
            ax.set_xlabel("T")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"attention on {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"chart written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqlens", default="1024,2048,4096,8192,16384")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch: B = tokens / T")
    parser.add_argument("--model-dim", type=int, default=2048, help="H = model_dim / D")
    parser.add_argument("--gqa", type=int, default=1, help="query heads per K/V head")
    parser.add_argument("--mean-doc-len", type=int, default=1024, help="mean document length with documents")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    parser.add_argument("--chart", default="bench_attention.png", help="PNG path ('' for none)")
    args = parser.parse_args()
    head_dims = [int(d) for d in args.head_dims.split(",")]
    impls = [name for name in args.impls.split(",") if name]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {list(IMPLS)}")

    if not torch.cuda.is_available():
        print("No CUDA device: running the correctness preamble in Triton's CPU interpreter (fp32).")
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are first jitted, i.e. below
        try:
            import triton  # noqa: F401
        except ImportError:
            print("triton is not installed, so the kernels cannot run here at all; nothing to check.")
            return 0
        ok = check_against_reference(torch.device("cpu"), torch.float32, [16, 32])
        print("preamble passed." if ok else "preamble FAILED.")
        print("Timings need a CUDA GPU: nothing timed. Run this script on one for the table and chart.")
        return 0 if ok else 1

    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {args.dtype}  ferrolm.kernels from "
          f"{os.path.dirname(ferrolm.kernels.__file__)}")  # fmt: skip
    print("correctness preamble (vs float64 reference; bound: 2x torch SDPA's error in the same dtype):")
    if not check_against_reference(device, DTYPES[args.dtype], head_dims):
        print("preamble FAILED: not timing wrong kernels.")
        return 1

    rows: list[tuple[Shape, dict[str, dict[str, float | str]]]] = []
    header = f"{'T':>6} {'D':>4} {'mask':<13} {'mode':<8}" + "".join(f"{n:>14}" for n in impls)
    header += "   ferrolm/sdpa-flash  ferrolm/flex"
    print("\nTFLOP/s (FLOPs the mask needs)\n" + header + "\n" + "-" * len(header))
    for documents in (False, True):
        for causal in (True, False):
            for head_dim in head_dims:
                for seqlen in (int(t) for t in args.seqlens.split(",")):
                    shape = Shape(seqlen, head_dim, causal, documents)
                    problem = make_problem(shape, args, device)
                    ours = IMPLS["ferrolm"].restore(_ferrolm(problem)(problem.q, problem.k, problem.v))
                    results = {name: bench(IMPLS[name], problem, ours) for name in impls}
                    rows.append((shape, results))
                    for mode in ("fwd", "fwd+bwd"):
                        print(table_row(shape, mode, results, impls), flush=True)
                    for name, result in results.items():
                        if "detail" in result:
                            print(f"{'':>6} {name}: {str(result['detail']).splitlines()[0][:150]}")
                    del problem
                    torch.cuda.empty_cache()
    print("\ntargets (H100, bf16): fwd+bwd >= 1.0x sdpa-flash on causal; >= 1.2x flex with documents")
    if args.chart:
        chart(rows, impls, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
