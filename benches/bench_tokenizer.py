"""Encode speed: ferrolm vs tiktoken vs Hugging Face tokenizers, side by side in one process.

    python benches/bench_tokenizer.py [--mb 8] [--repeat 3]

Needs ../shared/data (GPT-2's release files and the Gutenberg Dickens books). Two vocabularies:
- GPT-2 (50,257 tokens, gpt2 pattern) from its original release files;
- a cl100k-style one: 100,000 tokens trained with the cl100k pattern by Hugging Face's BpeTrainer on
  Dickens books that are NOT in the encoded text (cached in benches/.cache/).
For each: single-thread encode of the whole text, and batch encode of its paragraphs on all cores.
All outputs are checked to be identical before any figure is printed. Prints MB/s and ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import tiktoken
import tiktoken.load
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

import ferrolm
from ferrolm import Tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE = Path(__file__).resolve().parent / ".cache"


def best_of(repeat: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def dickens_files() -> list[Path]:
    return sorted((DATA / "gutenberg" / "dickens").glob("*.txt"))


def load_text(files: list[Path], megabytes: float) -> str:
    chunks, total = [], 0
    for path in files:
        text = path.read_bytes().decode("utf-8")  # keeps the books' CRLF line ends
        chunks.append(text)
        total += len(text.encode())
        if total >= megabytes * 1e6:
            break
    return "".join(chunks)


def gpt2_peers():  # type: ignore[no-untyped-def]
    gpt2 = DATA / "gpt2"
    ours = Tokenizer.from_pretrained(gpt2)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(gpt2 / "vocab.bpe"), str(gpt2 / "encoder.json"))
    tk = tiktoken.Encoding(
        "gpt2", pat_str=ours.pattern, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256}
    )
    hf = tokenizers.Tokenizer(models.BPE.from_file(str(gpt2 / "encoder.json"), str(gpt2 / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return ours, tk, hf


def cl100k_style_peers(train_files: list[Path]):  # type: ignore[no-untyped-def]
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "cl100k-style-100k.json"
    if not path.exists():
        print(f"training a 100k cl100k-style vocabulary with HF on {len(train_files)} files (cached)...")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(ferrolm._core.hf_pattern("cl100k")), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=100_000,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train([str(p) for p in train_files], trainer=trainer)
        hf.save(str(path))
    hf = tokenizers.Tokenizer.from_file(str(path))
    loaded = Tokenizer.from_pretrained(path)
    specials = loaded.special_tokens
    ranks = {
        loaded.decode_single_token_bytes(i): i for i in range(loaded.vocab_size) if i not in specials.values()
    }
    # tiktoken runs rank-based BPE; so does ferrolm's from_ranks (identical to tiktoken by test).
    ours = Tokenizer.from_ranks(ranks, pattern="cl100k", special_tokens=specials)
    tk = tiktoken.Encoding(
        "cl100k-style", pat_str=ours.pattern, mergeable_ranks=ranks, special_tokens=specials
    )
    return ours, tk, hf, loaded


def run(name: str, ours, tk, hf, text: str, docs: list[str], repeat: int, hf_ours=None) -> list[str]:  # type: ignore[no-untyped-def]
    hf_ours = hf_ours or ours
    mb = len(text.encode()) / 1e6
    threads = ferrolm.get_num_threads()
    # Correctness first: identical ids everywhere.
    expected = tk.encode_ordinary(text)
    assert ours.encode_ordinary(text) == expected, f"{name}: ferrolm != tiktoken"
    hf_ids = [hf.encode(d, add_special_tokens=False).ids for d in docs[:2000]]
    assert hf_ids == [hf_ours.encode_ordinary(d) for d in docs[:2000]], f"{name}: ferrolm != tokenizers"
    assert ours.encode_ordinary_batch(docs) == tk.encode_ordinary_batch(docs, num_threads=threads)

    single = {
        "ferrolm": best_of(repeat, lambda: ours.encode_ordinary(text)),
        "tiktoken": best_of(repeat, lambda: tk.encode_ordinary(text)),
        "tokenizers": best_of(repeat, lambda: [hf.encode(d, add_special_tokens=False) for d in docs]),
    }
    batch = {
        "ferrolm": best_of(repeat, lambda: ours.encode_ordinary_batch(docs)),
        "ferrolm (numpy)": best_of(repeat, lambda: ours.encode_batch_numpy(docs)),
        "tiktoken": best_of(repeat, lambda: tk.encode_ordinary_batch(docs, num_threads=threads)),
        "tokenizers": best_of(repeat, lambda: hf.encode_batch(docs, add_special_tokens=False)),
    }
    lines = [f"### {name}: {mb:.1f} MB, {len(expected):,} tokens, {len(docs):,} documents", ""]
    lines.append("| mode | library | MB/s | ferrolm speed-up |")
    lines.append("|---|---|---:|---:|")
    for mode, table in [("single thread", single), (f"batch, {threads} threads", batch)]:
        for lib, seconds in table.items():
            ratio = seconds / table["ferrolm"]
            lines.append(f"| {mode} | {lib} | {mb / seconds:.1f} | {ratio:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=8.0, help="MB of text to encode (default 8)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs {DATA} (see ../shared/data/README.md)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    files = dickens_files()
    # Encode the first books; train the cl100k-style vocabulary on the last ones (held out).
    text = load_text(files, args.mb)
    docs = [p for p in text.split("\r\n\r\n") if p]
    print(
        f"ferrolm {ferrolm.__version__}, tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    out = run("GPT-2 (50,257 tokens)", *gpt2_peers(), text, docs, args.repeat)
    ours, tk, hf, loaded = cl100k_style_peers(files[-30:])
    out += [""] + run("cl100k-style (100,000 tokens)", ours, tk, hf, text, docs, args.repeat, hf_ours=loaded)
    print("\n".join(out))


if __name__ == "__main__":
    main()
