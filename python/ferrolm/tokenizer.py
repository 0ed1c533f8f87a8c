"""Byte-level BPE tokenizer with a Rust core.

The special-token semantics are tiktoken's: ``encode`` refuses special tokens that appear in the
text unless they are allowed (``allowed_special``) or explicitly permitted as plain text
(``disallowed_special=()``); ``encode_ordinary`` treats all text as ordinary text.

>>> tok = Tokenizer.from_pretrained("path/to/gpt2")      # doctest: +SKIP
>>> tok.encode("hello world")                           # doctest: +SKIP
[31373, 995]
"""

from __future__ import annotations

import operator
import os
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from ferrolm import _core
from ferrolm._core import CoreTokenizer, FerrolmError

if TYPE_CHECKING:
    import numpy as np

AllOr = Literal["all"] | Collection[str]

__all__ = ["Tokenizer"]


def _safe_text(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; replace them with U+FFFD as tiktoken does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


class Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 / cl100k / o200k style, or any compatible vocabulary)."""

    def __init__(self, core: CoreTokenizer) -> None:
        self._core = core
        self._special_tokens: dict[str, int] = dict(core.special_tokens)
        self._special_ids_cache: dict[tuple[AllOr, AllOr], tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        pattern: str | None = None,
        special_tokens: dict[str, int] | None = None,
    ) -> Tokenizer:
        """Load a tokenizer from a file or a directory.

        ``path`` may hold a Hugging Face ``tokenizer.json`` (byte-level BPE), ``vocab.json`` +
        ``merges.txt``, GPT-2's ``encoder.json`` + ``vocab.bpe``, or a tiktoken ``*.tiktoken`` rank
        file. ``pattern`` overrides the pre-tokenization pattern: a name ("gpt2", "cl100k",
        "cl100k_classic", "o200k" or a tiktoken encoding name such as "p50k_base"; another bare word
        is an error listing the names) or a regex, which splits like Hugging Face's
        ``Split(pattern, "isolated")`` (the text between matches is kept); a rank file needs one unless its name is a tiktoken encoding (``cl100k_base.tiktoken``).
        ``special_tokens`` (text -> id) sets a rank file's special tokens.
        """
        path = os.fspath(path)
        if special_tokens is not None:
            if not path.endswith(".tiktoken"):
                raise FerrolmError(f"{path}: special_tokens= applies to *.tiktoken rank files only")
            core = CoreTokenizer.load_tiktoken(path, pattern, list(special_tokens.items()))
        else:
            core = CoreTokenizer.load(path, pattern)
        return cls(core)

    @classmethod
    def from_ranks(
        cls,
        mergeable_ranks: dict[bytes, int],
        *,
        pattern: str,
        special_tokens: dict[str, int] | None = None,
    ) -> Tokenizer:
        """Build from tiktoken-style ranks (token bytes -> rank, the rank being the id)."""
        core = CoreTokenizer.from_parts(
            list(mergeable_ranks.items()), None, list((special_tokens or {}).items()), pattern, True
        )
        return cls(core)

    @classmethod
    def train(cls, inputs, vocab_size: int, **options) -> Tokenizer:  # type: ignore[no-untyped-def]
        """Train a byte-level BPE vocabulary; see ``ferrolm.training.train_tokenizer``."""
        from ferrolm.training import train_tokenizer

        return train_tokenizer(inputs, vocab_size, **options)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Parse the content of a Hugging Face ``tokenizer.json``."""
        return cls(CoreTokenizer.from_json(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a Hugging Face ``tokenizer.json`` (into ``path`` if it is a directory); missing
        parent directories are created."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        _make_parent(path)
        self._core.save_json(path)

    def save_tiktoken(self, path: str | os.PathLike[str]) -> None:
        """Write a tiktoken rank file (base64 token, space, rank per line) of the ordinary tokens;
        missing parent directories are created."""
        path = os.fspath(path)
        _make_parent(path)
        self._core.save_tiktoken(path)

    def to_json(self) -> str:
        """The Hugging Face ``tokenizer.json`` content as a string."""
        return self._core.to_json()

    def __getstate__(self) -> dict[str, str]:
        # Pickling (e.g. to DataLoader workers) goes through tokenizer.json text, never raw objects.
        return {"tokenizer.json": self.to_json()}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(CoreTokenizer.from_json(state["tokenizer.json"]))  # type: ignore[misc]

    # ------------------------------------------------------------------ encoding

    def _special_ids(self, allowed_special: AllOr, disallowed_special: AllOr) -> tuple[list[int], list[int]]:
        # Most calls pass the defaults (or the same arguments every time): resolve those once.
        try:
            return self._special_ids_cache[allowed_special, disallowed_special]
        except (KeyError, TypeError):  # TypeError: an unhashable argument (a set), never cached
            pass
        resolved = self._resolve_special_ids(allowed_special, disallowed_special)
        if isinstance(allowed_special, (str, frozenset)) and isinstance(disallowed_special, (str, frozenset)):
            self._special_ids_cache[allowed_special, disallowed_special] = resolved
        return resolved

    def _resolve_special_ids(
        self, allowed_special: AllOr, disallowed_special: AllOr
    ) -> tuple[list[int], list[int]]:
        specials = self._special_tokens
        if allowed_special == "all":
            allowed = set(specials)
        else:
            allowed = set(allowed_special)
        if disallowed_special == "all":
            disallowed = set(specials) - allowed
        else:
            disallowed = set(disallowed_special)

        def ids(names: set[str], argument: str) -> list[int]:
            out = []
            for name in names:
                if name not in specials:
                    raise FerrolmError(f"{argument}: {name!r} is not a special token of this tokenizer")
                out.append(specials[name])
            return out

        return ids(allowed, "allowed_special"), ids(disallowed, "disallowed_special")

    def encode(
        self,
        text: str,
        *,
        allowed_special: AllOr = frozenset(),
        disallowed_special: AllOr = "all",
    ) -> list[int]:
        """Encode ``text``; special tokens follow tiktoken's rules.

        >>> tok.encode("hello <|endoftext|>", allowed_special="all")   # doctest: +SKIP
        [31373, 220, 50256]
        """
        allowed, disallowed = self._special_ids(allowed_special, disallowed_special)
        try:
            return self._core.encode(text, allowed, disallowed)
        except UnicodeEncodeError:
            return self._core.encode(_safe_text(text), allowed, disallowed)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` ignoring special tokens (their text is encoded as ordinary text)."""
        try:
            return self._core.encode_ordinary(text)
        except UnicodeEncodeError:
            return self._core.encode_ordinary(_safe_text(text))

    def encode_to_numpy(
        self, text: str, *, allowed_special: AllOr = frozenset(), disallowed_special: AllOr = "all"
    ) -> np.ndarray:
        """Like ``encode`` but returns a ``uint32`` numpy array (no copy)."""
        allowed, disallowed = self._special_ids(allowed_special, disallowed_special)
        try:
            return self._core.encode_to_numpy(text, allowed, disallowed)
        except UnicodeEncodeError:
            return self._core.encode_to_numpy(_safe_text(text), allowed, disallowed)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: AllOr = frozenset(),
        disallowed_special: AllOr = "all",
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """Encode many texts on all cores (``num_threads`` overrides ``ferrolm.get_num_threads()``)."""
        allowed, disallowed = self._special_ids(allowed_special, disallowed_special)
        return self._batch(self._core.encode_batch, texts, allowed, disallowed, num_threads)

    def encode_ordinary_batch(
        self, texts: Sequence[str], *, num_threads: int | None = None
    ) -> list[list[int]]:
        """``encode_ordinary`` for many texts on all cores."""
        return self._batch(self._core.encode_batch, texts, [], [], num_threads)

    def encode_batch_numpy(
        self,
        texts: Sequence[str],
        *,
        allowed_special: AllOr = frozenset(),
        disallowed_special: AllOr = "all",
        num_threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode many texts into one flat ``uint32`` array and ``int64`` offsets (no copy).

        Text ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.
        """
        allowed, disallowed = self._special_ids(allowed_special, disallowed_special)
        return self._batch(self._core.encode_batch_numpy, texts, allowed, disallowed, num_threads)

    @staticmethod
    def _batch(encode, texts, allowed, disallowed, num_threads):  # type: ignore[no-untyped-def]
        # The core borrows each str's UTF-8 without a copy; only a batch holding lone surrogates
        # (no UTF-8 form) pays for the replacement pass.
        texts = texts if isinstance(texts, list) else list(texts)
        try:
            return encode(texts, allowed, disallowed, num_threads)
        except UnicodeEncodeError:
            return encode([_safe_text(t) for t in texts], allowed, disallowed, num_threads)

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The concatenated bytes of ``ids`` (a list, tuple or numpy array of ints)."""
        return self._core.decode_bytes(_as_int_list(ids))

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode to text; ``errors`` is the UTF-8 error handler for ids that split a character."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_batch(self, batch: Iterable[Iterable[int]], errors: str = "replace") -> list[str]:
        return [self.decode(ids, errors=errors) for ids in batch]

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes of one token (``KeyError`` if no token has this id)."""
        return self._core.token_bytes(_as_id(token))

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id (ordinary or special)."""
        return self._core.vocab_size

    n_vocab = vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return dict(self._special_tokens)

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self._special_tokens)

    @property
    def eot_token(self) -> int | None:
        """The id of ``<|endoftext|>`` (or of ``</s>``), if the tokenizer has one."""
        for name in ("<|endoftext|>", "</s>", "<|end_of_text|>"):
            if name in self._special_tokens:
                return self._special_tokens[name]
        return None

    @property
    def pattern(self) -> str:
        """The pre-tokenization regex."""
        return self._core.pattern

    @property
    def is_lossless(self) -> bool:
        """False when the pre-tokenizer drops text (a Hugging Face ``Split`` with ``Removed``)."""
        return self._core.is_lossless

    def token_to_id(self, token: str) -> int:
        """Id of a special token, or of an ordinary token in byte-level spelling (``"Ġthe"``)."""
        return self._core.token_to_id(token)

    def id_to_token(self, id: int) -> str:
        """Inverse of ``token_to_id``."""
        return self._core.id_to_token(_as_id(id))

    def __repr__(self) -> str:
        name = self._core.pattern_name or "custom pattern"
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={name}, special_tokens={len(self._special_tokens)})"


def _make_parent(path: str) -> None:
    """Create the directories above ``path``, as ``mkdir -p`` would (``out/tokenizer.json`` works
    on a fresh checkout); a parent that exists as a file is an error naming it."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise NotADirectoryError(f"{path}: {parent} is not a directory")
    os.makedirs(parent, exist_ok=True)


def _as_int_list(ids: Iterable[int]) -> list[int]:
    """Token ids as a list of ints, as tiktoken takes them: Python ints (``bool`` too, being an int
    subclass, as in tiktoken), numpy integers, or an integer numpy array. Nothing is coerced: a
    float, a string or ``bytes`` is a ``TypeError`` naming the element's index and type."""
    if isinstance(ids, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"token ids must be a sequence of ints, not {type(ids).__name__}")
    dtype = getattr(ids, "dtype", None)
    tolist = getattr(ids, "tolist", None)
    if dtype is not None and callable(tolist):
        if getattr(dtype, "kind", None) not in ("i", "u"):
            raise TypeError(f"token ids must be an integer array, not an array of {dtype}")
        return tolist()
    out = []
    for index, value in enumerate(ids):
        try:
            out.append(operator.index(value))
        except TypeError:
            raise TypeError(
                f"token ids[{index}] is {type(value).__name__} ({value!r:.50}), expected an int"
            ) from None
    return out


def _as_id(value: int) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"a token id must be an int, not {type(value).__name__} ({value!r:.50})") from None


# Re-exported for callers that want the raw patterns.
GPT2_PATTERN = _core.GPT2_PATTERN
CL100K_PATTERN = _core.CL100K_PATTERN
O200K_PATTERN = _core.O200K_PATTERN
