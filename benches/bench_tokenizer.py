"""Encode speed: ferrolm vs gigatoken vs tiktoken vs Hugging Face tokenizers, side by side in one process.

    python benches/bench_tokenizer.py [--mb 4] [--repeat 3] [--vocab gpt2,cl100k,o200k] [--corpus prose,code,cjk]

Peers: pip install gigatoken tiktoken tokenizers (the script says which versions it ran).

Vocabularies (every library loads the same ranks):
- gpt2: GPT-2's release files from ../shared/data/gpt2 (50,257 tokens, GPT-2 pattern);
- cl100k / o200k: 100,000 / 200,000 ranks trained by ferrolm with the cl100k / o200k pattern on the
  training halves of the three corpora (cached in benches/.cache/; OpenAI's own rank files need a
  download, which this machine cannot do). Same patterns, same merge rule: what changes is which
  pieces are whole tokens.

Corpora (each split by file into a training half and an encoded half, so the encoded text is held out):
- prose: the Gutenberg Dickens books of ../shared/data (CRLF line ends kept);
- code: the Python standard library's own .py files (every Python installation has them);
- cjk: Chinese and Japanese manual pages (Debian's manpages-zh and manpages-ja), groff requests
  stripped: `apt-get install manpages-zh manpages-ja`.
Each encoded text is cut into ~4 KB documents at line ends.

Modes (the table of issue 14), all on the same documents:
- single, cold: one thread, each document encoded to a numpy array (ferrolm `encode_to_numpy`,
  gigatoken `encode`, tiktoken `encode_to_numpy`; tokenizers `encode`) by a fresh instance, one pass;
  the last column is ferrolm's `encode_ordinary` (Python lists, as tiktoken's `encode_ordinary`);
- single, warm: the same instance encodes the same documents again (its word caches are full);
- batch, 1 core, cold / warm; batch, all cores, cold (ferrolm `encode_batch_numpy`, gigatoken
  `encode_batch`, tiktoken `encode_ordinary_batch`, tokenizers `encode_batch`).
A cold run is one pass in a fresh process (best of --repeat processes; loading the vocabulary and a
first one-character encode are not timed): in one process a second instance of the same vocabulary
can share the first one's caches.
Plus the per-call cost of encoding a 10-byte string. Ids are checked identical (ferrolm = tiktoken
= gigatoken on every document, = tokenizers on the first 500) before anything is timed. Figures are
MB/s (UTF-8 bytes); ratios are ferrolm / peer (above 1: ferrolm is faster). Best of --repeat.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import gigatoken
import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

import ferrolm
from ferrolm import Tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CACHE = Path(__file__).resolve().parent / ".cache"
DOC_BYTES = 4096


# ----------------------------------------------------------------------------- corpora


def dickens_files() -> list[Path]:
    return sorted((DATA / "gutenberg" / "dickens").glob("*.txt"))


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def manpage_files() -> list[Path]:
    roots = [Path("/usr/share/man") / lang for lang in ("zh_CN", "zh_TW", "ja")]
    return sorted(p for root in roots for p in root.rglob("*.gz"))


GROFF_ESCAPE = re.compile(r"\\f[A-Z0-9]|\\f\([A-Z]{2}|\\\(..|\\[-e&|^%]|\\s[-+]?\d")


def read_text(path: Path) -> str:
    if path.suffix == ".gz":  # a manual page: drop groff requests and font escapes, keep the prose
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        lines = [GROFF_ESCAPE.sub("", line) for line in raw.splitlines() if not line.startswith((".", "'"))]
        return "\n".join(line for line in lines if line.strip()) + "\n"
    return path.read_bytes().decode("utf-8", errors="replace")


def corpus_files(name: str) -> list[Path]:
    files = {"prose": dickens_files, "code": stdlib_files, "cjk": manpage_files}[name]()
    if not files:
        raise SystemExit(f"corpus {name!r} has no files (see this script's docstring)")
    return files


def split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every other file trains, the rest is encoded: held out, and both halves span the corpus."""
    return files[0::2], files[1::2]


def documents(files: list[Path], megabytes: float) -> list[str]:
    docs, total = [], 0
    for path in files:
        text = read_text(path)
        start = 0
        while start < len(text):
            end = text.find("\n", start + DOC_BYTES)
            end = len(text) if end < 0 else end + 1
            docs.append(text[start:end])
            total += len(docs[-1].encode())
            start = end
            if total >= megabytes * 1e6:
                return docs
    return docs


# ----------------------------------------------------------------------------- vocabularies


def gpt2_rank_file() -> Path:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "gpt2.tiktoken"
    if not path.exists():
        Tokenizer.from_pretrained(DATA / "gpt2").save_tiktoken(path)
    return path


def trained_rank_file(pattern: str, vocab_size: int, train_mb: float) -> Path:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"{pattern}-style-{vocab_size}.tiktoken"
    if not path.exists():
        texts = CACHE / f"train-{pattern}.txt"
        with open(texts, "w", encoding="utf-8") as out:
            for corpus in ("prose", "code", "cjk"):
                out.write("".join(documents(split(corpus_files(corpus))[0], train_mb)))
        print(
            f"training a {vocab_size:,}-token {pattern}-style vocabulary on {texts} (cached)...", flush=True
        )
        started = time.perf_counter()
        # No special tokens: the rank file holds ranks 0..N-1 (gigatoken needs them dense).
        Tokenizer.train([str(texts)], vocab_size, pattern=pattern, special_tokens=[]).save_tiktoken(path)
        print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
        texts.unlink()
    return path


class Peers:
    """Loaders for one vocabulary: each call gives a fresh instance (empty caches)."""

    def __init__(self, name: str, rank_file: Path, pattern: str) -> None:
        self.name, self.rank_file, self.pattern = name, rank_file, pattern
        # Read here, not with tiktoken.load.load_tiktoken_bpe: that caches files by path (in
        # $TMPDIR/data-gym-cache) and would hand back a retrained file's previous ranks.
        lines = rank_file.read_bytes().splitlines()
        self.ranks = {
            base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)
        }
        self.ferrolm_pattern = self.ferrolm().pattern

    def ferrolm(self) -> Tokenizer:
        return Tokenizer.from_ranks(self.ranks, pattern=self.pattern)

    def tiktoken(self) -> tiktoken.Encoding:
        return tiktoken.Encoding(
            self.name, pat_str=self.ferrolm_pattern, mergeable_ranks=self.ranks, special_tokens={}
        )

    def gigatoken(self) -> gigatoken.Tokenizer:
        return gigatoken.Tokenizer.from_tiktoken(self.rank_file, pretokenizer=self.pattern)

    def tokenizers(self) -> tokenizers.Tokenizer:
        if self.name == "gpt2":  # the classic ByteLevel pipeline, as GPT-2 ships
            hf = tokenizers.Tokenizer(
                models.BPE.from_file(str(DATA / "gpt2/encoder.json"), str(DATA / "gpt2/vocab.bpe"))
            )
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            return hf
        path = CACHE / f"{self.rank_file.stem}.json"
        if not path.exists() or path.stat().st_mtime < self.rank_file.stat().st_mtime:
            self.ferrolm().save(path)
        return tokenizers.Tokenizer.from_file(str(path))


# ----------------------------------------------------------------------------- timing


def best_of(repeat: int, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
    """Least wall time of `repeat` calls of fn(state); setup() (not timed) makes a fresh state each time."""
    times = []
    for _ in range(repeat):
        state = setup() if setup else None
        started = time.perf_counter()
        fn(state) if setup else fn()  # type: ignore[call-arg]
        times.append(time.perf_counter() - started)
    return min(times)


def check_identical(peers: Peers, docs: list[str]) -> int:
    ours, tk, giga, hf = peers.ferrolm(), peers.tiktoken(), peers.gigatoken(), peers.tokenizers()
    tokens = 0
    for i, doc in enumerate(docs):
        want = tk.encode_ordinary(doc)
        assert ours.encode_ordinary(doc) == want, f"{peers.name} doc {i}: ferrolm != tiktoken"
        assert giga.encode(doc).tolist() == want, f"{peers.name} doc {i}: gigatoken != tiktoken"
        if i < 500:
            assert hf.encode(doc, add_special_tokens=False).ids == want, (
                f"{peers.name} doc {i}: tokenizers != tiktoken"
            )
        tokens += len(want)
    flat, offsets = ours.encode_batch_numpy(docs)
    want = [tk.encode_ordinary(d) for d in docs]
    assert [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(docs))] == want, "ferrolm batch"
    giga_batch = giga.encode_batch(docs, parallel=True)
    assert [list(row) for row in giga_batch] == want, "gigatoken batch"
    return tokens


COLD_MODES = ("single, cold", "batch, 1 core, cold", "batch, all cores, cold")


def cold_runs(peers: Peers, docs: list[str]) -> dict[str, dict[str, Callable[[object], object]]]:
    """{mode: {library: run(instance)}} for the cold modes."""
    cores = os.cpu_count() or 1

    def each(encode: Callable[[str], object]) -> None:
        for doc in docs:
            encode(doc)

    return {
        "single, cold": {
            "ferrolm": lambda t: each(t.encode_to_numpy),
            "ferrolm (lists)": lambda t: each(t.encode_ordinary),
            "gigatoken": lambda t: each(t.encode),
            "tiktoken": lambda t: each(t.encode_to_numpy),
            "tokenizers": lambda t: each(lambda d: t.encode(d, add_special_tokens=False)),
        },
        "batch, 1 core, cold": {
            "ferrolm": lambda t: t.encode_batch_numpy(docs, num_threads=1),
            "gigatoken": lambda t: t.encode_batch(docs, parallel=False),
            "tiktoken": lambda t: t.encode_ordinary_batch(docs, num_threads=1),
        },
        "batch, all cores, cold": {
            "ferrolm": lambda t: t.encode_batch_numpy(docs, num_threads=cores),
            "gigatoken": lambda t: t.encode_batch(docs, parallel=True),
            "tiktoken": lambda t: t.encode_ordinary_batch(docs, num_threads=cores),
            "tokenizers": lambda t: t.encode_batch(docs, add_special_tokens=False),
        },
    }


def make(peers: Peers, library: str, mode: str):  # type: ignore[no-untyped-def]
    """A fresh instance of `library`, its one-time setup done: the mode's own call on a one-character
    document (numpy's C API, a thread pool, awkward arrays: whatever that call loads on first use)."""
    instance = getattr(peers, library.split(" ")[0])()
    cold_runs(peers, ["x"])[mode.replace("warm", "cold")][library](instance)
    return instance


def time_cold(args: argparse.Namespace, vocab: str, corpus: str, mode: str, library: str) -> float:
    """Seconds of one cold run, each in a fresh process: in one process a second instance of the
    same vocabulary may share the first one's caches (gigatoken's do), which would make it warm."""
    command = [sys.executable, __file__, "--mb", str(args.mb), "--train-mb", str(args.train_mb)]
    command += ["--cold-child", vocab, corpus, mode, library]
    best = float("inf")
    for _ in range(args.repeat):
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        best = min(best, float(out.split()[-1]))
    return best


def cold_child(args: argparse.Namespace, vocab: str, corpus: str, mode: str, library: str) -> None:
    peers = vocabularies(args)[vocab]()
    docs = documents(split(corpus_files(corpus))[1], args.mb)
    run = cold_runs(peers, docs)[mode][library]
    instance = make(peers, library, mode)
    started = time.perf_counter()
    run(instance)
    print(time.perf_counter() - started)


def time_modes(
    args: argparse.Namespace, vocab: str, corpus: str, peers: Peers, docs: list[str]
) -> dict[str, dict[str, float]]:
    """{mode: {library: seconds}}: the cold modes in fresh processes, the warm ones here."""
    modes = {
        mode: {library: time_cold(args, vocab, corpus, mode, library) for library in libraries}
        for mode, libraries in cold_runs(peers, docs).items()
    }
    runs = cold_runs(peers, docs)
    for mode, cold_mode, libraries in [
        ("single, warm", "single, cold", ("ferrolm", "ferrolm (lists)", "gigatoken", "tiktoken")),
        ("batch, 1 core, warm", "batch, 1 core, cold", ("ferrolm", "gigatoken", "tiktoken")),
    ]:
        modes[mode] = {}
        for library in libraries:
            instance, run = make(peers, library, cold_mode), runs[cold_mode][library]
            run(instance)  # fills its caches
            modes[mode][library] = best_of(args.repeat, lambda: run(instance))  # noqa: B023
    order = [
        "single, cold",
        "single, warm",
        "batch, 1 core, cold",
        "batch, 1 core, warm",
        "batch, all cores, cold",
    ]
    return {mode: modes[mode] for mode in order}


def per_call(peers: Peers, calls: int = 200_000) -> dict[str, float]:
    """Nanoseconds per encode of a 10-byte string (warm: the same string each time)."""
    text = "hello worl"
    encoders = {
        "ferrolm": peers.ferrolm().encode_ordinary,
        "ferrolm (numpy)": peers.ferrolm().encode_to_numpy,
        "gigatoken": peers.gigatoken().encode,
        "tiktoken": peers.tiktoken().encode_ordinary,
    }
    out = {}
    for name, encode in encoders.items():
        encode(text)
        started = time.perf_counter()
        for _ in range(calls):
            encode(text)
        out[name] = (time.perf_counter() - started) / calls * 1e9
    return out


def vocabularies(args: argparse.Namespace) -> dict[str, Callable[[], Peers]]:
    return {
        "gpt2": lambda: Peers("gpt2", gpt2_rank_file(), "gpt2"),
        "cl100k": lambda: Peers("cl100k", trained_rank_file("cl100k", 100_000, args.train_mb), "cl100k"),
        "o200k": lambda: Peers("o200k", trained_rank_file("o200k", 200_000, args.train_mb), "o200k"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=4.0, help="MB of each corpus to encode (default 4)")
    parser.add_argument(
        "--train-mb", type=float, default=8.0, help="MB of each corpus to train on (default 8)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vocab", default="gpt2,cl100k,o200k")
    parser.add_argument("--corpus", default="prose,code,cjk")
    parser.add_argument("--cold-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs {DATA} (see ../shared/data/README.md)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.cold_child:
        return cold_child(args, *args.cold_child)
    print(
        f"ferrolm {ferrolm.__version__}, gigatoken {importlib.metadata.version('gigatoken')}, tiktoken "
        f"{importlib.metadata.version('tiktoken')}, tokenizers {tokenizers.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    corpora = {name: documents(split(corpus_files(name))[1], args.mb) for name in args.corpus.split(",")}
    worst: dict[str, tuple[float, str]] = {}
    for vocab in args.vocab.split(","):
        peers = vocabularies(args)[vocab]()
        for corpus, docs in corpora.items():
            megabytes = sum(len(d.encode()) for d in docs) / 1e6
            tokens = check_identical(peers, docs)
            print(
                f"\n### {vocab} on {corpus}: {megabytes:.1f} MB, {len(docs):,} documents, {tokens:,} tokens"
            )
            print(
                "| mode | ferrolm MB/s | gigatoken | ratio | tiktoken | ratio | tokenizers | ferrolm, lists |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for mode, seconds in time_modes(args, vocab, corpus, peers, docs).items():
                cells = [f"{megabytes / seconds['ferrolm']:.1f}"]
                for library in ("gigatoken", "tiktoken", "tokenizers", "ferrolm (lists)"):
                    if library not in seconds:
                        cells += ["-"] if library in ("tokenizers", "ferrolm (lists)") else ["-", "-"]
                        continue
                    cells.append(f"{megabytes / seconds[library]:.1f}")
                    if library in ("gigatoken", "tiktoken"):
                        cells.append(f"{seconds[library] / seconds['ferrolm']:.2f}x")
                print(f"| {mode} | " + " | ".join(cells) + " |", flush=True)
                if "gigatoken" in seconds:
                    ratio = seconds["gigatoken"] / seconds["ferrolm"]
                    if ratio < worst.get(mode, (float("inf"), ""))[0]:
                        worst[mode] = (ratio, f"{vocab} on {corpus}")
        calls = per_call(peers)
        print(
            f"\n{vocab}: ns per encode of a 10-byte string: "
            + ", ".join(f"{k} {v:.0f}" for k, v in calls.items())
        )
    print("\n### worst ratio vs gigatoken per mode (above 1: ferrolm is faster)")
    for mode, (ratio, where) in worst.items():
        print(f"- {mode}: {ratio:.2f}x ({where})")


if __name__ == "__main__":
    main()
