"""Issue 13, tokenizer core: bad tokenizer files and arguments are refused, no text is ever lost."""

from __future__ import annotations

import functools
import json

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
