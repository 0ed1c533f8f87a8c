"""The tokenizer's encode side: parity with tiktoken and Hugging Face tokenizers, formats, errors."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tokenizers
from conftest import PATTERNS, shared_data
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ferrolm
from ferrolm import Tokenizer

# Text that stresses pre-tokenization: every Unicode category, plus runs of the characters that the
# patterns treat specially (whitespace kinds, apostrophe contractions, digits, newlines).
TRICKY = [
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    "\u00a0",
    "\u3000",
    "\u2028",
    "\u0085",
    "\x0b",
    "'s",
    "'S",
    "'ll",
    "'ve",
    "'re",
    "'D",
    "'ſ",
    "'",
    "0",
    "12",
    "345",
    "²",
    "٣",
    "Ⅻ",
    "a",
    "Z",
    "é",
    "ǅ",
    "ʰ",
    "中",
    "\u0301",
    "👋",
    "🌍",
    "🇫🇷",
    "/",
    "!",
    "...",
    "the",
    "The",
    " world",
    "\ufeff",
    "ß",
    "İ",
]
any_text = st.one_of(
    st.text(max_size=120),
    st.lists(st.sampled_from(TRICKY) | st.text(max_size=3), max_size=40).map("".join),
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# GPT-2 from its original release files (../shared/data/gpt2)


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    return shared_data("gpt2")


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def gpt2_tiktoken(gpt2_dir):  # type: ignore[no-untyped-def]
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json")
    )
    return tiktoken.Encoding(
        "gpt2-local",
        pat_str=ferrolm.tokenizer.GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


@pytest.fixture(scope="module")
def gpt2_hf(gpt2_dir):  # type: ignore[no-untyped-def]
    from tokenizers import decoders, models, pre_tokenizers

    hf = tokenizers.Tokenizer(
        models.BPE.from_file(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe"))
    )
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


KNOWN_GPT2 = {
    "hello world": [31373, 995],
    " ": [220],
    "\t": [197],
    "This is some text": [1212, 318, 617, 2420],
    "indivisible": [521, 452, 12843],
    "hello 👋 world 🌍": [31373, 50169, 233, 995, 12520, 234, 235],
    "0": [15],
    "00": [405],
    "000": [830],
    "0000": [2388],
    "00000": [20483],
    "000000": [10535],
}


@pytest.mark.parametrize("text", list(KNOWN_GPT2))
def test_gpt2_known_encodings(gpt2, text):
    assert gpt2.encode(text) == KNOWN_GPT2[text]
    assert gpt2.decode(KNOWN_GPT2[text]) == text


def test_gpt2_special_token(gpt2):
    assert gpt2.encode("hello <|endoftext|>", allowed_special="all") == [31373, 220, 50256]
    assert gpt2.vocab_size == 50257
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.eot_token == 50256


@PROPERTY
@given(any_text)
@example("a" * 1000)
@example("hello   world  \n\n  ")
def test_gpt2_matches_tiktoken_and_hf(gpt2, gpt2_tiktoken, gpt2_hf, text):
    ours = gpt2.encode_ordinary(text)
    assert ours == gpt2_tiktoken.encode_ordinary(text)
    assert ours == gpt2_hf.encode(text, add_special_tokens=False).ids
    assert gpt2.decode(ours) == text


def test_gpt2_file_spellings_agree(gpt2_dir, tmp_path, gpt2):
    """encoder.json + vocab.bpe, vocab.json + merges.txt and single files all load the same."""
    (tmp_path / "vocab.json").write_bytes((gpt2_dir / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((gpt2_dir / "vocab.bpe").read_bytes())
    text = "GPT-2's files: vocab.json + merges.txt, 12345 ✓"
    for path in [tmp_path, tmp_path / "vocab.json", tmp_path / "merges.txt", gpt2_dir / "encoder.json"]:
        assert Tokenizer.from_pretrained(path).encode(text) == gpt2.encode(text)


def test_gpt2_exports_load_in_tiktoken_and_hf(gpt2, gpt2_tiktoken, tmp_path):
    gpt2.save(tmp_path)
    gpt2.save_tiktoken(tmp_path / "gpt2.tiktoken")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "gpt2.tiktoken"))
    assert ranks == gpt2_tiktoken._mergeable_ranks
    reloaded = Tokenizer.from_pretrained(tmp_path / "gpt2.tiktoken")  # name says gpt2: pattern known
    text = "Round trips through every format: don't   stop 1234567 🌍\n\n"
    assert hf.encode(text, add_special_tokens=False).ids == gpt2.encode(text)
    assert reloaded.encode(text) == gpt2.encode(text)
    assert reloaded.special_tokens == {"<|endoftext|>": 50256}
    assert hf.token_to_id("<|endoftext|>") == 50256


def test_trained_tokenizer_json_keeps_special_ids_in_hf(tmp_path):
    corpus = ["special tokens come first in a trained vocabulary", "and keep their ids"] * 20
    ours = Tokenizer.train(
        iter(corpus), 300, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False
    )
    ours.save(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.get_vocab_size() == ours.vocab_size
    for name, token_id in ours.special_tokens.items():
        assert hf.token_to_id(name) == token_id
        assert hf.decode([token_id], skip_special_tokens=False) == name


# ---------------------------------------------------------------------------------------------
# Vocabularies trained on the spot (self-contained), one per built-in pattern


@pytest.fixture(scope="module")
def trained(hf_tokenizers):  # type: ignore[no-untyped-def]
    """pattern -> (ferrolm loaded from tokenizer.json, HF, ferrolm rank-based, tiktoken rank-based)."""
    out = {}
    for pattern, (hf, path) in hf_tokenizers.items():
        ours = Tokenizer.from_pretrained(path)
        vocab = json.loads(path.read_text())["model"]["vocab"]
        specials = ours.special_tokens
        ranks = {ours.decode_single_token_bytes(i): i for i in vocab.values() if i not in specials.values()}
        ours_ranked = Tokenizer.from_ranks(ranks, pattern=pattern, special_tokens=specials)
        tk = tiktoken.Encoding(
            f"test-{pattern}", pat_str=ours.pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        out[pattern] = (ours, hf, ours_ranked, tk)
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
def test_loaded_pattern_uses_fast_scanner_name(trained, pattern):
    ours = trained[pattern][0]
    assert ours.pattern == getattr(ferrolm.tokenizer, f"{pattern.upper()}_PATTERN")


@pytest.mark.parametrize("pattern", PATTERNS)
@PROPERTY
@given(text=any_text)
def test_matches_hf_tokenizers(trained, pattern, text):
    ours, hf, _, _ = trained[pattern]
    ids = ours.encode_ordinary(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    assert ours.decode(ids) == text


@pytest.mark.parametrize("pattern", PATTERNS)
@PROPERTY
@given(text=any_text)
def test_matches_tiktoken(trained, pattern, text):
    _, _, ours, tk = trained[pattern]
    ids = ours.encode_ordinary(text)
    assert ids == tk.encode_ordinary(text)
    assert ours.decode(ids) == text


@pytest.mark.parametrize("pattern", PATTERNS)
@PROPERTY
@given(text=st.text(max_size=300))
def test_decode_inverts_encode(trained, pattern, text):
    ours = trained[pattern][0]
    assert ours.decode(ours.encode(text, disallowed_special=())) == text
    assert ours.decode_bytes(ours.encode_ordinary(text)) == text.encode("utf-8")


@pytest.mark.parametrize(
    "text",
    ["a" * 100_000, "ab" * 50_000, " " * 100_000, "\n" * 50_000, "0" * 99_999, "👋" * 20_000, "aab" * 33_333],
)
def test_long_pieces_match_tiktoken(trained, text):
    """Long single pieces take the O(n log n) path; the leftmost-lowest tie rule must hold there too."""
    _, _, ours, tk = trained["cl100k"]
    assert ours.encode_ordinary(text) == tk.encode_ordinary(text)


def test_special_token_semantics_match_tiktoken(trained):
    _, _, ours, tk = trained["cl100k"]
    text = "a<|endoftext|>b<|fim|>c"
    for kwargs in [
        {"allowed_special": "all"},
        {"allowed_special": {"<|fim|>"}, "disallowed_special": ()},
        {"allowed_special": {"<|endoftext|>"}, "disallowed_special": ()},
        {"disallowed_special": ()},
    ]:
        assert ours.encode(text, **kwargs) == tk.encode(text, **kwargs), kwargs
    assert ours.encode_ordinary(text) == tk.encode_ordinary(text)
    with pytest.raises(ferrolm.DisallowedSpecialTokenError, match=re.escape("<|fim|>")):
        ours.encode(text, allowed_special={"<|endoftext|>"})
    with pytest.raises(ValueError, match="not a special token"):
        ours.encode("x", allowed_special={"<|nope|>"})


def test_thousands_of_special_tokens(trained):
    ours, *_ = trained["o200k"]
    data = json.loads(ours.to_json())
    base = ours.vocab_size
    data["added_tokens"] += [
        {"id": base + i, "content": f"<|extra_{i}|>", "special": True} for i in range(5000)
    ]
    many = Tokenizer.from_json(json.dumps(data))
    text = "x <|extra_4999|> y <|extra_7|><|endoftext|>"
    ids = many.encode(text, allowed_special="all")
    assert base + 4999 in ids and base + 7 in ids
    assert many.decode(ids) == text
    assert many.encode(text, allowed_special={"<|extra_7|>"}, disallowed_special=()) == (
        [*many.encode_ordinary("x <|extra_4999|> y "), base + 7, *many.encode_ordinary("<|endoftext|>")]
    )


# ---------------------------------------------------------------------------------------------
# Batches, numpy, threads, fork


def test_batch_forms_agree(trained):
    ours = trained["cl100k"][0]
    texts = ["hello world", "", "中文 and émojis 👋", "x" * 5000, "<|endoftext|> end"] * 20
    single = [ours.encode(t, allowed_special="all") for t in texts]
    assert ours.encode_batch(texts, allowed_special="all") == single
    assert ours.encode_batch(texts, allowed_special="all", num_threads=1) == single
    tokens, offsets = ours.encode_batch_numpy(texts, allowed_special="all")
    assert tokens.dtype.name == "uint32" and offsets.dtype.name == "int64"
    assert len(offsets) == len(texts) + 1 and offsets[0] == 0 and offsets[-1] == len(tokens)
    for i, ids in enumerate(single):
        assert tokens[offsets[i] : offsets[i + 1]].tolist() == ids
    assert ours.encode_ordinary_batch(texts[:3]) == [ours.encode_ordinary(t) for t in texts[:3]]
    assert ours.encode_to_numpy("hello").tolist() == ours.encode("hello")
    with pytest.raises(ferrolm.DisallowedSpecialTokenError):
        ours.encode_batch(texts)


def test_thread_count_is_settable_and_irrelevant_to_results(trained):
    ours = trained["o200k"][0]
    texts = [f"document {i}: " + "some words and numbers 12345 " * (i % 50) for i in range(300)]
    before = ferrolm.get_num_threads()
    try:
        ferrolm.set_num_threads(1)
        assert ferrolm.get_num_threads() == 1
        one = ours.encode_batch(texts)
        ferrolm.set_num_threads(2)
        assert ours.encode_batch(texts) == one
    finally:
        ferrolm.set_num_threads(before)


def _encode_in_child(tokenizer: Tokenizer, queue) -> None:  # type: ignore[no-untyped-def]
    queue.put(tokenizer.encode_batch(["forked worker", "still works"] * 100))


def test_fork_after_parallel_use_does_not_hang(trained):
    ours = trained["gpt2"][0]
    expected = ours.encode_batch(["forked worker", "still works"] * 100)  # the pool now has threads
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_encode_in_child, args=(ours, queue))
    child.start()
    child.join(timeout=60)
    assert not child.is_alive(), "the forked child hung"
    assert child.exitcode == 0
    assert queue.get(timeout=5) == expected


def test_pickle_round_trip(trained):
    ours = trained["o200k"][0]
    clone = pickle.loads(pickle.dumps(ours))
    assert clone.encode("pickled 👋 tokenizer") == ours.encode("pickled 👋 tokenizer")


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("pattern", PATTERNS)
def test_saved_tokenizer_json_loads_in_hf_and_encodes_identically(trained, pattern, tmp_path):
    ours = trained[pattern][2]  # rank-based: the merges are derived on save
    ours.save(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_pretrained(tmp_path)
    for text in [
        "plain English text, with punctuation!",
        "中文 ǅ ʰ 👋🌍 \u00a0 x\r\n\r\n  ",
        "don't WE'LL 12345",
    ]:
        assert hf.encode(text, add_special_tokens=False).ids == ours.encode(text)
        assert again.encode(text) == ours.encode(text)
    # Special tokens keep their ids in HF (it renumbers added tokens missing from model.vocab).
    assert ours.special_tokens
    for name, token_id in ours.special_tokens.items():
        assert hf.token_to_id(name) == token_id
        text = f"before{name}after"
        assert hf.encode(text, add_special_tokens=False).ids == ours.encode(text, allowed_special="all")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_tiktoken_file_round_trip(trained, pattern, tmp_path):
    ours, _, ranked, tk = trained[pattern]
    path = tmp_path / "vocab.tiktoken"
    ours.save_tiktoken(path)
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == tk._mergeable_ranks
    reloaded = Tokenizer.from_pretrained(path, pattern=pattern, special_tokens=ours.special_tokens)
    text = "tiktoken files carry ranks only"
    assert reloaded.encode(text) == ranked.encode(text)
    assert reloaded.special_tokens == ours.special_tokens


def test_token_lookup(trained):
    ours = trained["gpt2"][0]
    the = ours.token_to_id("Ġthe")
    assert ours.decode_single_token_bytes(the) == b" the"
    assert ours.id_to_token(the) == "Ġthe"
    assert ours.token_to_id("<|endoftext|>") == 0
    assert ours.id_to_token(0) == "<|endoftext|>"
    with pytest.raises(KeyError):
        ours.token_to_id("definitely not a token ✗")
    with pytest.raises(KeyError):
        ours.id_to_token(10**9)


# ---------------------------------------------------------------------------------------------
# Bad input: each a clear exception naming what is wrong


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ferrolm.FormatError, match="no tokenizer found"):
        Tokenizer.from_pretrained(tmp_path)


def test_garbled_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{ not json")
    with pytest.raises(ferrolm.FormatError, match=r"tokenizer\.json.*not valid JSON"):
        Tokenizer.from_pretrained(path)


def test_unsupported_model_type(tmp_path, hf_tokenizers):
    data = json.loads(hf_tokenizers["gpt2"][1].read_text())
    data["model"]["type"] = "WordPiece"
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ferrolm.FormatError, match=r"model\.type.*WordPiece"):
        Tokenizer.from_pretrained(path)


def test_merge_with_unknown_token(tmp_path, hf_tokenizers):
    vocab = json.loads(hf_tokenizers["gpt2"][1].read_text())["model"]["vocab"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nab zzzzzz\n")
    with pytest.raises(ferrolm.FormatError, match=r"merges\.txt:3: .*zzzzzz.*not in the vocabulary"):
        Tokenizer.from_pretrained(tmp_path)


def test_tiktoken_file_errors(tmp_path):
    path = tmp_path / "x.tiktoken"
    path.write_text("YQ== 0\nYg== 0\n")
    with pytest.raises(ferrolm.FormatError, match=r"x\.tiktoken:2.*duplicate rank 0"):
        Tokenizer.from_pretrained(path, pattern="gpt2")
    path.write_text("YQ== 0\n!!!! 1\n")
    with pytest.raises(ferrolm.FormatError, match=r"x\.tiktoken:2.*base64"):
        Tokenizer.from_pretrained(path, pattern="gpt2")
    path.write_text("YQ== 0\n")
    with pytest.raises(ferrolm.FormatError, match="pattern"):
        Tokenizer.from_pretrained(path)


def test_incomplete_byte_alphabet(tmp_path):
    path = tmp_path / "small.tiktoken"
    path.write_text("YQ== 0\nYg== 1\n")
    with pytest.raises(ferrolm.FerrolmError, match="single-byte token"):
        Tokenizer.from_pretrained(path, pattern="gpt2")


def test_invalid_regex(trained):
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(
        ferrolm.FerrolmError, match=r"invalid pre-tokenizer pattern \"\(unclosed\": .*parenthesis"
    ):
        Tokenizer.from_ranks(ranks, pattern="(unclosed")
    custom = Tokenizer.from_ranks(ranks, pattern=r"\w+|\s+|[^\w\s]+")
    assert custom.decode(custom.encode("custom regex works")) == "custom regex works"


def test_decode_out_of_range(trained):
    ours = trained["gpt2"][0]
    with pytest.raises(ferrolm.FerrolmError, match=r"token id 999999 at position 1"):
        ours.decode([5, 999999])
    with pytest.raises(ferrolm.FerrolmError, match=r"token id -1"):
        ours.decode([-1])


def test_non_byte_level_vocabulary(tmp_path, hf_tokenizers):
    data = json.loads(hf_tokenizers["gpt2"][1].read_text())
    data["model"]["vocab"]["▁the"] = 99999
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ferrolm.FormatError, match="not a byte-level BPE character"):
        Tokenizer.from_pretrained(path)


def test_errors_are_value_errors():
    assert issubclass(ferrolm.FormatError, ferrolm.FerrolmError)
    assert issubclass(ferrolm.FerrolmError, ValueError)
    assert issubclass(ferrolm.DisallowedSpecialTokenError, ValueError)


def test_import_does_not_import_torch():
    code = "import sys, ferrolm; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Fast paths: the word cache, zero-copy str arguments, short texts without a GIL release, and the
# flat batch buffer must all give exactly the ids of the plain path (tiktoken's).

texts_with_surrogates = st.lists(
    st.text(alphabet=st.characters(blacklist_categories=()), max_size=1500)
    | st.text(alphabet="ab \n\ud800\udfff", max_size=40),
    max_size=12,
)


@PROPERTY
@given(texts=texts_with_surrogates)
def test_every_encode_path_gives_the_same_ids(trained, texts):
    _, _, ours, tk = trained["cl100k"]
    expected = [tk.encode_ordinary(t) for t in texts]
    assert [ours.encode_ordinary(t) for t in texts] == expected
    assert [ours.encode(t, disallowed_special=()) for t in texts] == expected
    assert [ours.encode_to_numpy(t, disallowed_special=()).tolist() for t in texts] == expected
    for threads in (1, 2):
        assert ours.encode_ordinary_batch(texts, num_threads=threads) == expected
        assert ours.encode_batch(tuple(texts), disallowed_special=(), num_threads=threads) == expected
        tokens, offsets = ours.encode_batch_numpy(iter(texts), disallowed_special=(), num_threads=threads)
        assert offsets.tolist() == [0, *itertools.accumulate(len(e) for e in expected)]
        assert tokens.tolist() == [i for e in expected for i in e]


def test_word_caches_of_two_tokenizers_on_one_thread_never_mix(trained, training_corpus):
    """Both vocabularies see the same words in turn, many times: each keeps its own ids."""
    pairs = [(trained[p][2], trained[p][3]) for p in PATTERNS]
    words = " ".join(training_corpus[:400]).split()[:4000]
    for _ in range(3):
        for ours, tk in pairs:
            assert [ours.encode_ordinary(" " + w) for w in words] == [
                tk.encode_ordinary(" " + w) for w in words
            ]


def test_special_arguments_are_resolved_the_same_when_cached(trained):
    ours = trained["cl100k"][0]
    text = "a <|endoftext|> b <|fim|>"
    for _ in range(2):  # the second round is served from the cache of resolved arguments
        with pytest.raises(ferrolm.DisallowedSpecialTokenError):
            ours.encode(text)
        assert ours.encode(text, allowed_special="all")[-1] == ours.special_tokens["<|fim|>"]
        assert (
            ours.encode(text, allowed_special={"<|fim|>"}, disallowed_special=()).count(
                ours.special_tokens["<|fim|>"]
            )
            == 1
        )
        with pytest.raises(ferrolm.FerrolmError, match="not a special token"):
            ours.encode(text, allowed_special=frozenset({"<|nope|>"}))
