"""Sharding speed: `ferrolm shard` vs the usual pipeline and gigatoken, side by side, same vocabulary.

    python benches/bench_shard.py [--mb 49] [--workers 2] [--repeats 3]

The usual pipeline is nanoGPT's / llm.c's prepare script: JSON lines read in Python, documents sent
to a multiprocessing pool whose workers run tiktoken's `encode_ordinary` with the end-of-text token
put first, and the token arrays written with numpy as uint16. gigatoken (when installed): its own
file encoding, `Tokenizer.encode_files(JsonlFileSource([...]))` (files read, cut and encoded in Rust
on all cores; it returns an awkward array and writes nothing), then the same framing and uint16
files written with numpy. ferrolm runs with the same framing (`boundary="bos"`, the same token) and
also does what the peers do not: the seeded train/val split, safetensors shards with document
offsets, sha256 of every input and shard, fsync, the progress file for resume and the manifest.
All three token streams are checked identical before any figure is printed. Input: the Gutenberg
Dickens books (../shared/data) as JSON lines, one paragraph per document. Median of `--repeats`
runs taken in turns; prints input MB/s of each and ferrolm's speed-up.

gigatoken lives in its own environment here: run the script with an interpreter that has
gigatoken, tiktoken, numpy and this ferrolm (e.g. a venv whose .pth points at the peers' venv,
with ferrolm's wheel pip-installed into it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load

import ferrolm
from ferrolm.data import shard_corpus

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ENCODING: tiktoken.Encoding | None = None


def gpt2_tiktoken() -> tiktoken.Encoding:
    gpt2 = DATA / "gpt2"
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(gpt2 / "vocab.bpe"), str(gpt2 / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2",
        pat_str=ferrolm.tokenizer.GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


def tokenize(line: str) -> np.ndarray:
    """nanoGPT's fineweb.py `tokenize`: EOT first, then the document, as uint16."""
    assert ENCODING is not None
    tokens = [ENCODING.eot_token, *ENCODING.encode_ordinary(json.loads(line)["text"])]
    return np.array(tokens, dtype=np.uint16)


def usual_pipeline(jsonl: Path, out: Path, workers: int, shard_tokens: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buffer, filled, index = np.empty(shard_tokens, dtype=np.uint16), 0, 0
    with open(jsonl, encoding="utf-8") as lines, mp.get_context("fork").Pool(workers) as pool:
        for tokens in pool.imap(tokenize, lines, chunksize=16):
            while len(tokens):
                take = min(len(tokens), shard_tokens - filled)
                buffer[filled : filled + take] = tokens[:take]
                filled, tokens = filled + take, tokens[take:]
                if filled == shard_tokens:
                    buffer.tofile(out / f"shard_{index:05d}.bin")
                    filled, index = 0, index + 1
    if filled:
        buffer[:filled].tofile(out / f"shard_{index:05d}.bin")


def gigatoken_pipeline(tokenizer, jsonl: Path, out: Path, eot: int, shard_tokens: int) -> float:  # type: ignore[no-untyped-def]
    """gigatoken's file encoding, then EOT-first framing and uint16 files; returns the seconds of
    `encode_files` alone."""
    import awkward as ak
    import gigatoken

    started = time.perf_counter()
    rows = tokenizer.encode_files(gigatoken.JsonlFileSource([str(jsonl)]))
    encoded = time.perf_counter() - started
    ids = ak.to_numpy(ak.flatten(rows))
    counts = ak.to_numpy(ak.num(rows))
    stream = np.empty(len(ids) + len(counts), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(counts[:-1] + 1)])  # each document's EOT slot
    is_eot = np.zeros(len(stream), dtype=bool)
    is_eot[starts] = True
    stream[is_eot] = eot
    stream[~is_eot] = ids
    out.mkdir(parents=True, exist_ok=True)
    for index, first in enumerate(range(0, len(stream), shard_tokens)):
        stream[first : first + shard_tokens].tofile(out / f"shard_{index:05d}.bin")
    return encoded


def safetensors_tokens(path: Path) -> np.ndarray:
    """The `tokens` tensor of one ferrolm shard (the safetensors layout: an 8-byte header length,
    a JSON header of dtypes and offsets, then the data), without the safetensors package."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8 : 8 + length])["tokens"]
    begin, end = entry["data_offsets"]
    dtype = {"U16": np.uint16, "U32": np.uint32}[entry["dtype"]]
    return np.frombuffer(raw[8 + length + begin : 8 + length + end], dtype=dtype)


def make_jsonl(path: Path, megabytes: float) -> int:
    total = 0
    with open(path, "w", encoding="utf-8") as out:
        for book in sorted((DATA / "gutenberg" / "dickens").glob("*.txt")):
            for paragraph in book.read_bytes().decode("utf-8").split("\r\n\r\n"):
                if paragraph.strip():
                    out.write(json.dumps({"text": paragraph}) + "\n")
                    total += len(paragraph.encode())
            if total >= megabytes * 1e6:
                break
    return total


def main() -> None:
    global ENCODING
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=49.0, help="MB of text (default: all 49 MB of Dickens)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs {DATA}")
    ENCODING = gpt2_tiktoken()
    tok = ferrolm.Tokenizer.from_pretrained(DATA / "gpt2")
    work = Path(tempfile.mkdtemp(prefix="ferrolm-bench-shard-"))
    try:
        jsonl = work / "dickens.jsonl"
        text_bytes = make_jsonl(jsonl, args.mb)
        mb = jsonl.stat().st_size / 1e6
        shard_tokens = 10_000_000

        try:
            import gigatoken
        except ImportError:
            gigatoken = None
            print("gigatoken is not installed here: its row is left out")
        giga = None
        if gigatoken is not None:
            tok.save_tiktoken(work / "gpt2.tiktoken")
            giga = gigatoken.Tokenizer.from_tiktoken(work / "gpt2.tiktoken", pretokenizer="gpt2")

        runs: dict[str, list[float]] = {
            "usual": [],
            "gigatoken": [],
            "gigatoken encode_files": [],
            "ferrolm encoder": [],
            "ferrolm": [],
        }
        # Where ferrolm's time goes: its encoder alone on the same documents, already in memory.
        documents = [json.loads(line)["text"] for line in jsonl.read_text(encoding="utf-8").splitlines()]

        def timed(name: str, run: Callable[[], object]) -> object:
            started = time.perf_counter()
            result = run()
            runs[name].append(time.perf_counter() - started)
            return result

        for repeat in range(args.repeats):  # in turns: a slow spell of the shared machine hits all
            for d in ("usual", "giga", "ferrolm"):
                shutil.rmtree(work / d, ignore_errors=True)
            timed("usual", lambda: usual_pipeline(jsonl, work / "usual", args.workers, shard_tokens))
            timed("ferrolm encoder", lambda: tok.encode_batch_numpy(documents))
            if giga is not None:
                encoded = timed(
                    "gigatoken",
                    lambda: gigatoken_pipeline(giga, jsonl, work / "giga", tok.eot_token, shard_tokens),
                )
                runs["gigatoken encode_files"].append(encoded)  # type: ignore[arg-type]
            timed(
                "ferrolm",
                lambda: shard_corpus(
                    jsonl,
                    work / "ferrolm",
                    tok,
                    val_fraction=0.0,
                    shard_tokens=shard_tokens,
                    boundary="bos",
                    bos_token="<|endoftext|>",
                    show_progress=False,
                ),
            )
            if repeat == 0:
                streams = {
                    "usual": np.concatenate(
                        [np.fromfile(p, dtype=np.uint16) for p in sorted((work / "usual").glob("*.bin"))]
                    ),
                    "ferrolm": np.concatenate(
                        [
                            safetensors_tokens(p)
                            for p in sorted((work / "ferrolm").glob("train-*.safetensors"))
                        ]
                    ),
                }
                if giga is not None:
                    streams["gigatoken"] = np.concatenate(
                        [np.fromfile(p, dtype=np.uint16) for p in sorted((work / "giga").glob("*.bin"))]
                    )
                for name, stream in streams.items():
                    assert np.array_equal(stream, streams["ferrolm"]), f"{name} and ferrolm disagree"
        ours = statistics.median(runs["ferrolm"])
        print(
            f"input: {mb:.1f} MB of JSON lines ({text_bytes / 1e6:.1f} MB of text), {len(streams['ferrolm']):,} tokens; "
            f"median of {args.repeats} runs, load average {os.getloadavg()[0]:.1f}"
        )
        print("| pipeline | seconds (range) | input MB/s | ferrolm speed-up |")
        print("|---|---:|---:|---:|")
        labels = {
            "usual": f"tiktoken + multiprocessing({args.workers}) + numpy",
            "gigatoken": "gigatoken encode_files + numpy framing and files",
            "gigatoken encode_files": "gigatoken encode_files alone (nothing written)",
            "ferrolm encoder": "ferrolm encode_batch_numpy alone (documents in memory, nothing written)",
        }
        for name, label in labels.items():
            if runs[name]:
                t = statistics.median(runs[name])
                print(
                    f"| {label} | {t:.2f} ({min(runs[name]):.2f}-{max(runs[name]):.2f}) | {mb / t:.1f} | {t / ours:.2f}x |"
                )
        print(
            f"| ferrolm shard ({ferrolm.get_num_threads()} threads) | {ours:.2f} ({min(runs['ferrolm']):.2f}-"
            f"{max(runs['ferrolm']):.2f}) | {mb / ours:.1f} | 1.00x |"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
