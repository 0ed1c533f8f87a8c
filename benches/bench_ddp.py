"""The distributed CUDA path end to end: torchrun, NCCL, ferrolm's trainer, the gpt2-small preset.

    torchrun --standalone --nproc_per_node=1 benches/bench_ddp.py                 # DDP, world size 1
    torchrun --standalone --nproc_per_node=8 benches/bench_ddp.py --parallel fsdp --compile
    python benches/bench_ddp.py                          # the same as --nproc_per_node=1 (a group of one)

Not a model benchmark (benches/bench_pretrain.py is): this one proves that a run through
``ferrolm.train.pretrain`` with ``parallel="ddp"`` (or ``"fsdp"``) works on GPUs (process group on
NCCL, ``cuda:LOCAL_RANK``, the packed loader, bf16 autocast, gradient accumulation under ``no_sync``,
rank-0 checkpoint) and measures what a user gets from it: the job's tokens/s, each device's, and MFU
against the device's dense bf16 peak (``ferrolm.train.PEAK_BF16_FLOPS``), the median over the steps
after ``--skip`` (start-up, cuDNN/compile warm-up), read from the run's metrics.jsonl.

Data: ``--data SHARDS`` or, by default, Python's standard library (every ``.py`` file under it, about
30 MB) with a tokenizer of 50,257 tokens (GPT-2's vocabulary size, so the model is the 124M-parameter
gpt2-small) trained on it by rank 0 into ``--work`` (kept for the next run). Without CUDA it says so
and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist

CACHE = Path(__file__).resolve().parent / ".cache" / "ddp"


def build_shards(work: Path, vocab_size: int) -> Path:
    """Standard-library text -> tokenizer.json -> shards (rank 0 only; the others wait at a barrier)."""
    from ferrolm import Tokenizer
    from ferrolm.data import shard_corpus

    shards = work / "shards"
    if (shards / "manifest.json").exists():
        return shards
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))):
        (corpus / f"{i:05d}.txt").write_text(path.read_text(encoding="utf-8", errors="replace"))
    Tokenizer.train([str(corpus)], vocab_size, pattern="gpt2", show_progress=False).save(
        work / "tokenizer.json"
    )
    shard_corpus(str(corpus), shards, str(work / "tokenizer.json"), val_fraction=0.01, show_progress=False)
    return shards


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--data", default=None, help="a shard directory (default: built from the stdlib)")
    parser.add_argument(
        "--work", default=str(CACHE), help="where data and the run go (default benches/.cache/ddp)"
    )
    parser.add_argument("--vocab-size", type=int, default=50257, help="tokenizer built for the default data")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per micro-step per GPU")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-steps per optimizer step")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the median")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print(
            f"bench_ddp: CUDA is not available (torch {torch.__version__}): this benchmark measures the "
            "NCCL/DDP path on GPUs; the CPU path is covered by tests/test_distributed.py. Nothing to do."
        )
        return 0
    from ferrolm.train import TrainConfig, pretrain

    # Our own process group first: rank 0 builds the data while the others wait at a barrier; pretrain
    # then uses this group (and leaves it to us).
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    work = Path(args.work)  # every rank's: a directory all of them see
    if rank == 0 and not args.data:
        build_shards(work, args.vocab_size)
    dist.barrier()
    data = Path(args.data) if args.data else work / "shards"
    run = work / f"run-{args.parallel}-{world_size}"
    if rank == 0:
        shutil.rmtree(run, ignore_errors=True)
    dist.barrier()

    global_batch = world_size * args.batch_size * args.grad_accum
    config = TrainConfig(
        data=str(data),
        out=str(run),
        preset=args.preset,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        global_batch_size=global_batch,
        parallel=args.parallel,
        device="cuda",
        compile=args.compile,
        max_steps=args.steps,
        warmup=args.steps // 4,
        eval_interval=10 * args.steps,  # once, at the end
        eval_batches=2,
        checkpoint_interval=10 * args.steps,  # once, at the end: the gather and write path too
        progress=rank == 0,
    )
    pretrain(config)
    if rank == 0:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"][args.skip :]
        job = statistics.median(r["tokens_per_s"] for r in train)
        per_device = statistics.median(r["tokens_per_s_per_device"] for r in train)
        mfu = statistics.median(r["mfu"] for r in train) if all("mfu" in r for r in train) else None
        print(
            f"# {torch.cuda.get_device_name()} x {world_size}, torch {torch.__version__}, NCCL "
            f"{'.'.join(map(str, torch.cuda.nccl.version()))}, {args.preset}, {args.parallel}, "
            f"compile={args.compile}, {global_batch} rows x {args.seq_len} tokens per step "
            f"({args.batch_size} per micro-step x {args.grad_accum} micro-steps per GPU), median of "
            f"steps {args.skip + 1}-{args.steps}"
        )
        print("| preset | parallel | GPUs | tokens/s (job) | tokens/s per GPU | MFU | final loss |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {args.preset} | {args.parallel} | {world_size} | {job:,.0f} | {per_device:,.0f} | "
            f"{f'{mfu:.1%}' if mfu is not None else 'n/a (unknown GPU peak)'} | {train[-1]['loss']:.3f} |"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
