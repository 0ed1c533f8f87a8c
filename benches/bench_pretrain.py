"""Training throughput of ferrolm's GPT against a nanoGPT-style loop of the same size.

One training step = forward, backward, gradient clipping and an AdamW step on a (batch, seq_len) batch
of random tokens (the loader is benchmarked on its own; this measures the model and the optimizer).
The peer is written here, in nanoGPT's shape: a causal attention module on
``F.scaled_dot_product_attention(is_causal=True)``, LayerNorm, tanh GELU, tied embeddings, the same
widths and vocabulary, the same AdamW settings. On CUDA both run under bf16 autocast and MFU is
reported against the device's dense bf16 peak (``ferrolm.train.PEAK_BF16_FLOPS``), with FLOPs per
token from ``GPT.flops_per_token`` (6N + 12 L C T, PaLM appendix B).

    python benches/bench_pretrain.py                         # tiny and small on CPU
    python benches/bench_pretrain.py --presets gpt2-small --device cuda --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferrolm.model import GPT, GPTConfig
from ferrolm.train import _peak_flops

# ----------------------------------------------------------------------------------------------------
# The peer: a nanoGPT-style GPT-2 (written for this benchmark)


class PeerAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class PeerBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = PeerAttention(n_embd, n_head)
        self.fc, self.out = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class PeerGPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(PeerBlock(config.n_embd, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# ----------------------------------------------------------------------------------------------------


def tokens_per_second(
    model: nn.Module, step_fn, batch: int, seq_len: int, vocab: int, device, steps: int
) -> float:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    idx = torch.randint(0, vocab, (batch, seq_len + 1), device=device)

    def one_step() -> None:
        with autocast:
            loss = step_fn(model, idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, kernels selection
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * seq_len * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8192, help="default 8192 (CPU-sized)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = _peak_flops(device)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, batch {args.batch_size} x {args.seq_len}, vocab {args.vocab_size}"
    )
    print("| preset | params | ferrolm tok/s | nanoGPT-style tok/s | ratio | ferrolm GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        config = GPTConfig.preset(preset, vocab_size=args.vocab_size, block_size=max(args.seq_len, 128))
        torch.manual_seed(0)
        ours = GPT(config).to(device)
        ours_tps = tokens_per_second(
            ours,
            lambda m, x, y: m(x, y)[1],
            args.batch_size,
            args.seq_len,
            args.vocab_size,
            device,
            args.steps,
        )
        peer_tps = math.nan
        if config.arch == "gpt2":
            torch.manual_seed(0)
            peer = PeerGPT(config).to(device)
            peer_tps = tokens_per_second(
                peer,
                lambda m, x, y: m(x, y),
                args.batch_size,
                args.seq_len,
                args.vocab_size,
                device,
                args.steps,
            )
        flops = ours.flops_per_token(args.seq_len) * ours_tps
        mfu = f"{flops / peak:.1%}" if peak else "n/a"
        print(
            f"| {preset} | {ours.num_params() / 1e6:.2f}M | {ours_tps:,.0f} | {peer_tps:,.0f} | "
            f"{ours_tps / peer_tps:.2f} | {flops / 1e9:.1f} | {mfu} |"
        )


if __name__ == "__main__":
    main()
