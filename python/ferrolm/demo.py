"""``ferrolm demo``: the main job on a corpus every Python installation carries.

Stages (each is the same code path the CLI and the API use on a user's own data):
1. corpus  - Python's standard library sources (or ``--corpus PATH``), split by whole file into
             train (90%) and held-out (10%);
2. train   - a byte-level BPE vocabulary on the train files (cl100k pattern);
3. save    - ``tokenizer.json`` (Hugging Face format) and ``tokenizer.tiktoken``, then reload both;
4. encode  - the held-out files on all cores; compression, speed, and an exact round trip.
Later stages (sharding, pretraining, fine-tuning) join as they are built.
"""

from __future__ import annotations

import sysconfig
import time
from pathlib import Path

from ferrolm.tokenizer import Tokenizer

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".jsonl", ".zst"}


def stdlib_files() -> list[Path]:
    """The interpreter's own standard library: .py files, sorted, no third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)


def corpus_files(corpus: str | None, max_mb: float) -> list[Path]:
    if corpus is None:
        candidates = stdlib_files()
    else:
        root = Path(corpus)
        if not root.exists():
            raise FileNotFoundError(f"--corpus {corpus}: no such file or directory")
        candidates = (
            [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES)
        )
    chosen, total = [], 0
    for path in candidates:
        chosen.append(path)
        total += path.stat().st_size
        if total >= max_mb * 1e6:
            break
    if not chosen:
        raise ValueError(f"--corpus {corpus}: no text files found (looked for {sorted(TEXT_SUFFIXES)})")
    return chosen


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def run_demo(out: Path, corpus: str | None = None, vocab_size: int = 4096, max_mb: float = 8.0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict = {}

    started = time.perf_counter()
    files = corpus_files(corpus, max_mb)
    # Every 10th file is held out: whole files, so no text is both trained on and evaluated.
    held_out = files[::10] if len(files) >= 10 else files[-1:]
    train = [p for p in files if p not in set(held_out)] or files
    train_mb = sum(p.stat().st_size for p in train) / 1e6
    print(f"[1/4] corpus: {len(files)} files ({train_mb:.1f} MB train, {len(held_out)} files held out)")
    print(f"      from {'the Python standard library' if corpus is None else corpus}")
    timings["corpus"] = time.perf_counter() - started

    started = time.perf_counter()
    print(f"[2/4] training a {vocab_size}-token byte-level BPE vocabulary (cl100k pattern)")
    tok = Tokenizer.train([str(p) for p in train], vocab_size, pattern="cl100k", show_progress=True)
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    json_path, tiktoken_path = out / "tokenizer.json", out / "tokenizer.tiktoken"
    tok.save(json_path)
    tok.save_tiktoken(tiktoken_path)
    from_json = Tokenizer.from_pretrained(json_path)
    from_tiktoken = Tokenizer.from_pretrained(
        tiktoken_path, pattern="cl100k", special_tokens=tok.special_tokens
    )
    print(f"[3/4] saved {json_path} and {tiktoken_path}; reloaded both")
    timings["save"] = time.perf_counter() - started

    started = time.perf_counter()
    texts = [_read(p) for p in held_out]
    held_bytes = sum(len(t.encode()) for t in texts)
    encode_started = time.perf_counter()
    tokens, offsets = from_json.encode_batch_numpy(texts, disallowed_special=())
    encode_seconds = time.perf_counter() - encode_started
    ids_per_text = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
    round_trip = all(from_json.decode(ids) == text for ids, text in zip(ids_per_text, texts, strict=True))
    formats_agree = from_tiktoken.encode_ordinary_batch(texts) == [ids.tolist() for ids in ids_per_text]
    timings["encode"] = time.perf_counter() - started

    sample = next((line for line in texts[0].splitlines() if len(line.strip()) > 30), texts[0][:80]).strip()
    pieces = [
        from_json.decode_single_token_bytes(i).decode("utf-8", "replace") for i in from_json.encode(sample)
    ]
    results = {
        "vocab_size": tok.vocab_size,
        "held_out_bytes": held_bytes,
        "held_out_tokens": len(tokens),
        "bytes_per_token": held_bytes / max(len(tokens), 1),
        "encode_mb_per_s": held_bytes / 1e6 / max(encode_seconds, 1e-9),
        "round_trip": round_trip,
        "formats_agree": formats_agree,
        "timings": timings,
        "outputs": {"tokenizer.json": str(json_path), "tokenizer.tiktoken": str(tiktoken_path)},
    }
    print(f"[4/4] encoded {held_bytes / 1e6:.2f} MB held out -> {len(tokens):,} tokens")
    print()
    print("summary")
    print(f"  vocabulary         {tok.vocab_size} tokens, special: {', '.join(tok.special_tokens)}")
    print(f"  compression        {results['bytes_per_token']:.2f} bytes/token on held-out files")
    print(f"  encode speed       {results['encode_mb_per_s']:.1f} MB/s (batch, all cores)")
    print(f"  round trip         {'exact' if round_trip else 'FAILED'}")
    print(f"  json == tiktoken   {'identical ids' if formats_agree else 'DIFFERENT'}")
    print(f"  sample             {' | '.join(pieces[:24])}")
    print("  stage times        " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"  outputs            {out}/")
    if not (round_trip and formats_agree):
        raise RuntimeError("demo check failed: see the summary above")
    return results
