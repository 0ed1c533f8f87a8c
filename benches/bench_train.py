"""Training speed: ferrolm's BPE trainer vs Hugging Face tokenizers' BpeTrainer, side by side.

    python benches/bench_train.py [--vocab 32768 65536] [--large-mb 200] [--skip-large] [--repeat 1]

Both train a byte-level BPE vocabulary with the same pre-tokenization (the cl100k pattern:
HF ``Split(pattern, "isolated")`` + ``ByteLevel(use_regex=False)``, the byte-level initial alphabet,
special token ``<|endoftext|>``), reading the same files themselves (``tokenizer.train(files)``), on
all cores. Each run is a fresh process: wall time of the training call, and that process's peak
resident memory (``VmHWM`` of the child, interpreter included: ~10 MB for both). Files are read
once before the runs so both find them in the page cache.

Corpora:
- ``gutenberg``: the Dickens books in ../shared/data, every 10th book held out;
- ``large``: those books followed by other text found on the machine (tinyshakespeare, Rust crate
  sources in ~/.cargo/registry, Python sources of the Google Cloud SDK) up to ``--large-mb``,
  written once to benches/.cache/large.txt.

Compression: bytes per token of each trained vocabulary on the held-out books (encoded by its own
library). The two vocabularies are also compared merge for merge.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE = Path(__file__).resolve().parent / ".cache"
EXTRA_ROOTS = [
    DATA / "tinyshakespeare",
    Path.home() / ".cargo" / "registry" / "src",
    Path("/usr/lib/google-cloud-sdk"),
]
EXTRA_SUFFIXES = (".txt", ".md", ".rs", ".py")

CHILD = r"""
import json, sys, time
kind, out, vocab, *files = sys.argv[1:]
vocab = int(vocab)
if kind == "ferrolm":
    import ferrolm
    started = time.perf_counter()
    tok = ferrolm.Tokenizer.train(files, vocab, pattern="cl100k", special_tokens=["<|endoftext|>"],
                                  show_progress=False)
    seconds = time.perf_counter() - started
    tok.save(out)
else:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from ferrolm import _core
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_core.hf_pattern("cl100k")), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    started = time.perf_counter()
    tok.train(files, trainer)
    seconds = time.perf_counter() - started
    tok.save(out)
# Peak resident memory of this process image (ru_maxrss would include the parent's, via vfork).
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mb": peak_kb / 1024}))
"""


def books() -> tuple[list[Path], list[Path]]:
    files = sorted((DATA / "gutenberg" / "dickens").glob("*.txt"))
    held_out = files[::10]
    return [f for f in files if f not in held_out], held_out


def large_corpus(train_books: list[Path], megabytes: float) -> Path:
    path = CACHE / f"large-{int(megabytes)}mb.txt"
    if path.exists():
        return path
    CACHE.mkdir(exist_ok=True)
    limit = megabytes * 1e6
    total = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:

        def add(source: Path) -> None:
            nonlocal total
            data = source.read_bytes()
            out.write(data if data.endswith(b"\n") else data + b"\n")
            total += len(data)

        for book in train_books:
            add(book)
        for root in EXTRA_ROOTS:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    if total >= limit:
                        break
                    if name.endswith(EXTRA_SUFFIXES):
                        add(Path(dirpath, name))
    tmp.rename(path)
    return path


def run(kind: str, files: list[Path], vocab: int, out: Path) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, kind, str(out), str(vocab), *map(str, files)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"{kind} failed with exit code {proc.returncode}")
    return json.loads(output.strip().splitlines()[-1])


def best(repeat: int, kind: str, files: list[Path], vocab: int, out: Path) -> dict:
    """Fastest of `repeat` runs (the machine may be shared), with the largest peak memory."""
    runs = [run(kind, files, vocab, out) for _ in range(repeat)]
    return {"seconds": min(r["seconds"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs)}


def bytes_per_token(kind: str, tokenizer_json: Path, held_out: list[Path]) -> float:
    texts = [p.read_bytes().decode("utf-8") for p in held_out]
    size = sum(len(t.encode()) for t in texts)
    if kind == "ferrolm":
        import ferrolm

        tok = ferrolm.Tokenizer.from_pretrained(tokenizer_json)
        n = sum(len(ids) for ids in tok.encode_ordinary_batch(texts))
    else:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        n = sum(len(e.ids) for e in tok.encode_batch(texts))
    return size / n


def same_model(a: Path, b: Path) -> bool:
    def model(p: Path):  # type: ignore[no-untyped-def]
        root = json.loads(p.read_text())
        vocab = dict(root["model"]["vocab"], **{t["content"]: t["id"] for t in root["added_tokens"]})
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in root["model"]["merges"]]
        return vocab, merges

    return model(a) == model(b)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--large-mb", type=float, default=200)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per trainer; the fastest counts")
    args = parser.parse_args()

    import tokenizers

    import ferrolm

    train_books, held_out = books()
    corpora = {"gutenberg": train_books}
    if not args.skip_large:
        corpora["large"] = [large_corpus(train_books, args.large_mb)]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"ferrolm {ferrolm.__version__} ({ferrolm.get_num_threads()} threads), tokenizers {tokenizers.__version__}"
    )
    print(
        "| corpus | MB | vocab | ferrolm s | HF s | speed-up | ferrolm peak MB | HF peak MB | "
        "bytes/token ferrolm | bytes/token HF | identical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, files in corpora.items():
            megabytes = sum(f.stat().st_size for f in files) / 1e6
            for f in files:  # warm the page cache
                with open(f, "rb") as handle:
                    while handle.read(1 << 24):
                        pass
            for vocab in args.vocab:
                outs = {k: Path(tmp, f"{name}-{vocab}-{k}.json") for k in ("ferrolm", "hf")}
                ours = best(args.repeat, "ferrolm", files, vocab, outs["ferrolm"])
                theirs = best(args.repeat, "hf", files, vocab, outs["hf"])
                bpt = {k: bytes_per_token(k, outs[k], held_out) for k in outs}
                print(
                    f"| {name} | {megabytes:.0f} | {vocab} | {ours['seconds']:.2f} | {theirs['seconds']:.2f} | "
                    f"{theirs['seconds'] / ours['seconds']:.1f}x | {ours['peak_mb']:.0f} | {theirs['peak_mb']:.0f} | "
                    f"{bpt['ferrolm']:.4f} | {bpt['hf']:.4f} | {'yes' if same_model(*outs.values()) else 'NO'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
