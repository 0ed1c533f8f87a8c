"""Shared fixtures. Tests build their own data; the few that use ../shared/data say so and skip
when it is absent (a user's fresh clone has no ../shared)."""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

import pytest

# Real data: ../shared/data beside the checkout, or wherever FERROLM_TEST_DATA points (README, "Set up").
SHARED_DATA = Path(
    os.environ.get("FERROLM_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)

PATTERNS = ["gpt2", "cl100k", "o200k"]


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (real data: ../shared/data or $FERROLM_TEST_DATA; see README)")
    return path


def _stdlib_text(limit_bytes: int) -> str:
    """Python's own standard library: text every Python installation carries."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= limit_bytes:
            break
    return "".join(chunks)


def _multilingual_lines(count: int, seed: int = 0) -> list[str]:
    """Mixed-script lines so that trained vocabularies contain non-ASCII merges."""
    rng = random.Random(seed)
    words = [
        "héllo",
        "naïve",
        "straße",
        "Ελληνικά",
        "русский",
        "中文字符",
        "日本語のテキスト",
        "한국어",
        "עברית",
        "العربية",
        "हिन्दी",
        "ǅemal",
        "ʰaspirated",
        "e\u0301t\u00e9",
        "👋🌍",
        "🇫🇷",
        "1234",
        "٣٤٥",
        "²³",
        "don't",
        "WE'LL",
        "it's",
        "\u00a0nbsp",
        "tab\tbed",
        "x/y/z",
        "...",
        "$100",
    ]
    lines = []
    for _ in range(count):
        n = rng.randint(3, 12)
        lines.append(
            " ".join(rng.choice(words) for _ in range(n)) + rng.choice(["\n", "\r\n", "  \n", "\n\n"])
        )
    return lines


@pytest.fixture(scope="session")
def training_corpus() -> list[str]:
    text = _stdlib_text(600_000)
    lines = text.splitlines(keepends=True)
    return lines + _multilingual_lines(3000)


def hf_trained_tokenizer(corpus: list[str], pattern: str, vocab_size: int = 3000):  # type: ignore[no-untyped-def]
    """A Hugging Face BPE tokenizer trained on `corpus` with our named `pattern` as its Split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from ferrolm import _core

    regex = _core.hf_pattern(pattern)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|fim|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus, trainer=trainer)
    return hf


@pytest.fixture(scope="session")
def hf_tokenizers(training_corpus):  # type: ignore[no-untyped-def]
    """pattern name -> (HF tokenizer, path of its tokenizer.json)."""
    import tempfile

    out = {}
    directory = Path(tempfile.mkdtemp(prefix="ferrolm-test-"))
    for pattern in PATTERNS:
        hf = hf_trained_tokenizer(training_corpus, pattern)
        path = directory / f"{pattern}.json"
        hf.save(str(path))
        out[pattern] = (hf, path)
    return out
