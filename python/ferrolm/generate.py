"""Text generation with a KV cache: greedy (temperature 0), temperature, top-k and top-p sampling.

The prompt runs through the model once (the "prefill", filling the cache); each new token then costs one
position's forward pass against the cached keys and values.

>>> model, tok = load_for_generation("runs/tiny")                           # doctest: +SKIP
>>> for token in generate_tokens(model, tok.encode("def "), 20, temperature=0):  # doctest: +SKIP
...     print(tok.decode([token]), end="")
"""

from __future__ import annotations

import codecs
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ferrolm._core import FerrolmError
from ferrolm.model import GPT, KVCache

__all__ = ["generate", "generate_tokens", "load_for_generation", "sample_next"]


def load_for_generation(path: str | os.PathLike[str], device: str = "cpu") -> tuple[GPT, Any]:
    """(model in eval mode, ferrolm Tokenizer) from a ``ferrolm pretrain`` run directory or a Hugging
    Face directory (``ferrolm export`` output, or GPT-2 / Llama files)."""
    from ferrolm import Tokenizer
    from ferrolm.checkpoint import check_vocab, load_pretrained

    model = load_pretrained(path, device)
    if not model.config.causal:
        raise FerrolmError(f"{path}: a masked-LM encoder cannot generate text")
    tokenizer = Tokenizer.from_pretrained(path)
    check_vocab(tokenizer.vocab_size, model.config.vocab_size, path, f"in {path}")
    return model, tokenizer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1). ``temperature == 0`` is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (B, V)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # (B, V)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate_tokens(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids after ``prompt``, stopping after ``eos_id``."""
    if not prompt:
        raise FerrolmError("the prompt is empty (give at least one token)")
    if temperature < 0:
        raise FerrolmError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    context = model.config.block_size
    if len(prompt) >= context:
        prompt = prompt[-(context - 1) :]  # keep the end: the model sees at most `context` positions
    max_new_tokens = min(max_new_tokens, context - len(prompt))
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, dtype)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T): prefill the whole prompt
    for _ in range(max_new_tokens):
        logits, _ = model(idx, cache=cache, last_only=True)  # (1, 1, V)
        idx = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (1, 1)
        token = int(idx)
        yield token
        if token == eos_id:
            return


def generate(model: GPT, prompt: list[int], max_new_tokens: int, **options: Any) -> list[int]:
    """The prompt followed by the generated tokens (see ``generate_tokens`` for the options)."""
    return list(prompt) + list(generate_tokens(model, prompt, max_new_tokens, **options))


def stream_to(out: Any, tokenizer: Any, tokens: Iterator[int]) -> None:
    """Write tokens' text to ``out`` as they come; a character split over tokens waits for its end."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        out.write(decoder.decode(tokenizer.decode_single_token_bytes(token)))
        out.flush()
    out.write(decoder.decode(b"", final=True))
    out.flush()


def main_generate(
    path: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    device: str = "cpu",
) -> None:
    """What ``ferrolm generate`` does: prompt and continuation to stdout, streamed."""
    model, tok = load_for_generation(path, device)
    ids = (
        tok.encode(prompt, allowed_special="all")
        if prompt
        else ([tok.eot_token] if tok.eot_token is not None else [])
    )
    sys.stdout.write(prompt)
    stream_to(
        sys.stdout,
        tok,
        generate_tokens(
            model,
            ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_id=tok.eot_token,
        ),
    )
    sys.stdout.write("\n")
