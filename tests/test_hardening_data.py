"""Issue 13, data part: sharding, the manifest and the loader refuse what they cannot trust.

Resume over a changed input, tampered manifests / shard headers / loader states, FIFOs and
devices, paths outside a shard directory, temporaries left by kill -9, bad options and deeply
nested JSON lines: each is a clear error (or, for the temporaries, cleaned), never a crash, a
hang or a silently different output."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ferrolm
from ferrolm import Tokenizer
from ferrolm.data import Manifest, PackedLoader, merge_shards, shard_corpus

T = 16


@pytest.fixture(scope="module")
def tok_path(hf_tokenizers) -> Path:  # type: ignore[no-untyped-def]
    return Path(hf_tokenizers["gpt2"][1])


@pytest.fixture(scope="module")
def tok(tok_path) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer.from_pretrained(tok_path)


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "é", "don't", "123", "\n"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    base = tmp_path_factory.mktemp("hardening-shards")
    write_jsonl(base / "d.jsonl", documents(300, seed=1))
    shard_corpus(
        base / "d.jsonl", base / "out", tok, val_fraction=0.1, shard_tokens=1500, show_progress=False
    )
    return base / "out"


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(d: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads((d / "manifest.json").read_text())
    change(data)
    (d / "manifest.json").write_text(json.dumps(data))


# -- 6 and 15: resume after kill -9 -------------------------------------------------------------

CHILD = """
import sys
from ferrolm.data import shard_corpus
shard_corpus(sys.argv[1], sys.argv[2], sys.argv[3], val_fraction=0.1, shard_tokens=3000, show_progress=False)
"""


def killed_run(corpus: Path, out: Path, tok_path: Path) -> None:
    """Starts sharding in a child and kill -9s it once a few shards are finished."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(corpus), str(out), str(tok_path)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if len(list(out.glob("train-*.safetensors"))) >= 3:
            break
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "manifest.json").exists(), (
        "the child finished before it was killed: make the corpus larger"
    )
    assert (out / ".progress.json").exists()


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("big-corpus")
    return write_jsonl(base / "big.jsonl", documents(60_000, seed=7))


def test_kill_9_then_resume_is_identical_and_leaves_no_temporaries(big_corpus, tok, tok_path, tmp_path):
    full = shard_corpus(
        big_corpus, tmp_path / "full", tok, val_fraction=0.1, shard_tokens=3000, show_progress=False
    )
    out = tmp_path / "killed"
    killed_run(big_corpus, out, tok_path)
    # What kill -9 mid-write leaves (a dead writer's temporary), planted for certain.
    (out / ".train-00999.safetensors.tmp-2147483632").write_bytes(b"\0" * 4096)
    resumed = shard_corpus(
        big_corpus, out, tok, val_fraction=0.1, shard_tokens=3000, resume=True, show_progress=False
    )
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []
    assert resumed.data == full.data
    for split in ("train", "val"):
        for a, b in zip(full.shards(split), resumed.shards(split), strict=True):
            assert a.path.read_bytes() == b.path.read_bytes()


def test_fresh_run_into_a_killed_directory_removes_temporaries(tok, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    stale = out / ".train-00000.safetensors.tmp-2147483632"
    stale.write_bytes(b"x" * 1000)
    write_jsonl(tmp_path / "d.jsonl", documents(50))
    shard_corpus(tmp_path / "d.jsonl", out, tok, val_fraction=0.0, show_progress=False)
    assert not stale.exists()


def test_resume_refuses_an_input_that_changed(big_corpus, tok, tok_path, tmp_path):
    corpus = tmp_path / "big.jsonl"
    shutil.copyfile(big_corpus, corpus)
    out = tmp_path / "killed"
    killed_run(corpus, out, tok_path)
    with open(corpus, "a", encoding="utf-8") as handle:  # one more document
        handle.write(json.dumps({"text": "a document appended before the resume"}) + "\n")
    with pytest.raises(
        ferrolm.FerrolmError, match=r"big\.jsonl changed since the interrupted run \(size was"
    ):
        shard_corpus(corpus, out, tok, val_fraction=0.1, shard_tokens=3000, resume=True, show_progress=False)
    assert not (out / "manifest.json").exists()


def test_resume_refuses_a_rewritten_prefix_and_a_changed_input_list(tok, tmp_path):
    docs = documents(3000, seed=2)
    a, b = write_jsonl(tmp_path / "a.jsonl", docs[:1500]), write_jsonl(tmp_path / "b.jsonl", docs[1500:])
    out = tmp_path / "o"
    # A first run stopped by an error in b (strict lines), after shards of a were written.
    b_text = b.read_text()
    b.write_text(b_text + "{oops\n")
    with pytest.raises(ferrolm.FormatError):
        shard_corpus(
            tmp_path, out, tok, val_fraction=0.0, shard_tokens=500, on_bad_line="error", show_progress=False
        )
    assert (out / ".progress.json").exists()
    stat = a.stat()
    original = a.read_bytes()
    # Same size and mtime, different bytes: only the hash can tell.
    a.write_bytes(original.replace(b"cat", b"dog", 1))
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ferrolm.FerrolmError, match=r"a\.jsonl changed .*sha256 of its first \d+ bytes"):
        shard_corpus(tmp_path, out, tok, val_fraction=0.0, shard_tokens=500, resume=True, show_progress=False)
    a.write_bytes(original)
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    b.write_text(b_text)
    with pytest.raises(ferrolm.FerrolmError, match="the list of inputs changed"):
        shard_corpus(b, out, tok, val_fraction=0.0, shard_tokens=500, resume=True, show_progress=False)


# -- 7 and 10: the manifest ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(format_version=2), r"format_version: is 2; this ferrolm reads version 1"),
        (lambda m: m.update(vocab_size=10**12), r"vocab_size: is 1000000000000, expected 1 to"),
        (lambda m: m.update(vocab_size=70000), r"vocab_size: is 70000, expected 1 to 65536 for uint16"),
        (lambda m: m.update(vocab_size=0), r"vocab_size: is 0"),
        (lambda m: m.update(eos_id=m["vocab_size"]), r"eos_id: is \d+, not below vocab_size"),
        (lambda m: m.update(bos_id=4294967295), r"bos_id: is 4294967295, not below vocab_size"),
        (lambda m: m["splits"]["train"]["shards"].append(m["splits"]["train"]["shards"][0]), r"listed twice"),
        (
            lambda m: m["splits"]["train"].update(tokens=m["splits"]["train"]["tokens"] + 1),
            r"splits\.train\.tokens",
        ),
        (lambda m: m.update(total_documents=m["total_documents"] - 1), r"total_documents: is"),
        (lambda m: m.update(dtype="float32"), r"dtype: must be"),
    ],
)
def test_tampered_manifest_fields_are_refused(shards, tmp_path, change, match):
    d = copy_dir(shards, tmp_path / "s")
    rewrite_manifest(d, change)
    with pytest.raises(ferrolm.FormatError, match=match):
        Manifest.load(d)
    with pytest.raises(ferrolm.FormatError, match=match):
        PackedLoader(d, batch_size=2, seq_len=T, format="numpy")


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.safetensors", "sub/../../x", "", ".hidden"])
def test_shard_names_outside_the_directory_are_refused(shards, tmp_path, name):
    d = copy_dir(shards, tmp_path / "s")
    rewrite_manifest(d, lambda m: m["splits"]["train"]["shards"][0].update(file=name))
    with pytest.raises(ferrolm.FormatError, match="not a plain file name"):
        PackedLoader(d, batch_size=2, seq_len=T, format="numpy")


def test_a_symlink_out_of_the_directory_is_refused(shards, tmp_path):
    d = copy_dir(shards, tmp_path / "s")
    outside = tmp_path / "elsewhere.safetensors"
    victim = d / "train-00000.safetensors"
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    with pytest.raises(ferrolm.FormatError, match=r"symbolic link .* outside the shard directory"):
        PackedLoader(d, batch_size=2, seq_len=T, format="numpy")


def test_shard_header_shape_must_match_its_bytes(shards, tmp_path):
    d = copy_dir(shards, tmp_path / "s")
    victim = d / "train-00000.safetensors"
    data = victim.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    true_shape = header["tokens"]["shape"][0]
    header["tokens"]["shape"] = [true_shape + 1]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    victim.write_bytes(data[:8] + text + data[8 + n :])
    with pytest.raises(ferrolm.FormatError, match=r"tensor \"tokens\": shape \[\d+\] does not match"):
        PackedLoader(d, batch_size=2, seq_len=T, format="numpy", verify=False)


# -- 14: merge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.safetensors"])
def test_merge_refuses_a_part_naming_a_path_outside_it_and_links_nothing(shards, tmp_path, name):
    good = copy_dir(shards, tmp_path / "good")
    bad = copy_dir(shards, tmp_path / "bad")
    (tmp_path / "x.safetensors").write_bytes(b"secret")
    rewrite_manifest(bad, lambda m: m["splits"]["val"]["shards"][0].update(file=name))
    out = tmp_path / "merged"
    with pytest.raises(ferrolm.FormatError, match="not a plain file name"):
        merge_shards([good, bad], out)
    assert not out.exists() or list(out.iterdir()) == []


def test_merge_verifies_sizes_and_digests(shards, tmp_path):
    good = copy_dir(shards, tmp_path / "good")
    bad = copy_dir(shards, tmp_path / "bad")
    victim = bad / "train-00000.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    out = tmp_path / "merged"
    with pytest.raises(ferrolm.FormatError, match=r"train-00000\.safetensors: sha256"):
        merge_shards([good, bad], out)
    victim.write_bytes(bytes(data[:-1]))
    with pytest.raises(ferrolm.FormatError, match=r"truncated or replaced"):
        merge_shards([good, bad], out)
    assert not out.exists() or list(out.iterdir()) == []


# -- 7: loader state ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(epochs=[s["epochs"][0] + 1]), "epoch"),
        (lambda s: s.update(epochs=[-1]), "epochs"),
        (lambda s: s.update(position=-3), "position"),
        (lambda s: s.update(position="12"), "position"),
        (lambda s: s.update(position=True), "position"),
        (lambda s: s.update(position=2**64), "position"),
        (lambda s: s.update(epoch_starts=[1, 2]), "epoch_starts"),
        (lambda s: s.update(source_rows=None), "source_rows"),
        (lambda s: s.pop("fingerprint"), "fingerprint"),
        (lambda s: s.update(seed=1.5), "seed"),
    ],
)
def test_tampered_loader_state_is_refused(shards, change, match):
    loader = PackedLoader(shards, batch_size=2, seq_len=T, format="numpy", seed=3)
    for _ in range(100):  # past the first epoch
        next(loader)
    state = loader.state_dict()
    tampered = copy.deepcopy(state)
    change(tampered)
    fresh = PackedLoader(shards, batch_size=2, seq_len=T, format="numpy", seed=3)
    with pytest.raises(ferrolm.FerrolmError, match=match):
        fresh.load_state_dict(tampered)
        next(fresh)
    fresh.load_state_dict(state)
    assert (next(fresh)["input_ids"] == next(loader)["input_ids"]).all()


# -- 12: FIFOs and devices ----------------------------------------------------------------------


def test_a_fifo_in_place_of_a_shard_is_an_error_not_a_hang(shards, tmp_path):
    d = copy_dir(shards, tmp_path / "s")
    victim = d / "train-00001.safetensors"
    victim.unlink()
    os.mkfifo(victim)
    with pytest.raises(ferrolm.FormatError, match=r"train-00001\.safetensors: not a regular file"):
        PackedLoader(d, batch_size=2, seq_len=T, format="numpy")


def test_fifo_and_device_corpora_are_errors(tok, tmp_path):
    fifo = tmp_path / "corpus.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ferrolm.FormatError, match=r"corpus\.jsonl: not a regular file"):
        shard_corpus(fifo, tmp_path / "o1", tok, show_progress=False)
    with pytest.raises(ferrolm.FormatError, match=r"/dev/zero: not a regular file"):
        shard_corpus("/dev/zero", tmp_path / "o2", tok, show_progress=False)


# -- 16: options and nesting ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [-5, 0, 10**30])
def test_bad_shard_tokens_is_one_clear_error(tok, tmp_path, value):
    write_jsonl(tmp_path / "d.jsonl", documents(5))
    with pytest.raises(
        ferrolm.FerrolmError, match=rf"shard_tokens \(--shard-tokens\) must be .* got {value}"
    ):
        shard_corpus(tmp_path / "d.jsonl", tmp_path / "o", tok, shard_tokens=value, show_progress=False)


def test_deeply_nested_json_line_is_named_not_a_crash(tok, tmp_path):
    corpus = tmp_path / "deep.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(ferrolm.FormatError, match=r"deep\.jsonl:2: not valid JSON: recursion limit"):
        shard_corpus(corpus, tmp_path / "o", tok, on_bad_line="error", show_progress=False)
    manifest = shard_corpus(corpus, tmp_path / "o2", tok, val_fraction=0.0, show_progress=False)
    assert manifest.skipped["bad_lines"] == 1 and manifest.data["total_documents"] == 1


# -- 7: property test: random mutations never crash and never load silently ----------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_manifest_and_header_mutations_error_or_keep_meaning(shards, tmp_path_factory, data):
    d = copy_dir(shards, tmp_path_factory.mktemp("mut") / "s")
    original = json.loads((d / "manifest.json").read_text())
    target = data.draw(st.sampled_from(["manifest", "header"]))
    if target == "manifest":
        text = (d / "manifest.json").read_text()
        pos = data.draw(st.integers(0, len(text) - 1))
        replacement = data.draw(
            st.sampled_from(["0", "9", "-1", '"', "..", "/", "1e30", "null", "", "x", "99999999999"])
        )
        (d / "manifest.json").write_text(text[:pos] + replacement + text[pos + 1 :])
    else:
        victim = sorted(d.glob("train-*.safetensors"))[0]
        raw = bytearray(victim.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        pos = data.draw(st.integers(0, 8 + n - 1))
        raw[pos] = data.draw(st.integers(0, 255))
        victim.write_bytes(bytes(raw))
    try:
        loader = PackedLoader(d, batch_size=2, seq_len=T, format="numpy", verify=False)
        batch = next(loader)
    except (ferrolm.FerrolmError, FileNotFoundError, KeyError, OSError) as error:
        assert str(error)
        return
    # It loaded: then its meaning is the original one.
    reference = PackedLoader(shards, batch_size=2, seq_len=T, format="numpy", verify=False)
    assert (batch["input_ids"] == next(reference)["input_ids"]).all()
    # With verify=False digests are not read, so a mutated digest (or a val-split field) may load;
    # what the loader serves must still be the original: same tokens, vocabulary and dtype.
    assert loader.vocab_size == reference.vocab_size
    now = json.loads((d / "manifest.json").read_text())
    for key in ("vocab_size", "dtype"):
        assert now.get(key) == original[key]


# -- 1: sharding never loses text: a tokenizer that drops it is refused ---------------------------


def _with_removed_split(tok: Tokenizer, behavior: str) -> Tokenizer:
    data = json.loads(tok.to_json())
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"String": " "}, "behavior": behavior, "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    return Tokenizer.from_json(json.dumps(data))


def test_shard_corpus_refuses_a_tokenizer_that_drops_text_before_writing(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["hello world, this is a test"] * 5)
    lossy = _with_removed_split(tok, "Removed")
    assert not lossy.is_lossless
    out = tmp_path / "out"
    with pytest.raises(ferrolm.FerrolmError, match=r"drops text .*Removed"):
        shard_corpus(tmp_path / "d.jsonl", out, lossy, val_fraction=0.0, show_progress=False)
    assert not out.exists()
    # The same Split keeping its matches shards, and the shards decode to the corpus.
    kept = _with_removed_split(tok, "Isolated")
    manifest = shard_corpus(tmp_path / "d.jsonl", out, kept, val_fraction=0.0, show_progress=False)
    from safetensors.numpy import load_file

    ids = [int(t) for s in manifest.shards("train") for t in load_file(s.path)["tokens"]]
    eot = kept.eot_token
    assert kept.decode([i for i in ids if i != eot]) == "hello world, this is a test" * 5


# -- 15: merge cleans what a killed merge left in its output ---------------------------------------


def test_merge_removes_stale_temporaries_of_a_killed_merge_only(shards, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    dead = out / ".train-00000.safetensors.tmp-2147483632"  # no such pid
    dead.write_bytes(b"x" * 1000)
    mine = out / f".val-00000.safetensors.tmp-{os.getpid()}"  # a live writer's: kept
    mine.write_bytes(b"y")
    foreign = out / "notes.tmp-2147483632"  # not our pattern: kept
    foreign.write_bytes(b"z")
    merged = merge_shards([shards, shards], out)
    assert not dead.exists()
    assert mine.exists() and foreign.exists()
    assert merged.total_tokens == 2 * Manifest.load(shards).total_tokens


# -- 7: vocab_size against the tokenizer the manifest names -------------------------------------


@pytest.mark.parametrize("claim", ["huge", "one_less", "one_more"])
def test_manifest_vocab_size_must_match_its_tokenizer(shards, tmp_path, claim):
    d = copy_dir(shards, tmp_path / "s")
    true = Manifest.load(d).vocab_size
    value = {"huge": 4_000_000_000, "one_less": true - 1, "one_more": true + 1}[claim]

    def change(m):  # type: ignore[no-untyped-def]
        # uint32 and no eos: the dtype bound and the special-id checks both pass this value.
        m.update(vocab_size=value, dtype="uint32", eos_id=None)

    rewrite_manifest(d, change)
    with pytest.raises(
        ferrolm.FormatError, match=rf"vocab_size: is {value}, but its tokenizer .* has {true} tokens"
    ):
        Manifest.load(d)
    with pytest.raises(ferrolm.FormatError, match=rf"vocab_size: is {value}"):
        merge_shards([d], tmp_path / "merged")


def test_manifest_tokenizer_replaced_is_refused(shards, tmp_path, tok):
    d = copy_dir(shards, tmp_path / "s")
    other = _with_removed_split(tok, "Isolated")
    (d / "tokenizer.json").write_text(other.to_json(), encoding="utf-8")
    with pytest.raises(
        ferrolm.FormatError, match=r"tokenizer\.json: sha256 .* does not match tokenizer\.sha256"
    ):
        Manifest.load(d)
