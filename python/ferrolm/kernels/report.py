"""Ahead-of-time compile check of the attention kernels for real GPUs, on a machine without one.

    python -m ferrolm.kernels.report                        # the full matrix: summary + every case
    python -m ferrolm.kernels.report --targets 90 --head-dims 128 --jobs 4
    python -m ferrolm.kernels.report --json resources.json  # also every case as JSON

Triton compiles ahead of time with no GPU present: ``triton.compile(ASTSource(fn, signature,
constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=...)`` runs the whole pipeline to PTX and
a cubin, and ``cuobjdump --dump-resource-usage`` (shipped inside the triton wheel) reads registers,
stack (spills) and static shared memory from the cubin; triton's metadata gives the dynamic shared memory
its launch asks for.

What is compiled is what the dispatcher launches: the host code's own launch plans
(``attention._forward_plan`` / ``_backward_plan``, fed meta tensors shaped like a model's q/k/v, which
are views of one projection) with the tiles of ``configs.gpu_config`` for the target, specialised the
way ``triton.jit`` specialises a real call (pointers 16-byte aligned, integers divisible by 16 marked,
an integer equal to 1 made a constant: varlen's ``seq_len``). Every compile uses a fresh, temporary
Triton cache, so nothing carries over from an earlier run.

A case fails the check on a compile error, on shared memory over the target's per-block limit, or on a
stack over the kernel's budget (``SPILL_BUDGET``). The exit status is 1 when any case fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferrolm.kernels import configs

KERNELS = ("fwd", "delta", "dkdv", "dq")
DTYPES = ("bf16", "fp16")
HEAD_DIMS = (64, 128, 256)
# Shared memory a block may use (the opt-in maximum the CUDA driver reports), bytes: A100 163 KiB; H100
# and B200 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
GPU_NAMES = {80: "A100", 90: "H100", 100: "B200"}
# Stack bytes per thread a kernel may use (cuobjdump's STACK: the local-memory frame, where ptxas puts
# what does not fit in registers). A plain FlashAttention-2 forward compiled the same way spills ~100 B
# at head dim 128 (issue 15), so small frames are normal; the budget is that, and no kernel gets more.
# The delta kernel (a row sum) gets 16 B: ptxas gives it an 8 B frame on sm_100 at head dim 64.
SPILL_BUDGET = {"fwd": 128, "delta": 16, "dkdv": 128, "dq": 128}

# The problem the meta tensors describe: 8 query heads over 8 // group K/V heads, 8192 packed tokens,
# documents through a fixed-length cu_seqlens of 33 entries (the loader pads it to a fixed length).
TOKENS, HEADS, CU_ENTRIES = 8192, 8, 33


@dataclass(frozen=True, order=True)
class Case:
    kernel: str  # one of KERNELS
    target: int  # compute capability as an integer: 80, 90, 100
    head_dim: int
    dtype: str  # "bf16" or "fp16"
    causal: bool
    varlen: bool
    group: int  # query heads per K/V head (GQA)

    @property
    def name(self) -> str:
        mask = ("causal" if self.causal else "full") + ("-varlen" if self.varlen else "-dense")
        return f"{self.kernel}-sm{self.target}-d{self.head_dim}-{self.dtype}-{mask}-g{self.group}"


@dataclass(frozen=True)
class Result:
    case: Case
    blocks: str  # "m x n, w warps, s stages" as launched
    regs: int | None = None  # registers per thread
    stack: int | None = None  # local-memory stack frame per thread, bytes (spills)
    shared: int | None = None  # dynamic (triton) + static shared memory per block, bytes
    seconds: float = 0.0  # compile time
    error: str | None = None  # compile error, or None

    @property
    def problems(self) -> list[str]:
        """Why this case fails the check (empty when it passes)."""
        if self.error is not None:
            return [f"compile error: {self.error}"]
        found = []
        limit = SHARED_LIMIT[self.case.target]
        if self.shared is not None and self.shared > limit:
            found.append(f"shared memory {self.shared} B > sm_{self.case.target}'s {limit} B per block")
        budget = SPILL_BUDGET[self.case.kernel]
        if self.stack is not None and self.stack > budget:
            found.append(f"stack {self.stack} B per thread > the {self.case.kernel} budget of {budget} B")
        return found


def all_cases(
    kernels: Iterable[str] = KERNELS,
    targets: Iterable[int] | None = None,
    head_dims: Iterable[int] = HEAD_DIMS,
    dtypes: Iterable[str] = DTYPES,
    causal: Iterable[bool] = (True, False),
    varlen: Iterable[bool] = (True, False),
    groups: Iterable[int] = (1, 4),
) -> list[Case]:
    """The full matrix (or the part asked for). The delta kernel ignores the mask and GQA: one case per
    target, head dim and dtype."""
    causal, varlen, groups = tuple(causal), tuple(varlen), tuple(groups)
    cases = []
    for kernel, target, d, dtype in itertools.product(
        kernels, targets or supported_targets(), head_dims, dtypes
    ):
        if kernel == "delta":
            cases.append(Case(kernel, target, d, dtype, True, False, 1))
            continue
        for c, v, g in itertools.product(causal, varlen, groups):
            cases.append(Case(kernel, target, d, dtype, c, v, g))
    return cases


def _triton_dir() -> Path:
    """The installed triton package's directory, found without importing it: importing triton decides
    whether its own library functions (tl.zeros_like, ...) are interpreted, so a process that runs the
    interpreter tests must not import it before TRITON_INTERPRET is set (the compiles run in workers)."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "triton is not installed: the compile check needs it (torch's Linux wheels ship it)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _tool_version(name: str) -> str:
    """'12.8'-style release of one of the NVIDIA tools inside the triton wheel."""
    path = _triton_dir() / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: this triton has no NVIDIA backend tools")
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    if found is None:
        raise RuntimeError(f"cannot read the version of {path}: {out.strip()!r}")
    return found.group(1)


def supported_targets() -> list[int]:
    """sm_80 and sm_90, and sm_100 where the installed triton has a ptxas that knows it (CUDA >= 12.8).
    Raises ImportError without triton, RuntimeError without its NVIDIA tools."""
    _tool_version("ptxas")
    targets = [80, 90]
    try:
        if tuple(int(x) for x in _tool_version("ptxas-blackwell").split(".")) >= (12, 8):
            targets.append(100)
    except RuntimeError:
        pass
    return targets


# ----------------------------------------------------------------------------------------------------
# Compiling one case


def _meta_plan(case: Case) -> Any:
    """The dispatcher's launch of ``case.kernel`` for a model-shaped problem, on meta tensors."""
    import torch

    from ferrolm.kernels import attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[case.dtype]
    N, H, D = TOKENS, HEADS, case.head_dim
    H_kv = H // case.group
    meta = torch.device("meta")
    # A model's q, k, v: views of one (N, (H + 2 H_kv) D) projection, so their row stride is the sum.
    qkv = torch.empty(N, (H + 2 * H_kv) * D, dtype=dtype, device=meta)
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k, v = q.view(N, H, D), k.view(N, H_kv, D), v.view(N, H_kv, D)
    cu = torch.empty(CU_ENTRIES, dtype=torch.int32, device=meta) if case.varlen else None
    seq_len = 0 if case.varlen else 1024
    config = configs.gpu_config(D, (case.target // 10, case.target % 10))
    scale = D**-0.5
    fwd, out, lse = attention._forward_plan(q, k, v, cu, seq_len, case.causal, scale, config)
    grad_out = torch.empty(N, H, D, dtype=dtype, device=meta)
    bwd, *_ = attention._backward_plan(q, k, v, out, lse, grad_out, cu, seq_len, case.causal, scale, config)
    return next(plan for plan in fwd + bwd if plan.kernel == case.kernel)


def _specialize(fn: Any, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """(signature, constexprs, attrs, options) as ``fn[grid](*args, **kwargs)`` would compile them on a
    device of ``target``: triton's own binder and packer (private API of triton 3.x; checked by the test)."""
    import torch
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    backend = make_backend(target)
    # A tensor becomes a MockTensor of its dtype: data_ptr 0, aligned like a CUDA allocation.
    args = tuple(MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)")


def _cubin_resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, static shared bytes) of the one kernel in ``cubin``, from cuobjdump."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = triton.knobs.nvidia.cuobjdump.path
        out = subprocess.run(
            [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, timeout=120
        )
    found = _RESOURCES.search(out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(
            f"cuobjdump --dump-resource-usage failed: {out.stderr.strip() or out.stdout.strip()}"
        )
    regs, stack, shared = (int(x) for x in found.groups())
    return regs, stack, shared


def compile_case(case: Case) -> Result:
    """Compile one case for its target and read its resources. A compile error is a result, not a raise."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ferrolm.kernels import attention

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
    plan = _meta_plan(case)
    b = plan.blocks
    blocks = f"{b.m}x{b.n}, {b.warps}w, {b.stages}s"
    kernels = attention._triton_kernels()
    fn = getattr(kernels, case.kernel)
    if type(fn).__name__ != "JITFunction":
        raise RuntimeError(
            "unset TRITON_INTERPRET: the compile check needs the real compiler, not the interpreter"
        )
    target = GPUTarget("cuda", case.target, 32)
    kwargs = dict(plan.constants, BLOCK_M=b.m, BLOCK_N=b.n, num_warps=b.warps, num_stages=b.stages)
    started = time.perf_counter()
    try:
        signature, constexprs, attrs, options = _specialize(fn, target, plan.args, kwargs)
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
        )
        regs, stack, static_shared = _cubin_resources(compiled.asm["cubin"])
    except Exception as e:  # any compiler failure is this case's result, reported in the table
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Result(
            case, blocks, seconds=time.perf_counter() - started, error=f"{type(e).__name__}: {first_line}"
        )
    return Result(
        case, blocks, regs, stack, compiled.metadata.shared + static_shared, time.perf_counter() - started
    )


@contextlib.contextmanager
def fresh_cache() -> Iterator[None]:
    """A temporary TRITON_CACHE_DIR for the duration (inherited by worker processes), removed after."""
    tmp = tempfile.mkdtemp(prefix="ferrolm-aot-")
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = tmp
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def run(cases: list[Case], jobs: int = 1, progress: bool = False) -> list[Result]:
    """Compile every case (``jobs`` processes), in a fresh cache; results in the order of ``cases``.
    ``progress`` prints one line per finished case on stderr."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("unset TRITON_INTERPRET: the compile check needs the real compiler")

    def done(i: int, result: Result) -> Result:
        if progress:
            status = "; ".join(result.problems) or "ok"
            print(f"[{i}/{len(cases)}] {result.case.name}: {result.seconds:.1f} s, {status}", file=sys.stderr)
        return result

    with fresh_cache():
        # Always in fresh (spawned) interpreters, each given this process's config tables: the caller may
        # have changed them (the tests do), and this process may have imported triton for its
        # interpreter, which the real compiler cannot share (see _triton_dir).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            max(1, jobs), mp_context=context, initializer=_init_worker, initargs=(configs.GPU_CONFIGS,)
        ) as pool:
            futures = {pool.submit(compile_case, c): c for c in cases}
            results = {}
            for i, future in enumerate(concurrent.futures.as_completed(futures)):
                results[futures[future]] = done(i + 1, future.result())
        return [results[c] for c in cases]


def _init_worker(tables: dict[str, dict[int, configs.Config]]) -> None:
    configs.GPU_CONFIGS.clear()
    configs.GPU_CONFIGS.update(tables)
    os.environ.pop("TRITON_INTERPRET", None)


# ----------------------------------------------------------------------------------------------------
# Tables


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.0f}"


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summary_table(results: list[Result]) -> str:
    """One row per kernel x head dim x target: ranges over dtype, mask and GQA group."""
    lines = [
        "| kernel | head dim | target | tiles (m x n, warps, stages) | cases | regs | stack B | "
        "shared KiB (limit) | budget | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (KERNELS.index(r.case.kernel), r.case.head_dim, r.case.target)  # noqa: E731
    for (_, d, target), group in itertools.groupby(sorted(results, key=key), key=key):
        rows = list(group)
        ok = [r for r in rows if r.error is None]
        kernel = rows[0].case.kernel
        failing = sum(bool(r.problems) for r in rows)
        status = "ok" if not failing else f"**{failing} failing**"
        tiles = " / ".join(sorted({r.blocks for r in rows}))
        regs = _span([r.regs for r in ok if r.regs is not None]) if ok else "-"
        stack = _span([r.stack for r in ok if r.stack is not None]) if ok else "-"
        stack = f"**{stack}**" if any(r.stack and r.stack > SPILL_BUDGET[kernel] for r in ok) else stack
        shared = _kib(max((r.shared for r in ok if r.shared is not None), default=None))
        lines.append(
            f"| {kernel} | {d} | sm_{target} | {tiles} | {len(rows)} | {regs} | {stack} | "
            f"{shared} ({_kib(SHARED_LIMIT[target])}) | {SPILL_BUDGET[kernel]} | {status} |"
        )
    return "\n".join(lines)


def full_table(results: list[Result]) -> str:
    lines = [
        "| case | tiles | regs | stack B | shared KiB | compile s | problems |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r.case):
        lines.append(
            f"| {r.case.name} | {r.blocks} | {r.regs if r.regs is not None else '-'} | "
            f"{r.stack if r.stack is not None else '-'} | {_kib(r.shared)} | {r.seconds:.1f} | "
            f"{'; '.join(r.problems) or '-'} |"
        )
    return "\n".join(lines)


def _environment() -> str:
    import torch

    return (
        f"triton {importlib.metadata.version('triton')}, torch {torch.__version__}, ptxas "
        f"{_tool_version('ptxas-blackwell')} (sm_90+) / {_tool_version('ptxas')} (sm_80)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ferrolm.kernels.report",
        description="Compile every attention kernel for real GPU targets (no GPU needed) and print "
        "registers, spills and shared memory as markdown.",
    )
    parser.add_argument(
        "--kernels", default=",".join(KERNELS), help="comma-separated, of " + ",".join(KERNELS)
    )
    parser.add_argument(
        "--targets", default=None, help="compute capabilities, e.g. 80,90 (default: all supported)"
    )
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--masks", default="causal,full", help="causal and/or full (not causal)")
    parser.add_argument("--layouts", default="varlen,dense", help="varlen and/or dense")
    parser.add_argument("--groups", default="1,4", help="GQA groups: query heads per K/V head")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--summary-only", action="store_true", help="omit the per-case table")
    parser.add_argument("--json", type=Path, default=None, help="also write every case here")
    args = parser.parse_args(argv)

    def listed(text: str, allowed: Iterable[Any], convert: Any, what: str) -> list[Any]:
        values = [convert(x) for x in text.split(",") if x]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"--{what}: {bad or text!r} not among {list(allowed)}")
        return values

    try:
        supported = supported_targets()
    except ImportError:
        print("triton is not installed: the compile check needs it (pip install triton)", file=sys.stderr)
        return 2
    cases = all_cases(
        listed(args.kernels, KERNELS, str, "kernels"),
        listed(args.targets or ",".join(map(str, supported)), supported, int, "targets"),
        listed(args.head_dims, HEAD_DIMS, int, "head-dims"),
        listed(args.dtypes, DTYPES, str, "dtypes"),
        [m == "causal" for m in listed(args.masks, ("causal", "full"), str, "masks")],
        [x == "varlen" for x in listed(args.layouts, ("varlen", "dense"), str, "layouts")],
        listed(args.groups, (1, 2, 4, 8), int, "groups"),
    )
    started = time.perf_counter()
    results = run(cases, jobs=max(1, args.jobs), progress=not args.quiet)
    wall = time.perf_counter() - started
    print(
        f"Attention kernels compiled ahead of time: {len(results)} cases in {wall:.0f} s, {_environment()}."
    )
    print("Stack budgets (B per thread): " + ", ".join(f"{k} {v}" for k, v in SPILL_BUDGET.items()) + ".\n")
    print(summary_table(results))
    if not args.summary_only:
        print()
        print(full_table(results))
    if args.json is not None:
        payload = [dict(dataclasses.asdict(r), problems=r.problems) for r in results]
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(args.json)
    failing = [r for r in results if r.problems]
    for r in failing:
        print(f"FAIL {r.case.name}: {'; '.join(r.problems)}", file=sys.stderr)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
