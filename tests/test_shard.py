"""Corpus sharding: shards round-trip to encode(doc) + EOS, every input format, determinism,
resume after a kill, parts + merge, and bad input counted or reported."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random

import numpy as np
import pytest
from safetensors.numpy import load_file

import ferrolm
from ferrolm import Tokenizer
from ferrolm.cli import main as cli_main
from ferrolm.data import Manifest, merge_shards, shard_corpus


@pytest.fixture(scope="module")
def tok(hf_tokenizers) -> Tokenizer:  # type: ignore[no-untyped-def]
    return Tokenizer.from_pretrained(hf_tokenizers["gpt2"][1])


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "中文", "👋", "don't", "123", "\n", "  ", "é", "<|endoftext|>"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):  # type: ignore[no-untyped-def]
    path.write_text(
        "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8"
    )
    return path


def read_split(manifest: Manifest, split: str) -> list[list[int]]:
    """Every document's tokens, in shard order, read with safetensors alone (no ferrolm)."""
    docs = []
    for shard in manifest.shards(split):
        tensors = load_file(str(shard.path))
        tokens, offsets = tensors["tokens"], tensors["doc_offsets"]
        assert offsets.dtype == np.uint64 and offsets[0] == 0 and offsets[-1] == len(tokens)
        assert len(offsets) == shard.documents + 1 and len(tokens) == shard.tokens
        docs += [tokens[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    return docs


def test_round_trip_every_document(tok, tmp_path):
    docs = make_documents(400)
    write_jsonl(tmp_path / "a.jsonl", docs[:250])
    write_jsonl(tmp_path / "b.jsonl", docs[250:])
    manifest = shard_corpus(
        tmp_path, tmp_path / "out", tok, val_fraction=0.2, shard_tokens=2000, show_progress=False
    )
    eos = tok.eot_token
    expected = {i: tok.encode_ordinary(d) + [eos] for i, d in enumerate(docs)}
    train, val = read_split(manifest, "train"), read_split(manifest, "val")
    assert sorted(map(tuple, train + val)) == sorted(map(tuple, expected.values()))
    # Train keeps document order; both splits are non-trivial.
    assert 30 < len(val) < 130 and len(train) + len(val) == 400
    assert manifest.dtype == "uint16" and manifest.eos_id == eos
    assert len(manifest.shards("train")) > 3
    assert manifest.total_tokens == sum(map(len, train + val))
    assert manifest.data["documents_read"] == 400
    for shard in manifest.shards("train"):
        assert hashlib.sha256(shard.path.read_bytes()).hexdigest() == shard.sha256
        meta = json.loads(
            shard.path.read_bytes()[8 : 8 + int.from_bytes(shard.path.read_bytes()[:8], "little")]
        )
        assert meta["__metadata__"]["tokenizer_sha256"] == manifest.data["tokenizer"]["sha256"]
    assert manifest.tokenizer().encode("round trip") == tok.encode("round trip")


def test_split_depends_only_on_the_document_and_seed(tok, tmp_path):
    docs = make_documents(300, seed=1)
    write_jsonl(tmp_path / "in1" / "x.jsonl", docs) if (tmp_path / "in1").mkdir() is None else None
    shuffled = docs[:]
    random.Random(5).shuffle(shuffled)
    (tmp_path / "in2").mkdir()
    write_jsonl(tmp_path / "in2" / "y.jsonl", shuffled[:100])
    write_jsonl(tmp_path / "in2" / "z.jsonl", shuffled[100:])

    def val_set(inp, out, seed=0):  # type: ignore[no-untyped-def]
        m = shard_corpus(inp, out, tok, val_fraction=0.3, seed=seed, show_progress=False)
        return sorted(map(tuple, read_split(m, "val")))

    assert val_set(tmp_path / "in1", tmp_path / "o1") == val_set(tmp_path / "in2", tmp_path / "o2")
    assert val_set(tmp_path / "in1", tmp_path / "o3", seed=1) != val_set(tmp_path / "in1", tmp_path / "o4")


def test_thread_count_does_not_change_a_byte(tok, tmp_path):
    write_jsonl(tmp_path / "d.jsonl", make_documents(500, seed=2))

    def shas(threads):  # type: ignore[no-untyped-def]
        m = shard_corpus(
            tmp_path / "d.jsonl",
            tmp_path / f"t{threads}",
            tok,
            val_fraction=0.1,
            shard_tokens=3000,
            num_threads=threads,
            show_progress=False,
        )
        return [s.sha256 for split in ("train", "val") for s in m.shards(split)]

    assert shas(1) == shas(2)


def test_input_formats(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = ["first document\nwith two lines", "second ✓", "third 👋 one"]
    src = tmp_path / "src"
    src.mkdir()
    line_docs = "".join(json.dumps({"body": d}) + "\n" for d in docs).encode()
    (src / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(line_docs))
    (src / "b.jsonl.gz").write_bytes(gzip.compress(line_docs))
    pq.write_table(pa.table({"body": docs}), src / "c.parquet")
    (src / "d.txt").write_text(docs[0])
    m = shard_corpus(src, tmp_path / "out", tok, text_field="body", val_fraction=0.0, show_progress=False)
    got = read_split(m, "train")
    per_doc = [tok.encode_ordinary(d) + [tok.eot_token] for d in docs]
    assert got == per_doc * 3 + per_doc[:1]
    assert [i["documents"] for i in m.data["inputs"]] == [3, 3, 3, 1]


@pytest.mark.parametrize(
    ("split", "delimiter", "text", "expected"),
    [
        ("blank_lines", None, "para one\nline two\n\n\n  para two\n \t\npara three\n", None),
        ("delimiter", "<doc>", "one<doc>two<doc><doc>three", ["one", "two", "three"]),
    ],
)
def test_text_splitting(tok, tmp_path, split, delimiter, text, expected):
    import re

    if expected is None:  # the documented rule: Python's re.split(r"\n\s*\n", text), blanks skipped
        expected = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    (tmp_path / "t.txt").write_text(text)
    m = shard_corpus(
        tmp_path / "t.txt",
        tmp_path / "out",
        tok,
        text_split=split,
        delimiter=delimiter,
        val_fraction=0.0,
        show_progress=False,
    )
    assert read_split(m, "train") == [tok.encode_ordinary(d) + [tok.eot_token] for d in expected]
    assert m.skipped["empty_documents"] == text.count("<doc><doc>")


def interrupted_run(tok, out, documents, **options):  # type: ignore[no-untyped-def]
    """What a kill leaves on disk: a writer that was fed the first documents and never finished
    (finished shards + .progress.json, no manifest), plus a half-written temporary file."""
    writer = ferrolm._core.CoreShardWriter(
        str(out),
        tok._core,
        tok.to_json(),
        bos=None,
        eos=tok.eot_token,
        dtype="uint16",
        resume=False,
        seed=0,
        **options,
    )
    writer.add_documents(documents)
    del writer
    (out / ".train-00099.safetensors.tmp-123").write_bytes(b"half a shard")
    assert (out / ".progress.json").exists() and not (out / "manifest.json").exists()


def test_resume_after_kill_is_identical(tok, tmp_path):
    docs = make_documents(600, seed=3)
    write_jsonl(tmp_path / "d.jsonl", docs)
    opts = {"val_fraction": 0.1, "shard_tokens": 1500}
    full = shard_corpus(tmp_path / "d.jsonl", tmp_path / "full", tok, show_progress=False, **opts)
    killed = tmp_path / "killed"
    interrupted_run(tok, killed, docs[:350], **opts)
    assert 0 < len(list(killed.glob("train-*.safetensors"))) < len(full.shards("train"))

    with pytest.raises(ferrolm.FerrolmError, match="unfinished run"):
        shard_corpus(tmp_path / "d.jsonl", killed, tok, show_progress=False, **opts)
    with pytest.raises(ferrolm.FerrolmError, match="different tokenizer or options"):
        shard_corpus(tmp_path / "d.jsonl", killed, tok, resume=True, val_fraction=0.2, shard_tokens=1500)
    resumed = shard_corpus(tmp_path / "d.jsonl", killed, tok, resume=True, show_progress=False, **opts)
    assert {k: v for k, v in resumed.data.items()} == full.data
    for split in ("train", "val"):
        for a, b in zip(full.shards(split), resumed.shards(split), strict=True):
            assert a.path.read_bytes() == b.path.read_bytes()
    assert not (killed / ".progress.json").exists()


def test_resume_detects_a_corrupted_finished_shard(tok, tmp_path):
    docs = make_documents(300, seed=4)
    write_jsonl(tmp_path / "d.jsonl", docs)
    opts = {"val_fraction": 0.0, "shard_tokens": 1500}
    interrupted_run(tok, tmp_path / "o", docs[:200], **opts)
    shard = tmp_path / "o" / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ferrolm.FormatError, match=r"train-00001\.safetensors.*truncated"):
        shard_corpus(tmp_path / "d.jsonl", tmp_path / "o", tok, resume=True, show_progress=False, **opts)


def test_parts_then_merge_equal_one_run(tok, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        write_jsonl(src / f"f{i}.jsonl", make_documents(60, seed=10 + i))
    opts = {"val_fraction": 0.1, "shard_tokens": 2500, "show_progress": False}
    single = shard_corpus(src, tmp_path / "single", tok, **opts)
    parts = [shard_corpus(src, tmp_path / f"p{i}", tok, num_parts=3, part=i, **opts) for i in range(3)]
    assert [len(p.data["inputs"]) for p in parts] == [2, 2, 1]
    merged = merge_shards([p.directory for p in parts], tmp_path / "merged")
    for split in ("train", "val"):
        assert sorted(map(tuple, read_split(merged, split))) == sorted(map(tuple, read_split(single, split)))
        assert merged.tokens(split) == single.tokens(split)
    assert merged.total_tokens == single.total_tokens
    # The CLI does the same.
    assert (
        cli_main(["shard", "merge", *[str(p.directory) for p in parts], "--out", str(tmp_path / "m2")]) == 0
    )
    assert Manifest.load(tmp_path / "m2").total_tokens == single.total_tokens


def test_bad_lines_are_counted_or_reported(tok, tmp_path):
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"other": "x"}),
        json.dumps({"text": 5}),
        "",
    ]
    lines.append(json.dumps({"text": ""}))
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    m = shard_corpus(tmp_path / "bad.jsonl", tmp_path / "o", tok, val_fraction=0.0, show_progress=False)
    assert m.skipped["bad_lines"] == 3 and m.skipped["empty_documents"] == 1
    assert m.documents("train") == 1
    with pytest.raises(ferrolm.FormatError, match=r"bad\.jsonl:2: not valid JSON"):
        shard_corpus(tmp_path / "bad.jsonl", tmp_path / "o2", tok, on_bad_line="error", show_progress=False)


def test_invalid_utf8(tok, tmp_path):
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 au lait")
    m = shard_corpus(tmp_path / "x.txt", tmp_path / "o", tok, val_fraction=0.0, show_progress=False)
    assert m.skipped["invalid_utf8_replaced"] == 1
    assert read_split(m, "train") == [tok.encode_ordinary("caf\ufffd au lait") + [tok.eot_token]]
    with pytest.raises(ferrolm.FormatError, match=r"x\.txt: invalid UTF-8 at byte 3"):
        shard_corpus(tmp_path / "x.txt", tmp_path / "o2", tok, on_invalid_utf8="error", show_progress=False)


def test_bad_setups(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        shard_corpus(tmp_path / "nope.jsonl", tmp_path / "o", tok)
    write_jsonl(tmp_path / "d.jsonl", ["x"])
    shard_corpus(tmp_path / "d.jsonl", tmp_path / "o", tok, show_progress=False)
    with pytest.raises(ferrolm.FerrolmError, match="finished run"):
        shard_corpus(tmp_path / "d.jsonl", tmp_path / "o", tok, show_progress=False)
    big = Tokenizer.from_ranks(
        {bytes([b]): b for b in range(256)}, pattern="gpt2", special_tokens={"<|e|>": 70000}
    )
    with pytest.raises(ferrolm.FerrolmError, match="does not fit uint16"):
        shard_corpus(tmp_path / "d.jsonl", tmp_path / "o3", big, dtype="uint16", eos_token="<|e|>")
    no_eos = Tokenizer.from_ranks({bytes([b]): b for b in range(256)}, pattern="gpt2")
    with pytest.raises(ferrolm.FerrolmError, match="needs a eos token"):
        shard_corpus(tmp_path / "d.jsonl", tmp_path / "o4", no_eos)
    (tmp_path / "locked.jsonl").write_text("{}\n")
    (tmp_path / "locked.jsonl").chmod(0)
    import os

    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(PermissionError, match="locked"):
            shard_corpus(tmp_path / "locked.jsonl", tmp_path / "o5", tok)


def test_cli_shard(tok, tmp_path, capsys):
    tok.save(tmp_path / "tokenizer.json")
    write_jsonl(tmp_path / "d.jsonl", make_documents(50))
    code = cli_main(
        [
            "shard",
            str(tmp_path / "d.jsonl"),
            "--tokenizer",
            str(tmp_path / "tokenizer.json"),
            "--out",
            str(tmp_path / "o"),
            "--val-fraction",
            "0.1",
            "--quiet",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "train:" in out and "manifest:" in out
    assert (
        cli_main(
            [
                "shard",
                str(tmp_path / "missing.jsonl"),
                "--tokenizer",
                str(tmp_path / "tokenizer.json"),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 1
    )
    assert "missing.jsonl" in capsys.readouterr().err


# -- a large file: progress and Ctrl-C inside it -----------------------------------------------


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):  # type: ignore[no-untyped-def]
    """About 24 MB of JSON lines: seconds of encoding, many batches and shards."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    docs = make_documents(4000, seed=7)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(48):
            f.write("".join(json.dumps({"text": f"{i} {d}"}) + "\n" for d in docs))
    return path


BIG_OPTIONS = {"val_fraction": 0.01, "shard_tokens": 200_000}


def test_progress_updates_within_a_large_file(tok, big_jsonl, tmp_path):
    writer = ferrolm._core.CoreShardWriter(
        str(tmp_path / "o"), tok._core, tok.to_json(), bos=None, eos=tok.eot_token, dtype="uint16",
        resume=False, seed=0, **BIG_OPTIONS,
    )  # fmt: skip
    calls: list[tuple[int, int, int]] = []
    documents, size = writer.add_file(
        str(big_jsonl), text_field="text", text_split="file", progress=lambda *done: calls.append(done)
    )
    assert size == big_jsonl.stat().st_size and documents == 48 * 4000
    inside = [c for c in calls if 0 < c[0] < size]
    assert len(inside) >= 2, calls  # updated while the file was being read, not only at its end
    for earlier, later in itertools.pairwise(calls):
        assert all(a <= b for a, b in zip(earlier, later, strict=True))
    assert inside[-1][1] > inside[0][1] and inside[-1][2] > inside[0][2]


def test_ctrl_c_inside_a_large_file_stops_within_a_second_and_resumes(tok, big_jsonl, tmp_path):
    import signal
    import threading
    import time

    full = shard_corpus(big_jsonl, tmp_path / "full", tok, show_progress=False, **BIG_OPTIONS)
    out = tmp_path / "interrupted"
    sent: list[float] = []

    def interrupt() -> None:
        # Part-way through the one input file: once its first shards are published.
        deadline = time.perf_counter() + 60
        while not list(out.glob("train-*.safetensors")) and time.perf_counter() < deadline:
            time.sleep(0.002)
        if not returned.is_set():  # a signal after the run would hit pytest instead
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

    returned = threading.Event()

    timer = threading.Thread(target=interrupt)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        try:
            shard_corpus(big_jsonl, out, tok, show_progress=False, **BIG_OPTIONS)
        finally:
            returned.set()
    stopped = time.perf_counter()
    timer.join()
    assert stopped - sent[0] < 1.0, f"stopped {stopped - sent[0]:.2f} s after Ctrl-C"

    # Nothing published: no manifest, and every shard file present is a finished one, named with
    # its checksum in the progress file (temporaries are hidden and removed by the resume).
    assert not (out / "manifest.json").exists()
    progress = json.loads((out / ".progress.json").read_text())
    listed = {s["file"]: s["sha256"] for shards in progress["shards"].values() for s in shards}
    present = {p.name for p in out.glob("*.safetensors")}
    assert present == set(listed) and 0 < len(present) < len(full.shards("train"))
    for name, sha in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == sha

    resumed = shard_corpus(big_jsonl, out, tok, resume=True, show_progress=False, **BIG_OPTIONS)
    assert resumed.data == full.data
    for split in ("train", "val"):
        for a, b in zip(full.shards(split), resumed.shards(split), strict=True):
            assert a.path.read_bytes() == b.path.read_bytes()
