"""Sharding speed: `ferrolm shard` vs the usual pipeline, side by side, same vocabulary.

    python benches/bench_shard.py [--mb 49] [--workers 2]

The usual pipeline is nanoGPT's / llm.c's prepare script: JSON lines read in Python, documents sent
to a multiprocessing pool whose workers run tiktoken's `encode_ordinary` with the end-of-text token
put first, and the token arrays written with numpy as uint16. ferrolm runs with the same framing
(`boundary="bos"`, the same token) so both produce the same token stream, which is checked.
Input: the Gutenberg Dickens books (../shared/data) as JSON lines, one paragraph per document.
Prints input MB/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
from safetensors.numpy import load_file

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

        started = time.perf_counter()
        usual_pipeline(jsonl, work / "usual", args.workers, shard_tokens)
        usual = time.perf_counter() - started

        started = time.perf_counter()
        shard_corpus(
            jsonl,
            work / "ferrolm",
            tok,
            val_fraction=0.0,
            shard_tokens=shard_tokens,
            boundary="bos",
            bos_token="<|endoftext|>",
            show_progress=False,
        )
        ours = time.perf_counter() - started

        usual_tokens = np.concatenate(
            [np.fromfile(p, dtype=np.uint16) for p in sorted((work / "usual").glob("*.bin"))]
        )
        our_tokens = np.concatenate(
            [load_file(str(p))["tokens"] for p in sorted((work / "ferrolm").glob("train-*.safetensors"))]
        )
        assert np.array_equal(usual_tokens, our_tokens), "the two pipelines disagree"
        print(
            f"input: {mb:.1f} MB of JSON lines ({text_bytes / 1e6:.1f} MB of text), {len(our_tokens):,} tokens"
        )
        print("| pipeline | seconds | input MB/s | ferrolm speed-up |")
        print("|---|---:|---:|---:|")
        print(
            f"| tiktoken + multiprocessing({args.workers}) + numpy | {usual:.2f} | {mb / usual:.1f} | {usual / ours:.2f}x |"
        )
        print(
            f"| ferrolm shard ({ferrolm.get_num_threads()} threads) | {ours:.2f} | {mb / ours:.1f} | 1.00x |"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
