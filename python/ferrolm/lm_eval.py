"""Language-model evaluation: loss, perplexity and bits per byte of a causal LM on text or shards.

The text is one token stream; a sliding window of ``max_length`` tokens (the model's context by default)
moves ``stride`` tokens at a time, and each window scores only the targets no earlier window scored, so
every token is predicted exactly once, with at least ``max_length - stride`` tokens of context once the
first window is past (Hugging Face's perplexity guide, "Perplexity of fixed-length models").
``stride == max_length`` is plain chunking (no overlap, fastest); a smaller stride gives each prediction
more context (a lower, fairer perplexity) at ``max_length / stride`` times the compute.

- Loss is the mean negative log-likelihood per predicted token (nats), perplexity ``exp(loss)``.
- Bits per byte = total nats / ln 2 / the UTF-8 bytes those predicted tokens spell (special tokens
  spell none). For a text file the stream starts with the tokenizer's ``<|endoftext|>``, so every token
  of the text is predicted and the bytes are exactly the text's UTF-8 bytes. Unlike perplexity, bits per
  byte does not depend on the tokenizer: runs with different vocabularies compare fairly.
- Shards (a ``ferrolm shard`` directory): the split's documents back to back with their boundary
  tokens, as training reads them (``--packing concat``); the shards must be tokenized with the model's
  tokenizer.

>>> evaluate_lm("runs/small", "valid.txt", stride=512)                     # doctest: +SKIP
{'loss': 3.1, 'perplexity': 22.2, 'bits_per_byte': 1.2, 'tokens': ..., 'bytes': ..., ...}
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ferrolm._core import FerrolmError
from ferrolm.model import GPT, IGNORE_INDEX

__all__ = ["evaluate_lm", "read_stream", "sliding_windows"]


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, skip) per window over a stream of ``n_tokens``: inputs ``tokens[begin:end]``, targets
    ``tokens[begin + 1 : end + 1]``, of which the first ``skip`` were scored by earlier windows. Token 0
    has no context and is never a target; every other token is the target of exactly one window."""
    if not 1 <= stride <= max_length:
        raise FerrolmError(f"evaluate: stride must be in [1, max_length={max_length}], got {stride}")
    scored, begin = 0, 0  # targets 1..scored are done
    while scored < n_tokens - 1:
        end = min(begin + max_length, n_tokens - 1)
        yield begin, end, scored - begin
        scored, begin = end, begin + stride


def read_stream(data: str | os.PathLike[str], tokenizer: Any, split: str = "val") -> Any:
    """The token stream of ``data``: a UTF-8 text file (``<|endoftext|>`` first when the tokenizer has
    one, so that the first token of the text is predicted too), or a shard directory's ``split``."""
    path = Path(data)
    if path.is_dir():
        return _shard_stream(path, tokenizer, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or shard directory")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FerrolmError(
            f"{path}: not valid UTF-8 (byte {error.start}); evaluate reads UTF-8 text"
        ) from None
    if not tokenizer.is_lossless:
        raise FerrolmError(
            f"{path}: the tokenizer drops text (a Split with Removed): bits per byte would lie"
        )
    start = [tokenizer.eot_token] if tokenizer.eot_token is not None else []
    return start + tokenizer.encode_ordinary(text)


def _shard_stream(directory: Path, tokenizer: Any, split: str) -> Any:
    import numpy as np
    from safetensors.numpy import load_file

    from ferrolm.data import Manifest

    manifest = Manifest.load(directory)
    if manifest.tokenizer().to_json() != tokenizer.to_json():
        raise FerrolmError(
            f"{directory}: the shards were tokenized with another tokenizer than the model's: shard the "
            "text with the model's tokenizer.json"
        )
    try:
        shards = manifest.shards(split)
    except KeyError:
        raise FerrolmError(
            f"{directory}: no split {split!r} (splits: {sorted(manifest.data['splits'])})"
        ) from None
    if manifest.tokens(split) == 0:
        raise FerrolmError(
            f"{directory}: split {split!r} is empty (0 tokens; shard with a val_fraction, or use split 'train')"
        )
    parts = []
    for shard in shards:
        try:
            parts.append(load_file(str(shard.path))["tokens"])
        except Exception as error:  # safetensors' own error type for malformed files
            raise FerrolmError(f"{shard.path}: not a readable shard ({error})") from None
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _byte_lengths(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64: the UTF-8 bytes each token spells; 0 for special tokens and unused ids."""
    special = set(tokenizer.special_tokens.values())
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    for i in range(vocab_size):
        if i not in special:
            try:
                lengths[i] = len(tokenizer.decode_single_token_bytes(i))
            except KeyError:  # an id no token has
                pass
    return lengths


@torch.no_grad()
def evaluate_lm(
    model_path: str | os.PathLike[str] | GPT,
    data: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    stride: int | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    split: str = "val",
    device: str = "cpu",
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of a causal LM (a ferrolm run or a Hugging Face directory,
    or a ``GPT`` with its ``tokenizer``) on ``data`` (a text file or a shard directory's ``split``).

    ``max_length``: tokens per window (default: the model's context); ``stride``: tokens the window
    moves (default ``max_length // 2``, as Hugging Face's guide; ``max_length`` for plain chunks).
    Returns loss, perplexity, bits_per_byte, tokens (predicted), bytes, windows, max_length, stride."""
    from ferrolm import Tokenizer
    from ferrolm.train import load_pretrained, resolve_device

    target = resolve_device(device)
    if isinstance(model_path, GPT):
        model, source = model_path.to(target).eval(), "model"
        if tokenizer is None:
            raise FerrolmError("evaluate: a GPT needs its tokenizer (tokenizer=...)")
    else:
        source = str(model_path)
        model = load_pretrained(model_path, device=str(target))
        tokenizer = tokenizer or Tokenizer.from_pretrained(model_path)
    if not model.config.causal:
        raise FerrolmError(f"evaluate: {source} is a masked-LM encoder; perplexity needs a causal LM")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FerrolmError(f"evaluate: batch_size must be a positive integer, got {batch_size!r}")
    context = max_length if max_length is not None else model.config.block_size
    if (
        isinstance(context, bool)
        or not isinstance(context, int)
        or not 1 <= context <= model.config.block_size
    ):
        raise FerrolmError(
            f"evaluate: max_length must be in [1, {model.config.block_size}] (the model's context), got {context!r}"
        )
    stride = stride if stride is not None else max(1, context // 2)
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise FerrolmError(f"evaluate: stride must be an integer, got {stride!r}")

    stream = torch.as_tensor(read_stream(data, tokenizer, split), dtype=torch.long)  # (N,)
    if len(stream) < 2:
        raise FerrolmError(f"{data}: {len(stream)} token(s): nothing to predict (need 2 or more)")
    if int(stream.max()) >= model.config.vocab_size:
        raise FerrolmError(f"{data}: token id {int(stream.max())} is outside the model's vocabulary")
    byte_lengths = _byte_lengths(tokenizer, model.config.vocab_size)

    windows = list(sliding_windows(len(stream), context, stride))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if target.type == "cuda" else nullcontext()
    nats, tokens, n_bytes = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        idx, targets = _batch(stream, windows[start : start + batch_size])
        with autocast:
            _, loss = model(idx.to(target), targets.to(target), reduction="sum")
        assert loss is not None
        scored = targets[targets != IGNORE_INDEX]
        nats += float(loss)
        tokens += len(scored)
        n_bytes += int(byte_lengths[scored].sum())
    loss_per_token = nats / tokens
    return {
        "loss": loss_per_token,
        "perplexity": math.exp(min(loss_per_token, 700.0)),
        "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else float("nan"),
        "tokens": tokens,
        "bytes": n_bytes,
        "windows": len(windows),
        "max_length": context,
        "stride": stride,
    }


def _batch(
    stream: torch.Tensor, windows: Sequence[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, targets), each (B, T): windows right-padded with token 0 and target -100 (a causal model's
    earlier positions never see the pads); targets scored by an earlier window are -100 too."""
    T = max(end - begin for begin, end, _ in windows)
    idx = torch.zeros(len(windows), T, dtype=torch.long)  # (B, T)
    targets = torch.full((len(windows), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (begin, end, skip) in enumerate(windows):
        n = end - begin
        idx[row, :n] = stream[begin:end]
        targets[row, skip:n] = stream[begin + 1 + skip : end + 1]
    return idx, targets
