"""Issue 13, tokenizer core: bad tokenizer files and arguments are refused, no text is ever lost."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ferrolm
from ferrolm import FerrolmError, FormatError, Tokenizer

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BEHAVIOURS = ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]
SPLIT_PATTERNS = [{"String": " "}, {"Regex": "[a-z]+"}, {"String": ","}, {"Regex": r"\s+"}, {"Regex": r"\d"}]
CORPUS = [
    "hello world, this is a test",
    "the quick brown fox jumps over 12 lazy dogs.",
    "a, b, c; 123 456",
] * 5

split_text = st.one_of(
    st.text(alphabet="abcxyz ,.;0123\n\té中👋", max_size=60),
    st.text(max_size=40),
)


@functools.cache
def base_json() -> dict:
    """A small trained tokenizer (GPT-2 pattern) as tokenizer.json data."""
    tok = Tokenizer.train(iter(CORPUS), 300, pattern="gpt2", show_progress=False)
    return json.loads(tok.to_json())


def with_split(pattern: dict, behavior: str, invert: bool) -> str:
    data = json.loads(json.dumps(base_json()))
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": pattern, "behavior": behavior, "invert": invert},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    return json.dumps(data)


@functools.cache
def pair(pattern_index: int, behavior: str, invert: bool) -> tuple[Tokenizer, tokenizers.Tokenizer]:
    text = with_split(SPLIT_PATTERNS[pattern_index], behavior, invert)
    return Tokenizer.from_json(text), tokenizers.Tokenizer.from_str(text)


# ---------------------------------------------------------------------------------------------
# 1. Split behaviours: the same ids as Hugging Face, no text lost unless the file says Removed


def test_issue_example_keeps_every_byte():
    text = "hello world, this is a test"
    for index in range(2):  # {"String": " "} and [a-z]+: both dropped text before
        ours, hf = pair(index, "Isolated", False)
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text


@PROPERTY
@given(
    text=split_text,
    pattern_index=st.integers(0, len(SPLIT_PATTERNS) - 1),
    behavior=st.sampled_from(BEHAVIOURS),
    invert=st.booleans(),
)
def test_split_behaviours_equal_hf(text, pattern_index, behavior, invert):
    ours, hf = pair(pattern_index, behavior, invert)
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    if behavior != "Removed":
        assert ours.decode(ids) == text
    assert ours.is_lossless == (behavior != "Removed")


@pytest.mark.parametrize("behavior", BEHAVIOURS)
@pytest.mark.parametrize("invert", [False, True])
def test_split_options_round_trip_through_save(behavior, invert, tmp_path):
    for pattern in SPLIT_PATTERNS[:2]:
        ours = Tokenizer.from_json(with_split(pattern, behavior, invert))
        saved = json.loads(ours.to_json())
        split = saved["pre_tokenizer"]["pretokenizers"][0]
        assert (split["pattern"], split["behavior"], split["invert"]) == (pattern, behavior, invert)
        ours.save(tmp_path)
        again = Tokenizer.from_pretrained(tmp_path)
        hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        text = "hello world, this is a test 42"
        assert again.encode(text) == ours.encode(text) == hf.encode(text).ids


def test_bad_split_fields_are_format_errors():
    for bad in ["Isolate", 3, None]:
        with pytest.raises(FormatError, match="behavior"):
            Tokenizer.from_json(with_split({"String": " "}, bad, False))  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="invert"):
        Tokenizer.from_json(with_split({"String": " "}, "Isolated", "yes"))  # type: ignore[arg-type]


def test_custom_pattern_argument_keeps_all_text(tmp_path):
    tok = Tokenizer.train(iter(CORPUS), 290, pattern="[a-z]+", show_progress=False)
    text = "Hello, World! 12 ab"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    reloaded = Tokenizer.from_pretrained(tmp_path, pattern=r"\d+")
    assert reloaded.decode(reloaded.encode(text)) == text
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(text).ids == tok.encode(text)


def test_prefix_space_after_split_is_refused():
    data = json.loads(with_split({"Regex": "[a-z]+"}, "Isolated", False))
    data["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    with pytest.raises(FormatError, match="add_prefix_space"):
        Tokenizer.from_json(json.dumps(data))


def test_prefix_space_on_byte_level_alone_matches_hf_and_saves_as_such():
    data = json.loads(json.dumps(base_json()))
    data["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    ours = Tokenizer.from_json(json.dumps(data))
    hf = tokenizers.Tokenizer.from_str(json.dumps(data))
    saved = ours.to_json()
    hf_saved = tokenizers.Tokenizer.from_str(saved)
    for text in ["hello world, this", "a,b c", " x", ""]:
        want = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == want
        assert hf_saved.encode(text, add_special_tokens=False).ids == want
        assert Tokenizer.from_json(saved).encode(text) == want


# ---------------------------------------------------------------------------------------------
# 2. One table of pattern names


def test_pattern_names_agree_everywhere(tmp_path):
    classic = Tokenizer.train(iter(CORPUS), 280, pattern="cl100k_classic", show_progress=False)
    assert classic._core.pattern_name == "cl100k_classic"
    edit = Tokenizer.train(iter(CORPUS), 280, pattern="p50k_edit", show_progress=False)
    assert edit._core.pattern_name == "gpt2"
    assert edit.pattern == ferrolm.tokenizer.GPT2_PATTERN
    # The saved file and the encoder agree: merges never cross a word boundary.
    assert all(" " not in edit.decode([i]).strip(" ") for i in range(edit.vocab_size))
    edit.save(tmp_path)
    assert Tokenizer.from_pretrained(tmp_path)._core.pattern_name == "gpt2"
    assert (
        Tokenizer.from_pretrained(tmp_path, pattern="cl100k_classic")._core.pattern_name == "cl100k_classic"
    )
    ranks = {bytes([b]): b for b in range(256)}
    assert Tokenizer.from_ranks(ranks, pattern="p50k_edit")._core.pattern_name == "gpt2"
    assert ferrolm._core.hf_pattern("cl100k_classic") == classic.pattern


@pytest.mark.parametrize("typo", ["p50k_typo", "cl100k-base", "gpt3"])
def test_unknown_pattern_names_are_errors_listing_the_names(typo, tmp_path):
    calls = [
        lambda: Tokenizer.train(iter(CORPUS), 280, pattern=typo, show_progress=False),
        lambda: Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, pattern=typo),
    ]
    Tokenizer.train(iter(CORPUS), 280, show_progress=False).save(tmp_path)
    calls.append(lambda: Tokenizer.from_pretrained(tmp_path, pattern=typo))
    for call in calls:
        with pytest.raises(FerrolmError, match=r"unknown pattern name.*p50k_edit.*cl100k_classic"):
            call()


# ---------------------------------------------------------------------------------------------
# 3. Truncated merge lists are errors, not new special tokens


def write_vocab_merges(directory, merges: list[str], names=("vocab.json", "merges.txt")) -> Path:
    data = base_json()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / names[0]).write_text(json.dumps(data["model"]["vocab"]), encoding="utf-8")
    (directory / names[1]).write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    return directory


def full_merges() -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in base_json()["model"]["merges"]]


@settings(max_examples=40, deadline=None)
@given(
    cut=st.integers(0, 60),
    names=st.sampled_from([("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]),
)
def test_truncated_merges_file_is_an_error_or_the_same_tokenizer(tmp_path_factory, cut, names):
    merges = full_merges()
    keep = len(merges) - cut
    directory = write_vocab_merges(tmp_path_factory.mktemp("vm"), merges[:keep], names)
    full = Tokenizer.from_json(json.dumps(base_json()))
    text = "hello world, the quick brown fox 123"
    try:
        tok = Tokenizer.from_pretrained(directory / names[0])
    except FormatError as e:
        assert cut > 0
        assert names[1] in str(e) and "truncated" in str(e)
        return
    assert tok.encode(text) == full.encode(text)
    assert tok.special_tokens == full.special_tokens


@settings(max_examples=20, deadline=None)
@given(cut=st.integers(1, 60))
def test_truncated_tokenizer_json_merges_are_an_error(cut):
    data = json.loads(json.dumps(base_json()))
    data["model"]["merges"] = data["model"]["merges"][:-cut]
    with pytest.raises(FormatError, match=r"tokenizer.json.*no merge makes it"):
        Tokenizer.from_json(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# 4. A special token cannot take an ordinary token's id


def test_added_token_on_an_ordinary_id_is_an_error():
    data = json.loads(json.dumps(base_json()))
    (b,) = Tokenizer.from_json(json.dumps(data)).encode("b")
    added = data["added_tokens"]
    data["added_tokens"] = [*added, {"id": b, "content": "<x>", "special": True}]
    with pytest.raises(FormatError, match=f'"<x>" has id {b}, which is already the ordinary token "b"'):
        Tokenizer.from_json(json.dumps(data))
    # An added token whose content IS the vocabulary token at that id (as HF files have) is fine.
    data["added_tokens"] = [*added, {"id": b, "content": "b", "special": True}]
    assert Tokenizer.from_json(json.dumps(data)).decode([b]) == "b"


def test_tiktoken_special_on_an_ordinary_id_is_an_error(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    Tokenizer.from_ranks(ranks, pattern="gpt2").save_tiktoken(tmp_path / "x.tiktoken")
    with pytest.raises(FormatError, match=r'"<\|end\|>" has id 97'):
        Tokenizer.from_pretrained(tmp_path / "x.tiktoken", pattern="gpt2", special_tokens={"<|end|>": 97})
    ok = Tokenizer.from_pretrained(tmp_path / "x.tiktoken", pattern="gpt2", special_tokens={"<|end|>": 256})
    assert ok.decode([98, 256, 97]) == "b<|end|>a"


# ---------------------------------------------------------------------------------------------
# 9. A huge id in a small file is refused, never sizes a table


@pytest.mark.parametrize("huge", [4294967294, 300_000_000])
def test_huge_ids_are_format_errors(huge, tmp_path):
    data = json.loads(json.dumps(base_json()))
    data["added_tokens"] = [{"id": huge, "content": "<big>", "special": True}]
    with pytest.raises(FormatError, match=f'"<big>" has id {huge}.*must be below'):
        Tokenizer.from_json(json.dumps(data))
    data = json.loads(json.dumps(base_json()))
    data["model"]["vocab"]["<big>"] = huge
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=f"tokenizer.json: token .* has id {huge}"):
        Tokenizer.from_pretrained(tmp_path / "tokenizer.json")
    with pytest.raises(FerrolmError, match=f"has id {huge}"):
        Tokenizer.from_ranks(
            {bytes([b]): b for b in range(256)}, pattern="gpt2", special_tokens={"<big>": huge}
        )


# ---------------------------------------------------------------------------------------------
# 11. Quoted input in messages is capped


def test_error_messages_cap_quoted_text(tmp_path):
    huge = "x" * 1_000_000
    cases = [
        ("merges.txt", huge),  # one huge line, no space
        ("merges.txt", huge + " b"),  # a huge token
    ]
    for name, line in cases:
        d = write_vocab_merges(tmp_path / str(len(line)), [])
        (d / name).write_text("#version: 0.2\n" + line + "\n")
        with pytest.raises(FormatError) as info:
            Tokenizer.from_pretrained(d)
        assert len(str(info.value)) < 800 and "bytes in all" in str(info.value)
    (tmp_path / "r.tiktoken").write_text(huge + "\n")
    with pytest.raises(FormatError) as info:
        Tokenizer.from_pretrained(tmp_path / "r.tiktoken", pattern="gpt2")
    assert len(str(info.value)) < 800
    data = json.loads(json.dumps(base_json()))
    data["model"]["vocab"][huge] = 5000
    with pytest.raises(FormatError) as info:
        Tokenizer.from_json(json.dumps(data))
    assert len(str(info.value)) < 800
    with pytest.raises(FerrolmError) as info:
        Tokenizer.train(iter(CORPUS), 280, pattern="a" * 100_000, show_progress=False)
    assert len(str(info.value)) < 1200


# ---------------------------------------------------------------------------------------------
# 12. FIFOs are refused, thread counts are checked


FIFO_SCRIPT = """
import os, sys
from ferrolm import Tokenizer
path = sys.argv[1]
try:
    Tokenizer.from_pretrained(path, pattern="gpt2") if path.endswith(".tiktoken") else Tokenizer.from_pretrained(path)
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.parametrize("name", ["tokenizer.json", "r.tiktoken", "vocab.json", "merges.txt"])
def test_fifo_in_place_of_a_tokenizer_file_is_an_error(name, tmp_path):
    import subprocess
    import sys

    if name in ("vocab.json", "merges.txt"):
        write_vocab_merges(tmp_path, full_merges())
        (tmp_path / name).unlink()
    fifo = tmp_path / name
    os.mkfifo(fifo)
    target = tmp_path / "vocab.json" if name == "merges.txt" else fifo
    out = subprocess.run(
        [sys.executable, "-c", FIFO_SCRIPT, str(target)], capture_output=True, text=True, timeout=60
    ).stdout
    assert "FormatError" in out or "FerrolmError" in out, out
    assert "regular file" in out or "needs" in out, out


def test_training_on_a_fifo_is_an_error(tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    script = (
        "import sys\nfrom ferrolm import Tokenizer\n"
        "try:\n    Tokenizer.train([sys.argv[1]], 300, show_progress=False)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(fifo)], capture_output=True, text=True, timeout=60
    )
    assert "regular file" in out.stdout, out


@pytest.mark.parametrize("bad", [100_000, -1, -(2**40), 2**70])
def test_thread_counts_are_checked(bad):
    before = ferrolm.get_num_threads()
    with pytest.raises((FerrolmError, OverflowError)) as info:
        ferrolm.set_num_threads(bad)
    if bad < 2**63:
        assert isinstance(info.value, FerrolmError)
        assert "expected 0 (all cores) to" in str(info.value)
    assert ferrolm.get_num_threads() == before
    tok = Tokenizer.from_json(json.dumps(base_json()))
    if abs(bad) < 2**63:
        with pytest.raises(FerrolmError, match="num_threads"):
            tok.encode_batch(["a b"], num_threads=bad)
    ferrolm.set_num_threads(0)
    ferrolm.set_num_threads(before)
    assert tok.encode_batch(["a b"], num_threads=2) == [tok.encode("a b")]


# ---------------------------------------------------------------------------------------------
# 13. decode takes ints and integer arrays only


def test_decode_refuses_what_is_not_an_int():
    import numpy as np

    tok = Tokenizer.from_json(json.dumps(base_json()))
    for bad, where in [
        ([104.9, 105.2], "ids[0] is float"),
        ([104, "105"], "ids[1] is str"),
        ([None], "ids[0]"),
    ]:
        with pytest.raises(TypeError, match=re.escape(where)):
            tok.decode(bad)
    for bad in [b"hi", "hi", bytearray(b"hi"), np.array([104.0, 105.0])]:
        with pytest.raises(TypeError):
            tok.decode(bad)
        with pytest.raises(TypeError):
            tok.decode_bytes(bad)
    with pytest.raises(TypeError):
        tok.decode_single_token_bytes(104.5)  # type: ignore[arg-type]
    h, i = tok.encode("h") + tok.encode("i")
    assert tok.decode([h, i]) == "hi"
    assert tok.decode(np.array([h, i], dtype=np.uint16)) == "hi"
    assert tok.decode([np.int64(h), np.uint32(i)]) == "hi"
    assert tok.decode((h, i)) == "hi"
    assert tok.decode([True]) == tok.decode([1])  # bool is an int, as tiktoken takes it


def test_sharding_with_a_split_tokenizer_keeps_every_byte(tmp_path):
    import numpy as np
    from safetensors.numpy import load_file

    from ferrolm.data import shard_corpus

    tok, _ = pair(0, "Isolated", False)  # {"String": " "}: lost all but the spaces before the fix
    docs = [f"doc {i}: hello world, this is a test {i * 7}" for i in range(50)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = shard_corpus(
        tmp_path / "in.jsonl", tmp_path / "out", tok, val_fraction=0.0, show_progress=False
    )
    got = []
    for shard in manifest.shards("train"):
        tensors = load_file(str(shard.path))
        tokens, offsets = tensors["tokens"], tensors["doc_offsets"].astype(np.int64)
        got += [tok.decode(tokens[offsets[i] : offsets[i + 1] - 1]) for i in range(len(offsets) - 1)]
    assert got == docs
