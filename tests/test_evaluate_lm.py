"""ferrolm.lm_eval and `ferrolm evaluate` on a language model: sliding-window loss, perplexity, bits per byte.

A tiny random GPT and a tokenizer trained here; the references are computed by hand with the model.
"""

from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ferrolm import FerrolmError, Tokenizer  # noqa: E402
from ferrolm.cli import main  # noqa: E402
from ferrolm.export import export_hf  # noqa: E402
from ferrolm.lm_eval import evaluate_lm, read_stream, sliding_windows  # noqa: E402
from ferrolm.model import GPT, GPTConfig  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. Ünïcödé bytes count as UTF-8: naïve café, 東京, 🦀.\n"
    "Pack my box with five dozen liquor jugs; how vexingly quick daft zebras jump!\n"
) * 3


@pytest.fixture(scope="module")
def lm(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = Tokenizer.train(iter([TEXT] * 5), 300, show_progress=False)
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32)).eval()
    hf_dir = export_hf(model, root / "hf", tokenizer_file=root / "tokenizer.json")
    text_file = root / "valid.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    return {"root": root, "tokenizer": tokenizer, "model": model, "hf": hf_dir, "text": text_file}


@torch.no_grad()
def nll(model: GPT, inputs: list[int], targets: list[int]) -> float:
    """Summed negative log-likelihood of ``targets`` given ``inputs`` (one row), in float64."""
    logits, _ = model(torch.tensor([inputs]))
    log_probs = torch.log_softmax(logits[0].double(), dim=-1)  # (T, V)
    return -float(log_probs[torch.arange(len(targets)), torch.tensor(targets)].sum())


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 300), st.integers(1, 40), st.data())
def test_every_token_but_the_first_is_scored_once_with_enough_context(n, max_length, data) -> None:  # type: ignore[no-untyped-def]
    stride = data.draw(st.integers(1, max_length))
    seen = []
    for begin, end, skip in sliding_windows(n, max_length, stride):
        assert 0 <= begin < end <= n - 1 and end - begin <= max_length and 0 <= skip < end - begin
        for j in range(begin + 1 + skip, end + 1):  # the targets this window scores
            assert j - begin >= min(j, max_length - stride + 1)  # tokens of context it sees
            seen.append(j)
    assert seen == list(range(1, n))


def test_stride_equal_to_the_window_is_plain_chunked_loss_and_bpb_is_by_hand(lm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = lm["model"], lm["tokenizer"]
    stream = [tokenizer.eot_token, *tokenizer.encode_ordinary(TEXT)]
    L = 32
    total = sum(  # chunks of L inputs, each target the next token: what pretraining's val loss computes
        nll(model, stream[i : i + L], stream[i + 1 : i + L + 1]) for i in range(0, len(stream) - 1, L)
    )
    result = evaluate_lm(lm["hf"], lm["text"], stride=L, batch_size=3)
    assert result["tokens"] == len(stream) - 1 and result["windows"] == math.ceil((len(stream) - 1) / L)
    assert result["bytes"] == len(TEXT.encode("utf-8"))  # every byte of the text is predicted
    assert result["loss"] == pytest.approx(total / (len(stream) - 1), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / (len(stream) - 1)), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)
    same = evaluate_lm(model, lm["text"], tokenizer=tokenizer, stride=L, batch_size=64)  # one batch
    assert same["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_stride_one_gives_every_token_the_longest_context(lm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = lm["model"], lm["tokenizer"]
    text = TEXT[:120]
    path = lm["root"] / "short.txt"
    path.write_text(text, encoding="utf-8")
    stream = [tokenizer.eot_token, *tokenizer.encode_ordinary(text)]
    L = 8
    total = 0.0
    for j in range(1, len(stream)):  # target j after the (up to) L tokens before it
        context = stream[max(0, j - L) : j]
        with torch.no_grad():
            logits, _ = model(torch.tensor([context]))
        total -= float(torch.log_softmax(logits[0, -1].double(), dim=-1)[stream[j]])
    result = evaluate_lm(model, path, tokenizer=tokenizer, stride=1, max_length=L)
    assert result["tokens"] == len(stream) - 1 and result["windows"] == len(stream) - L
    assert result["loss"] == pytest.approx(total / (len(stream) - 1), rel=1e-4)
    chunked = evaluate_lm(model, path, tokenizer=tokenizer, stride=L, max_length=L)
    assert chunked["loss"] != pytest.approx(result["loss"], rel=1e-6)  # the stride matters


def test_shards_are_the_split_stream_and_need_the_models_tokenizer(lm) -> None:  # type: ignore[no-untyped-def]
    from ferrolm.data import Manifest, shard_corpus

    shards = lm["root"] / "shards"
    shard_corpus(str(lm["text"]), shards, str(lm["root"] / "tokenizer.json"), val_fraction=0.0, show_progress=False)  # fmt: skip
    stream = read_stream(shards, lm["tokenizer"], "train")
    assert stream.tolist() == [*lm["tokenizer"].encode_ordinary(TEXT), lm["tokenizer"].eot_token]  # eos after
    result = evaluate_lm(lm["hf"], shards, split="train", stride=16)
    assert result["tokens"] == Manifest.load(shards).tokens("train") - 1
    with pytest.raises(FerrolmError, match="split 'val' is empty"):
        evaluate_lm(lm["hf"], shards)
    with pytest.raises(FerrolmError, match="no split 'test'"):
        evaluate_lm(lm["hf"], shards, split="test")
    other = Tokenizer.train(iter(["something else entirely"] * 5), 270, show_progress=False)
    with pytest.raises(FerrolmError, match="another tokenizer than the model's"):
        evaluate_lm(lm["model"], shards, tokenizer=other, split="train")


def test_bad_options_and_inputs_are_named(lm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = lm["model"], lm["tokenizer"]
    with pytest.raises(FerrolmError, match=r"stride must be in \[1, max_length=32\], got 0"):
        evaluate_lm(model, lm["text"], tokenizer=tokenizer, stride=0)
    with pytest.raises(FerrolmError, match=r"max_length must be in \[1, 32\]"):
        evaluate_lm(model, lm["text"], tokenizer=tokenizer, max_length=33)
    bad = lm["root"] / "bad.txt"
    bad.write_bytes(b"fine text \xff broken")
    with pytest.raises(FerrolmError, match=r"bad\.txt: not valid UTF-8 \(byte 10\)"):
        evaluate_lm(model, bad, tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="no such file or shard directory"):
        evaluate_lm(model, lm["root"] / "missing.txt", tokenizer=tokenizer)
    encoder = GPT(GPTConfig.preset("tiny", vocab_size=tokenizer.vocab_size, causal=False))
    with pytest.raises(FerrolmError, match="masked-LM encoder; perplexity needs a causal LM"):
        evaluate_lm(encoder, lm["text"], tokenizer=tokenizer)


def test_cli_reports_loss_perplexity_bits_per_byte(lm, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["evaluate", str(lm["hf"]), "--data", str(lm["text"]), "--stride", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == evaluate_lm(lm["hf"], lm["text"], stride=32, batch_size=64)  # the CLI's batch
    assert main(["evaluate", str(lm["hf"]), "--data", str(lm["text"])]) == 0  # default stride: 16
    out = capsys.readouterr().out
    assert "bits per byte" in out and "stride 16" in out
    assert main(["evaluate", str(lm["hf"]), "--data", str(lm["text"]), "--stride", "99"]) == 1
    assert "stride must be in [1, max_length=32], got 99" in capsys.readouterr().err
    assert main(["evaluate", str(lm["hf"]), "--data", str(lm["text"]), "--text-column", "x"]) == 1
    assert "--text-column applies to classifiers" in capsys.readouterr().err
