"""Training a byte-level BPE vocabulary (``Tokenizer.train`` and ``ferrolm tokenizer train``).

By default the result is identical — every merge, every id — to Hugging Face tokenizers'
``BpeTrainer`` with a ``ByteLevel`` pre-tokenizer and the byte-level initial alphabet, trained on
the same input with the same pattern (``Split(pattern, "isolated")`` + ``ByteLevel(use_regex=False)``),
so switching changes no token. The rules:

- Input. Files are read by the Rust core, as bytes: a plain text file gives one sequence per line,
  newline included (what ``tokenizers``' ``train(files)`` does); a JSON-lines file (``.jsonl``,
  ``.ndjson``; either optionally ``.zst`` or ``.gz`` compressed) gives one sequence per line, the string in
  ``text_field`` (what ``train_from_iterator(row[text_field] for row in rows)`` does). An iterator
  gives one sequence per string (``train_from_iterator``).
- Invalid UTF-8 in a file is replaced by U+FFFD (``errors="replace"``, with a warning naming the
  file, the number of lines and the first one) or refused (``errors="strict"``). Hugging Face
  refuses such files, so on valid UTF-8 the two agree.
- Each sequence is split by the pattern (text between matches is a chunk too); special tokens in
  the text are ordinary text while training. Identical chunks are counted (64-bit counts; Hugging
  Face's 32-bit pair counts wrap on corpora past ~2 billion occurrences, ours do not).
- Ids: special tokens first, then the 256 byte tokens in the code-point order of the GPT-2
  byte-to-unicode characters, then merged tokens in creation order.
- Merging: the most frequent adjacent pair (overlapping windows: ``aaa`` holds ``aa`` twice) is
  merged everywhere, left to right; ties go to the smallest ``(left id, right id)``
  (``tie_break="hf"``) or to the smallest pair when bytes are numbered by value and merged tokens
  by creation, as minbpe / rustbpe do (``tie_break="bytes"``; the ids written are laid out the
  same way either way). A merge that makes a special token's text reuses its id. Training stops at
  ``vocab_size`` ids, when no pair is left, or when the best pair occurs fewer than
  ``min_frequency`` times (Hugging Face's definition; 0 and 1 mean no limit).
- The result does not depend on the number of threads.

>>> from ferrolm import Tokenizer
>>> tok = Tokenizer.train(["corpus/"], 32768, pattern="cl100k")     # doctest: +SKIP
>>> tok.save("tokenizer.json")                                      # doctest: +SKIP
>>> texts = (row["text"] for row in dataset)                         # doctest: +SKIP
>>> tok = Tokenizer.train(texts, 8192, show_progress=False)         # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from ferrolm import _inputs
from ferrolm._core import CoreBpeTrainer, FerrolmError
from ferrolm.tokenizer import _safe_text

if TYPE_CHECKING:
    from ferrolm.tokenizer import Tokenizer

__all__ = ["INPUT_SUFFIXES", "expand_inputs", "train_tokenizer"]

#: The files a directory contributes (any file named explicitly is read, whatever its name).
INPUT_BASES = (".txt", ".text", ".jsonl", ".ndjson")  # the Rust corpus reader's formats (no Parquet)
INPUT_SUFFIXES = tuple(base + compression for base in INPUT_BASES for compression in _inputs.COMPRESSIONS)

#: Texts are handed to Rust in batches of about this many characters.
_BATCH_CHARS = 8 << 20

PathLike = str | os.PathLike[str]


def train_tokenizer(
    inputs: PathLike | Sequence[PathLike] | Iterable[str],
    vocab_size: int,
    *,
    pattern: str = "cl100k",
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 0,
    text_field: str = "text",
    tie_break: Literal["hf", "bytes"] = "hf",
    show_progress: bool = True,
    num_threads: int | None = None,
    errors: Literal["replace", "strict"] = "replace",
) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    ``inputs`` is either paths — one path, or a list/tuple of files, directories (searched
    recursively for ``INPUT_SUFFIXES`` files, hidden ones skipped) and glob patterns (``**``
    allowed) — or any other iterable of strings (a generator, a dataset column...), each string one
    sequence; an item may also be a list of strings (a batch). A list of strings is always paths:
    to train on in-memory texts pass ``iter(texts)``.

    ``vocab_size`` counts every id: special tokens, the 256 byte tokens and the merged tokens.
    ``pattern`` is ``"gpt2"``, ``"cl100k"``, ``"o200k"`` or a regex. ``show_progress`` draws a progress
    line on stderr (bytes and chunks read, merges done, ETA). ``num_threads`` defaults to
    ``ferrolm.get_num_threads()``; the result is the same for any value. Ctrl-C stops training
    within a fraction of a second with ``KeyboardInterrupt``; nothing is written.

    >>> tok = train_tokenizer(iter(["low lower lowest"] * 10), 256 + 1 + 5, show_progress=False)
    >>> tok.vocab_size
    262
    >>> tok.decode(tok.encode("lowest"))
    'lowest'
    """
    from ferrolm.tokenizer import Tokenizer

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise FerrolmError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise FerrolmError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")
    if isinstance(special_tokens, str):
        raise FerrolmError("special_tokens must be a list of strings, not one string")
    specials = list(special_tokens)
    for token in specials:
        if not isinstance(token, str):
            raise FerrolmError(f"special token {token!r} is not a string")
    if tie_break not in ("hf", "bytes"):
        raise FerrolmError(f'tie_break={tie_break!r} is not a tie rule: use "hf" or "bytes"')
    if errors not in ("replace", "strict"):
        raise FerrolmError(f'errors={errors!r} is not a UTF-8 policy: use "replace" or "strict"')

    trainer = CoreBpeTrainer(pattern, num_threads, bool(show_progress))
    if isinstance(inputs, (str, os.PathLike, list, tuple)):
        paths = expand_inputs(inputs)
        replaced = trainer.feed_files(paths, text_field, errors)
        for path, lines, first in replaced:
            warnings.warn(
                f"{path}: invalid UTF-8 in {lines} line(s) replaced with U+FFFD (first at {first}); "
                'pass errors="strict" to refuse such files',
                UnicodeWarning,
                stacklevel=3,
            )
    elif isinstance(inputs, Iterable):
        for batch in _batches(iter(inputs)):
            try:
                trainer.feed_texts(batch)
            except UnicodeEncodeError:
                # Lone surrogates (conversion fails before anything is counted).
                trainer.feed_texts([_safe_text(t) for t in batch])
    else:
        raise TypeError(
            f"inputs must be a path, a list of paths/globs, or an iterable of str, not {type(inputs).__name__}"
        )

    core, (merges, size, _distinct, reason) = trainer.train(vocab_size, specials, min_frequency, tie_break)
    if reason != "vocab_size":
        why = "no pair is left to merge" if reason == "no_pairs" else f"no pair occurs {min_frequency} times"
        warnings.warn(
            f"the vocabulary has {size} ids, fewer than vocab_size={vocab_size}: {why} "
            f"(after {merges} merges)",
            RuntimeWarning,
            stacklevel=3,
        )
    return Tokenizer(core)


def expand_inputs(inputs: PathLike | Sequence[PathLike]) -> list[str]:
    """Files named by paths, directories and globs, in the order given (each directory sorted);
    directories contribute ``INPUT_SUFFIXES`` files. The rule is ``ferrolm._inputs``' (the sharder's too).

    A glob or directory that yields no file, or a path that does not exist, is an error.
    """
    return _inputs.expand_inputs(inputs, INPUT_BASES, texts_hint="; to train on texts pass iter(texts)")


def _batches(items: Iterator[object]) -> Iterator[list[str]]:
    """Groups texts into batches of about ``_BATCH_CHARS`` characters, checking their type."""
    batch: list[str] = []
    size = 0
    position = 0
    for item in items:
        texts = item if isinstance(item, (list, tuple)) else (item,)
        for text in texts:
            if not isinstance(text, str):
                hint = "; to train on files pass a list of paths" if isinstance(text, os.PathLike) else ""
                raise TypeError(f"item {position} of the inputs is {type(text).__name__}, not str{hint}")
            batch.append(text)
            size += len(text)
            position += 1
            if size >= _BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch
