"""One-shot GPU check: the GPU-only tests, attention speed against the peers, and gpt2-small training.

    python benches/gpu_check.py --out gpu-check/              # one H100/H200: under 8 minutes
    python benches/gpu_check.py --out /tmp/check --dry-run    # CPU: tiny shapes through every code path

Needs torch (with triton, as torch's Linux CUDA wheels have it) and the ferrolm wheel; no Rust, no
network (the corpus is the Python standard library, tokenized on the spot). Sections, in order:

1. ``tests``: ``pytest -m gpu tests/`` (the tests that need a CUDA device; elsewhere they skip).
2. ``attention``: forward and forward+backward TFLOP/s of ferrolm's Triton kernels, bf16, causal,
   T = 1k..16k at 16k tokens a batch, head dims 64 and 128 (H = 2048 / D), against torch SDPA's flash
   backend on dense batches and FlexAttention with a document ``BlockMask`` (built once per shape,
   outside the timing) on document-masked ones; ratios ours / theirs. FLOPs are those the mask needs
   (benches/bench_attention.py, whose problems and peers this reuses).
3. ``train``: gpt2-small (124M body, an 8192-token vocabulary trained here) for ``--steps`` steps of
   16 x 1024 tokens, bf16, with and without ``--compile``: tokens/s and MFU (median over the steps after
   the first 10; MFU against ferrolm.train.PEAK_BF16_FLOPS).

Each section fails soft: its error is recorded and the next one runs. After every section the results so
far are written to OUT/gpu_check.json and OUT/gpu_check.md (atomically), so a crash or a timeout keeps
what was measured. ``--dry-run`` (CPU, or GPU) runs the same code with tiny shapes, the SDPA fallback in
place of the kernels and a tiny model: a check of this script, not a measurement. The exit status is 1
when a section failed or a test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # benches/ is not a package; its problems, FLOP counts and peers are reused

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "fwd vs sdpa-flash (dense causal)": ">= 1.0x",
    "fwd vs flex (documents)": ">= 1.2x",
    "fwd+bwd vs sdpa-flash (dense causal)": ">= 0.8x",
    "gpt2-small MFU (bf16)": ">= 40%",
}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Sections: each takes the parsed arguments and returns a JSON-able dict (raising is failing).


def section_tests(args: argparse.Namespace) -> dict[str, Any]:
    tests = ROOT / "tests"
    if not tests.is_dir():
        raise FileNotFoundError(f"{tests} not found: run from a checkout that has tests/")
    # The dry run collects one file only: the point is the plumbing, and the suite imports a lot.
    paths = [str(tests / "test_attention.py")] if args.dry_run else [str(tests)]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=args.tests_timeout, cwd=ROOT)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    summary = next(
        (line for line in reversed(tail) if re.search(r"\d+ (passed|failed|skipped|error)", line)), ""
    )
    counts = {
        kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)
    }
    return {
        "command": " ".join(command),
        "returncode": proc.returncode,
        "summary": summary.strip("= "),
        "counts": counts,
        "ok": proc.returncode in (0, 5),  # 5: nothing collected (no test carries the gpu mark)
        "seconds": time.perf_counter() - started,
        "tail": tail[-30:] if proc.returncode not in (0, 5) else [],
    }


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Milliseconds per call: triton's do_bench (median) on CUDA, a median of wall times on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def cpu(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    return cpu


def _ferrolm_impl(problem: bench_attention.Problem, backend: str) -> Callable[..., torch.Tensor]:
    s = problem.shape
    if not s.documents:
        return lambda q, k, v: bench_attention.flash_attention(q, k, v, s.causal, backend=backend)
    B, T = problem.q.shape[:2]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        flat = [t.view(B * T, *t.shape[2:]) for t in (q, k, v)]  # (B*T, H, D): one packed stream
        out = bench_attention.flash_attention_varlen(
            *flat, problem.cu_seqlens, problem.max_seqlen, s.causal, backend=backend
        )
        return out.view(B, T, *out.shape[1:])

    return run


def _flex_impl(problem: bench_attention.Problem, compile_flex: bool) -> Callable[..., torch.Tensor]:
    """FlexAttention with the document (and causal) mask; its BlockMask is built here, once, outside the
    timing, as a trainer builds it once per batch and shares it across layers."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc, causal = problem.doc_ids, problem.shape.causal

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = doc[b, q_idx] == doc[b, kv_idx]
        return keep & (q_idx >= kv_idx) if causal else keep

    B, T = doc.shape
    block_mask = create_block_mask(mask_mod, B, None, T, T, device=doc.device)
    attend = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    gqa = problem.q.shape[2] != problem.k.shape[2]
    return lambda q, k, v: attend(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _measure(
    build: Callable[[], Callable[..., torch.Tensor]],
    problem: bench_attention.Problem,
    layout: Callable[[torch.Tensor], torch.Tensor],
    reference: torch.Tensor | None,
    timer: Callable[[Callable[[], Any]], float],
) -> dict[str, Any]:
    """{"fwd": TFLOP/s, "fwd+bwd": TFLOP/s} of one implementation, or {"error": ...}. ``layout`` turns
    the (B, T, H, D) inputs into the implementation's own and back (it is its own inverse)."""
    try:
        fn = build()
        q, k, v, grad = (layout(t).detach() for t in (problem.q, problem.k, problem.v, problem.grad))
        out = layout(fn(q, k, v))
        if reference is not None:
            diff = (out.float() - reference.float()).abs().max().item()
            if diff > 0.05:
                return {"error": f"output differs from ferrolm's by {diff:.3f} (> 0.05)"}
        result: dict[str, Any] = {"fwd": bench_attention.tflops(problem, timer(lambda: fn(q, k, v)), False)}
    except Exception as error:  # a peer missing or failing on this torch: its cell says why
        return {"error": _short(error)}
    try:
        leaves = [t.requires_grad_() for t in (q, k, v)]

        def fwd_bwd() -> None:
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(grad)

        result["fwd+bwd"] = bench_attention.tflops(problem, timer(fwd_bwd), True)
    except Exception as error:  # the forward's figure stands
        result["error"] = "backward: " + _short(error)
    return result


def _short(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


def section_attention(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timer = _timer(device)
    # The dry run exercises the same code: SDPA in place of the kernels, SDPA's math backend in place of
    # flash (the CPU has no flash backend), eager FlexAttention (compiling it on a CPU takes minutes).
    backend = "sdpa" if args.dry_run else "triton"
    sdpa_name = "MATH" if args.dry_run else "FLASH_ATTENTION"
    shape_args = argparse.Namespace(
        tokens=args.attn_tokens,
        model_dim=args.attn_model_dim,
        gqa=1,
        mean_doc_len=args.attn_mean_doc,
        dtype="bf16",
    )
    deadline = time.perf_counter() + args.attn_budget
    rows, skipped = [], []
    for documents in (False, True):
        for head_dim in args.head_dims:
            for seqlen in args.seqlens:
                shape = bench_attention.Shape(seqlen, head_dim, True, documents)
                label = f"T={seqlen} D={head_dim} {'documents' if documents else 'dense'}"
                if time.perf_counter() > deadline:
                    skipped.append(label)
                    continue
                problem = bench_attention.make_problem(shape, shape_args, device)
                ours_out = _ferrolm_impl(problem, backend)(problem.q, problem.k, problem.v)
                same = lambda t: t  # noqa: E731
                results = {
                    "ferrolm": _measure(
                        lambda p=problem: _ferrolm_impl(p, backend), problem, same, None, timer
                    )
                }
                heads_first = bench_attention._heads_first
                if documents:
                    results["flex"] = _measure(
                        lambda p=problem: _flex_impl(p, not args.dry_run),
                        problem,
                        heads_first,
                        ours_out,
                        timer,
                    )
                else:
                    sdpa = bench_attention._sdpa(sdpa_name)
                    results["sdpa-flash"] = _measure(
                        lambda p=problem, build=sdpa: build(p), problem, heads_first, ours_out, timer
                    )
                peer = "flex" if documents else "sdpa-flash"
                row: dict[str, Any] = {"T": seqlen, "D": head_dim, "documents": documents, "results": results}
                for mode in ("fwd", "fwd+bwd"):
                    ours, theirs = results["ferrolm"].get(mode), results[peer].get(mode)
                    row[f"ratio {mode} vs {peer}"] = ours / theirs if ours and theirs else None
                rows.append(row)
                print(
                    f"  {label}: " + json.dumps({k: v for k, v in row.items() if k.startswith("ratio")}),
                    flush=True,
                )
                del problem, ours_out
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return {"device": str(device), "kernel_backend": backend, "rows": rows, "skipped_for_time": skipped}


def section_train(args: argparse.Namespace) -> dict[str, Any]:
    from ferrolm import Tokenizer
    from ferrolm.data import shard_corpus
    from ferrolm.demo import corpus_files
    from ferrolm.train import TrainConfig, pretrain, read_metrics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="ferrolm-gpu-check-", dir=args.out))
    files = [str(p) for p in corpus_files(None, args.corpus_mb)]
    tokenizer = Tokenizer.train(files, args.vocab, pattern="cl100k", show_progress=False)
    tokenizer.save(work / "tokenizer.json")
    manifest = shard_corpus(
        files, work / "shards", work / "tokenizer.json", val_fraction=0.01, show_progress=False
    )
    out: dict[str, Any] = {
        "preset": args.preset,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": manifest.tokens("train"),
        "batch": f"{args.batch_size} x {args.seq_len}",
        "runs": {},
    }
    for compile_model in (False, True):
        name = "compile" if compile_model else "eager"
        started = time.perf_counter()
        if compile_model and args.dry_run and not args.dry_run_compile:
            out["runs"][name] = {
                "error": "skipped in the dry run (inductor on a CPU takes minutes): --dry-run-compile"
            }
            out["runs"][name]["seconds"] = 0.0
            continue
        try:
            config = TrainConfig(
                data=str(work / "shards"),
                out=str(work / f"run-{name}"),
                preset=args.preset,
                max_steps=args.steps,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                warmup=min(10, args.steps),
                device=device,
                compile=compile_model,
                eval_interval=10**9,  # one evaluation, at the end
                eval_batches=1,
                checkpoint_interval=10**9,  # one checkpoint, at the end
                keep_checkpoints=1,
                progress=False,
            )
            pretrain(config)
            steps = [m for m in read_metrics(config.out) if m.get("kind") == "train"]
            steady = steps[10:] or steps  # the first steps compile, warm the allocator and autotune
            mfu = [m["mfu"] for m in steady if "mfu" in m]
            out["runs"][name] = {
                "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
                "mfu": statistics.median(mfu) if mfu else None,
                "final_loss": steps[-1]["loss"],
                "seconds": time.perf_counter() - started,
            }
        except Exception as error:  # the other run's numbers still count
            out["runs"][name] = {
                "error": f"{type(error).__name__}: {error}",
                "seconds": time.perf_counter() - started,
            }
        print(f"  {name}: {json.dumps(out['runs'][name])}", flush=True)
    return out


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "tests": section_tests,
    "attention": section_attention,
    "train": section_train,
}


# ----------------------------------------------------------------------------------------------------
# Report


def environment() -> dict[str, Any]:
    import ferrolm

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ferrolm": str(Path(ferrolm.__file__).parent),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cell(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):  # the dry run's tiny figures keep two significant digits
        return f"{value:.{digits}f}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"
    return "-" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# ferrolm GPU check{' (dry run: not a measurement)' if report['dry_run'] else ''}",
        "",
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}.",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    for name, sec in report["sections"].items():
        status = sec["status"] + (f": {sec['error']}" if sec.get("error") else "")
        lines.append(f"| {name} | {status} | {_cell(sec.get('seconds'), 0)} |")
    tests = report["sections"].get("tests", {}).get("data")
    if tests:
        lines += ["", f"GPU tests: `{tests['command']}` -> {tests['summary'] or 'no summary'}"]
    attention = report["sections"].get("attention", {}).get("data")
    if attention:
        lines += [
            "",
            "## Attention (bf16, causal; TFLOP/s the mask needs)",
            "",
            "| T | D | batch | ferrolm fwd | peer fwd | fwd ratio | ferrolm fwd+bwd | peer fwd+bwd | fwd+bwd ratio | peer |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        notes = []
        for row in attention["rows"]:
            peer = "flex" if row["documents"] else "sdpa-flash"
            ours, theirs = row["results"]["ferrolm"], row["results"][peer]
            for name, result in (("ferrolm", ours), (peer, theirs)):
                if "error" in result:
                    notes.append(f"- T={row['T']} D={row['D']} {name}: {result['error']}")
            cells = [
                _cell(r.get(mode, "error" if "error" in r else None))
                for mode in ("fwd", "fwd+bwd")
                for r in (ours, theirs)
            ]
            ratios = [_cell(row[f"ratio {mode} vs {peer}"], 2) for mode in ("fwd", "fwd+bwd")]
            lines.append(
                f"| {row['T']} | {row['D']} | {'documents' if row['documents'] else 'dense'} | {cells[0]} | "
                f"{cells[1]} | {ratios[0]} | {cells[2]} | {cells[3]} | {ratios[1]} | {peer} |"
            )
        lines += ["", *notes] if notes else []
        if attention["skipped_for_time"]:
            lines += ["", "Skipped (time budget): " + ", ".join(attention["skipped_for_time"])]
    train = report["sections"].get("train", {}).get("data")
    if train:
        lines += [
            "",
            f"## Training: {train['preset']}, vocabulary {train['vocab_size']}, batch {train['batch']}",
            "",
            "| run | tokens/s | MFU | final loss | seconds |",
            "|---|---|---|---|---|",
        ]
        for name, run in train["runs"].items():
            if "error" in run:
                lines.append(f"| {name} | error: {run['error']} | | | {_cell(run['seconds'], 0)} |")
                continue
            mfu = f"{run['mfu']:.1%}" if run["mfu"] is not None else "-"
            lines.append(
                f"| {name} | {run['tokens_per_s']:,.0f} | {mfu} | {run['final_loss']:.3f} | {run['seconds']:.0f} |"
            )
    lines += ["", "Targets (issue 15): " + "; ".join(f"{k} {v}" for k, v in TARGETS.items()) + "."]
    return "\n".join(lines) + "\n"


def run_sections(
    sections: dict[str, Callable[[argparse.Namespace], dict[str, Any]]], args: argparse.Namespace
) -> dict[str, Any]:
    """Run each section in turn, fail-soft, writing the report after each one."""
    report: dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(), "sections": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, section in sections.items():
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            entry: dict[str, Any] = {"status": "ok", "data": section(args)}
            if name == "tests" and not entry["data"]["ok"]:
                entry["status"] = "failed"
                entry["error"] = entry["data"]["summary"] or f"pytest exited {entry['data']['returncode']}"
        except Exception as error:  # one section's failure must not lose the others' numbers
            entry = {
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            }
            print(entry["traceback"], file=sys.stderr)
        entry["seconds"] = time.perf_counter() - started
        report["sections"][name] = entry
        _atomic_write(args.out / "gpu_check.json", json.dumps(report, indent=1, default=str))
        _atomic_write(args.out / "gpu_check.md", markdown(report))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json / .md")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes, SDPA, tiny model: checks the script"
    )
    parser.add_argument(
        "--dry-run-compile", action="store_true", help="dry run: also the --compile training run"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--tests-timeout", type=float, default=180.0, help="seconds for the GPU tests")
    parser.add_argument("--attn-budget", type=float, default=200.0, help="seconds for the attention timings")
    args = parser.parse_args(argv)
    names = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        parser.error(f"--sections: {unknown or args.sections!r} not among {list(SECTIONS)}")
    args.section_names = names
    # Sizes: the real check, or the dry run's tiny stand-ins (same code paths).
    if args.dry_run:
        args.seqlens, args.head_dims = [64, 128], [16]
        args.attn_tokens, args.attn_model_dim, args.attn_mean_doc = 256, 32, 24
        args.preset, args.vocab, args.corpus_mb = "tiny", 300, 0.3
        args.batch_size, args.seq_len = 2, 64
        args.steps = min(args.steps, 3)
    else:
        args.seqlens, args.head_dims = [1024, 2048, 4096, 8192, 16384], [64, 128]
        args.attn_tokens, args.attn_model_dim, args.attn_mean_doc = 16384, 2048, 1024
        args.preset, args.vocab, args.corpus_mb = "gpt2-small", 8192, 8.0
        args.batch_size, args.seq_len = 16, 1024
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "No CUDA device: the check needs a GPU (or --dry-run to check the script itself).",
            file=sys.stderr,
        )
        return 2
    report = run_sections({n: SECTIONS[n] for n in args.section_names}, args)
    print(markdown(report))
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
