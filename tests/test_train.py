"""The BPE trainer: identical to Hugging Face tokenizers' BpeTrainer, equal to a slow Python
reference for both tie rules, deterministic across thread counts, and clear on bad input.

``reference_textbook`` is plain BPE: recount every pair after every merge, merge the best pair left
to right everywhere. Hugging Face's incremental bookkeeping (lazy queue entries, the merged pair's
count never decremented) always reaches the same merges: a merge can only recreate an existing
token when that token is a special token (see ``rust/tokenizer/train.rs``), so no pair ever has two
queue entries. The tests check the three against each other on real and random text.
"""

from __future__ import annotations

import _thread
import collections
import gzip
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ferrolm
from ferrolm import FerrolmError, FormatError, Tokenizer, _core

tokenizers = pytest.importorskip("tokenizers")

PATTERNS = {"gpt2": _core.GPT2_PATTERN, "cl100k": _core.CL100K_PATTERN, "o200k": _core.O200K_PATTERN}


# --------------------------------------------------------------------------------------------
# The byte-level alphabet and the references


def _byte_to_char() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_to_char()


def split_pieces(text: str, pattern: str) -> list[str]:
    """Hugging Face's ``Split(pattern, "isolated")``: the matches and the text between them."""
    pieces, covered = [], 0
    for m in regex.finditer(PATTERNS.get(pattern, pattern), text):
        if m.start() > covered:
            pieces.append(text[covered : m.start()])
        if m.group():
            pieces.append(m.group())
        covered = max(covered, m.end())
    if covered < len(text):
        pieces.append(text[covered:])
    return pieces


def chunk_counts(sequences, pattern) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for seq in sequences:
        for piece in split_pieces(seq, pattern):
            counts["".join(BYTE_TO_CHAR[b] for b in piece.encode("utf-8"))] += 1
    return counts


class _Setup:
    """Ids as HF assigns them: specials, then the alphabet in code-point order."""

    def __init__(self, specials, tie_break):
        self.ids: dict[str, int] = {}
        self.strings: list[str] = []
        for s in specials:
            if s not in self.ids:
                self.add(s)
        for c in sorted(BYTE_TO_CHAR.values()):
            if c not in self.ids:
                self.add(c)
        # tie_break="bytes": bytes ranked by value, merged tokens by creation.
        self.rank = {self.ids[BYTE_TO_CHAR[b]]: b for b in range(256)}
        self.bytes = tie_break == "bytes"

    def add(self, s: str) -> int:
        self.ids[s] = len(self.strings)
        self.strings.append(s)
        return self.ids[s]

    def new_token(self, a: int, b: int) -> int:
        s = self.strings[a] + self.strings[b]
        t = self.ids[s] if s in self.ids else self.add(s)
        self.rank.setdefault(t, len(self.rank))
        return t

    def key(self, pair):
        return (self.rank[pair[0]], self.rank[pair[1]]) if self.bytes else pair

    def result(self, merges):
        last = {p: i for i, p in enumerate(merges)}
        kept = [p for i, p in enumerate(merges) if last[p] == i]
        return dict(self.ids), [(self.strings[a], self.strings[b]) for a, b in kept]


def reference_textbook(counts, vocab_size, specials=(), min_frequency=0, tie_break="hf"):
    """Plain BPE: recount all pairs, merge the best one left to right everywhere, repeat."""
    setup = _Setup(specials, tie_break)
    words = [[setup.ids[c] for c in w] for w in counts]
    freqs = list(counts.values())
    merges = []
    while len(setup.strings) < vocab_size:
        stats: collections.Counter = collections.Counter()
        for w, f in zip(words, freqs, strict=True):
            for pair in itertools.pairwise(w):
                stats[pair] += f
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], setup.key(p)))
        if stats[best] < max(1, min_frequency):
            break
        t = setup.new_token(*best)
        merges.append(best)
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(t)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    return setup.result(merges)


# --------------------------------------------------------------------------------------------
# Training with ferrolm and with Hugging Face


def _model(tokenizer_json: str):
    root = json.loads(tokenizer_json)
    vocab = dict(root["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in root["added_tokens"]})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in root["model"]["merges"]]
    return vocab, merges


def ours(inputs, vocab_size, **options):
    options.setdefault("show_progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "fewer ids than vocab_size" on tiny corpora
        tok = Tokenizer.train(inputs, vocab_size, **options)
    return _model(tok.to_json())


def hf(inputs, vocab_size, pattern="cl100k", special_tokens=("<|endoftext|>",), min_frequency=0, files=False):
    from tokenizers import Regex, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_core.hf_pattern(pattern)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if files:
        tok.train([str(f) for f in inputs], trainer)
    else:
        tok.train_from_iterator(list(inputs), trainer)
    return _model(tok.to_str())


def stdlib_sample(limit_bytes: int) -> list[Path]:
    """Real text that every Python installation carries: standard-library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        out.append(path)
        total += path.stat().st_size
        if total >= limit_bytes:
            break
    return out


def zipf_corpus(seed: int, lines: int) -> list[str]:
    """Seeded word soup with a Zipf-like frequency spread: many ties, Unicode, digits, quotes."""
    rng = random.Random(seed)
    syllables = "th e an in er on re at ou é 中 's 1 23 ! ab a".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 5))) for _ in range(2000)]
    weights = [1 / (i + 1) for i in range(len(words))]
    out = []
    for _ in range(lines):
        n = rng.randint(1, 12)
        out.append(" ".join(rng.choices(words, weights, k=n)) + rng.choice(["\n", " \n", "", "  "]))
    return out


# --------------------------------------------------------------------------------------------
# Equal to Hugging Face


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k", "o200k"])
def test_equal_to_hf_on_real_text_files(tmp_path, pattern):
    files = stdlib_sample(400_000)
    expected = hf(files, 1500, pattern=pattern, files=True)
    assert ours([str(f) for f in files], 1500, pattern=pattern) == expected


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k", "o200k"])
def test_equal_to_hf_on_multilingual_text(training_corpus, pattern):
    # Mixed scripts, emoji, combining marks, non-Latin digits (the shared fixture of conftest.py).
    assert ours(iter(training_corpus), 3000, pattern=pattern) == hf(training_corpus, 3000, pattern=pattern)


def test_equal_to_hf_with_ties_iterator_and_files(tmp_path):
    lines = zipf_corpus(1, 3000)
    expected = hf(lines, 1200)
    assert ours(iter(lines), 1200) == expected
    # The same text as a file: one sequence per line, newline kept.
    path = tmp_path / "corpus.txt"
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")
    assert ours(str(path), 1200) == hf([path], 1200, files=True)


def test_equal_to_hf_options(tmp_path):
    lines = zipf_corpus(2, 1500)
    for kwargs in (
        {"special_tokens": ()},
        {"special_tokens": ("<s>", "</s>", "<s>")},  # duplicates ignored, as HF does
        {"special_tokens": ("<|endoftext|>", "é", "th")},  # one is a byte character, one a merge
        {"min_frequency": 7},
        {"pattern": r"\w+"},  # a custom pattern: the text between matches is a chunk too
    ):
        assert ours(iter(lines), 700, **kwargs) == hf(lines, 700, **kwargs), kwargs


texts = st.text(alphabet="ab c\n'é中1!", max_size=30)
specials_options = st.sampled_from([(), ("<|endoftext|>",), ("a",), ("<s>", "b c"), ("ab", "a")])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(texts, min_size=1, max_size=25),
    st.integers(0, 40),
    specials_options,
    st.sampled_from([0, 2]),
    st.sampled_from(["gpt2", "cl100k"]),
    st.sampled_from(["hf", "bytes"]),
)
def test_random_corpora_equal_hf_and_reference(sequences, extra, specials, min_frequency, pattern, tie_break):
    if not "".join(sequences):
        return
    vocab_size = 256 + len(set(specials)) + extra
    kwargs = {"special_tokens": specials, "min_frequency": min_frequency, "pattern": pattern}
    got = ours(iter(sequences), vocab_size, tie_break=tie_break, **kwargs)
    counts = chunk_counts(sequences, pattern)
    assert got == reference_textbook(counts, vocab_size, specials, min_frequency, tie_break)
    if tie_break == "hf":
        assert got == hf(sequences, vocab_size, **kwargs)


def test_equal_to_reference_on_larger_corpora():
    for seed in (7, 8):
        lines = zipf_corpus(seed, 1500)
        counts = chunk_counts(lines, "cl100k")
        for tie_break in ("hf", "bytes"):
            expected = reference_textbook(counts, 600, ("<|endoftext|>", "th"), 0, tie_break)
            assert (
                ours(iter(lines), 600, special_tokens=("<|endoftext|>", "th"), tie_break=tie_break)
                == expected
            )


def test_tie_rules_differ_where_they_should():
    # (" ", "z") and ("a", "z") both occur once. In Hugging Face's id order the space ("Ġ", after
    # all printable Latin-1 characters) comes after "a"; by byte value it comes first.
    sequences = [" z", "az"]
    assert ours(iter(sequences), 257, special_tokens=())[1] == [("a", "z")]
    assert ours(iter(sequences), 257, special_tokens=(), tie_break="bytes")[1] == [("Ġ", "z")]
    assert hf(sequences, 257, special_tokens=())[1] == [("a", "z")]


# --------------------------------------------------------------------------------------------
# Determinism, formats and the result


def test_same_result_for_any_thread_count(tmp_path):
    lines = zipf_corpus(3, 20000)
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    for tie_break in ("hf", "bytes"):
        one = ours(str(path), 3000, num_threads=1, tie_break=tie_break)
        two = ours(str(path), 3000, num_threads=2, tie_break=tie_break)
        many = ours(str(path), 3000, num_threads=7, tie_break=tie_break)
        assert one == two == many
        assert ours(iter(lines), 3000, num_threads=1, tie_break=tie_break) == ours(
            iter(lines), 3000, num_threads=2, tie_break=tie_break
        )


def test_jsonl_zstd_and_gzip_equal_the_same_texts(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    docs = ["first doc\nwith two lines", "second", "third é 中", *zipf_corpus(4, 300)]
    rows = "".join(json.dumps({"id": i, "text": d, "meta": {"text": 0}}) + "\n" for i, d in enumerate(docs))
    (tmp_path / "a.jsonl").write_text(rows, encoding="utf-8")
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows.encode()))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    expected = ours(iter(docs), 600)
    assert ours(str(tmp_path / "a.jsonl"), 600) == expected
    assert ours(str(tmp_path / "b.jsonl.zst"), 600) == expected
    assert ours(str(tmp_path / "d.jsonl.gz"), 600) == expected
    assert expected == hf(docs, 600)
    # Another field name.
    (tmp_path / "c.jsonl").write_text(rows.replace('"text"', '"body"'), encoding="utf-8")
    assert ours(str(tmp_path / "c.jsonl"), 600, text_field="body") == expected


def test_directories_and_globs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha beta\n")
    (tmp_path / "d" / "sub" / "b.txt").write_text("gamma beta\n")
    (tmp_path / "d" / "notes.md").write_text("ignored in a directory\n")
    (tmp_path / "d" / ".hidden.txt").write_text("ignored too\n")
    both = ours(iter(["alpha beta\n", "gamma beta\n"]), 270)
    assert ours(str(tmp_path / "d"), 270) == both
    assert ours([str(tmp_path / "d" / "**" / "*.txt")], 270) == both
    assert ours([tmp_path / "d" / "a.txt", tmp_path / "d" / "sub" / "b.txt"], 270) == both
    from ferrolm.training import expand_inputs

    assert expand_inputs(str(tmp_path / "d")) == [
        str(tmp_path / "d" / "a.txt"),
        str(tmp_path / "d" / "sub" / "b.txt"),
    ]


def test_result_saves_loads_in_hf_and_encodes_the_same(tmp_path):
    files = stdlib_sample(300_000)
    tok = Tokenizer.train([str(f) for f in files], 2000, show_progress=False)
    assert tok.vocab_size == 2000
    tok.save(tmp_path / "tokenizer.json")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    held_out = Path(sysconfig.get_paths()["stdlib"], "typing.py").read_text(encoding="utf-8")[:50_000]
    assert theirs.encode(held_out).ids == tok.encode(held_out)
    assert tok.decode(tok.encode(held_out)) == held_out
    assert tok.special_tokens == {"<|endoftext|>": 0}
    tok.save_tiktoken(tmp_path / "t.tiktoken")
    again = Tokenizer.from_pretrained(
        tmp_path / "t.tiktoken", pattern="cl100k", special_tokens=tok.special_tokens
    )
    assert again.encode(held_out) == tok.encode(held_out)


def test_iterator_items_may_be_batches_and_surrogates_are_replaced():
    lines = zipf_corpus(5, 200)
    batched = iter([lines[i : i + 7] for i in range(0, len(lines), 7)])
    assert ours(batched, 400) == ours(iter(lines), 400)
    # A lone surrogate becomes U+FFFD (as in encode) instead of failing the conversion.
    assert ours(iter(["a\ud800b a\ufffdb"]), 300) == ours(iter(["a\ufffdb a\ufffdb"]), 300)


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("some text here\n")
    with pytest.raises(FerrolmError, match="too small"):
        Tokenizer.train(str(path), 256, show_progress=False)  # 256 bytes + 1 special needs 257
    with pytest.raises(FerrolmError, match="unknown pattern name"):
        Tokenizer.train(str(path), 300, pattern="cl100", show_progress=False)
    with pytest.raises(FerrolmError, match="pattern"):
        Tokenizer.train(str(path), 300, pattern="(unclosed", show_progress=False)
    with pytest.raises(FerrolmError, match="tie_break"):
        Tokenizer.train(str(path), 300, tie_break="random", show_progress=False)  # type: ignore[arg-type]
    with pytest.raises(FerrolmError, match="vocab_size"):
        Tokenizer.train(str(path), -5, show_progress=False)
    with pytest.raises(FerrolmError, match="empty string"):
        Tokenizer.train(str(path), 300, special_tokens=[""], show_progress=False)


def test_empty_corpora(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(FerrolmError, match="empty"):
        Tokenizer.train(str(tmp_path / "empty.txt"), 300, show_progress=False)
    with pytest.raises(FerrolmError, match="empty"):
        Tokenizer.train(iter([]), 300, show_progress=False)
    with pytest.raises(FerrolmError, match="no inputs"):
        Tokenizer.train([], 300, show_progress=False)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FerrolmError, match="directory holds no"):
        Tokenizer.train(str(tmp_path / "emptydir"), 300, show_progress=False)


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        Tokenizer.train(str(tmp_path / "nope.txt"), 300, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        Tokenizer.train(str(tmp_path / "*.jsonl"), 300, show_progress=False)
    with pytest.raises(FileNotFoundError, match=r"iter\(texts\)"):
        Tokenizer.train(["hello world", "more text"], 300, show_progress=False)
    with pytest.raises(TypeError, match="not str"):
        Tokenizer.train(iter(["ok", 3]), 300, show_progress=False)
    with pytest.raises(FormatError, match="not supported"):
        (tmp_path / "a.jsonl.xz").write_bytes(b"\xfd7zXZ")
        Tokenizer.train(str(tmp_path / "a.jsonl.xz"), 300, show_progress=False)
    if os.geteuid() != 0:
        locked = tmp_path / "locked.txt"
        locked.write_text("secret\n")
        locked.chmod(0)
        with pytest.raises(PermissionError, match=r"locked\.txt"):
            Tokenizer.train(str(locked), 300, show_progress=False)


def test_malformed_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": 5}\n')
    with pytest.raises(FormatError, match=r"bad\.jsonl:3.*expected a string"):
        Tokenizer.train(str(bad), 300, show_progress=False)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(FormatError, match=r"bad\.jsonl:2"):
        Tokenizer.train(str(bad), 300, show_progress=False)
    corrupt = tmp_path / "c.jsonl.zst"
    corrupt.write_bytes(b"definitely not zstd")
    with pytest.raises(FormatError, match="decompress"):
        Tokenizer.train(str(corrupt), 300, show_progress=False)


def test_invalid_utf8_is_replaced_with_a_warning_or_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good line\ncaf\xe9 au lait\nmore good\n")
    with pytest.warns(UnicodeWarning, match=r"latin1\.txt.*1 line.*latin1\.txt:2"):
        got = ours(str(path), 300)
    assert got == ours(iter(["good line\n", "caf\ufffd au lait\n", "more good\n"]), 300)
    with pytest.raises(FormatError, match=r"latin1\.txt:2.*UTF-8"):
        Tokenizer.train(str(path), 300, errors="strict", show_progress=False)


def test_fewer_ids_than_asked_warns():
    with pytest.warns(RuntimeWarning, match="no pair is left"):
        tok = Tokenizer.train(iter(["ab ab"]), 1000, show_progress=False)
    assert tok.vocab_size < 1000


def _big_file(tmp_path: Path) -> Path:
    """About 2.6 MB; listed 1000 times it takes far longer to read than the tests wait."""
    path = tmp_path / "big.txt"
    path.write_text("\n".join(zipf_corpus(6, 5000)) * 12, encoding="utf-8")
    return path


def _sigint_default() -> None:
    # A shell that starts a job in the background (`cmd &`, as some CI runners do) leaves SIGINT
    # ignored, which children inherit; Ctrl-C tests need Python's own handler back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_training_quickly(tmp_path):
    path = _big_file(tmp_path)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            Tokenizer.train([str(path)] * 1000, 200_000, show_progress=False)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - started < 5


def test_cli_trains_and_ctrl_c_leaves_nothing(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("\n".join(zipf_corpus(10 + i, 500)), encoding="utf-8")
    out = tmp_path / "tok.json"
    cli = [sys.executable, "-m", "ferrolm", "tokenizer", "train"]
    run = subprocess.run(
        [*cli, str(corpus), "--vocab-size", "600", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    theirs = tokenizers.Tokenizer.from_file(str(out))
    assert _model(out.read_text()) == ours(str(corpus), 600)
    assert theirs.get_vocab_size() == 600
    tiktoken_out = tmp_path / "tok.tiktoken"
    run = subprocess.run(
        [
            *cli,
            str(corpus / "0.txt"),
            "--vocab-size",
            "400",
            "--out",
            str(tiktoken_out),
            "--tie-break",
            "bytes",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "merges" in run.stderr  # the progress lines
    assert len(tiktoken_out.read_text().splitlines()) == 399  # ordinary tokens only

    big = _big_file(tmp_path)
    interrupted = tmp_path / "interrupted.json"
    proc = subprocess.Popen(
        [*cli, *[str(big)] * 1000, "--vocab-size", "200000", "--out", str(interrupted)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_default,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while "ingest" not in proc.stderr.readline() and time.monotonic() < deadline:
        pass
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert not interrupted.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "corpus", "tok.json", "tok.tiktoken"]


def test_public_names():
    assert ferrolm.Tokenizer.train is not None
    from ferrolm.training import train_tokenizer

    tok = train_tokenizer(iter(["low lower lowest"] * 10), 262, show_progress=False)
    assert tok.vocab_size == 262
