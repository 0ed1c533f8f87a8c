"""Corpus sharding (and, next, packed-batch loading).

``shard_corpus`` turns raw text into tokenized shards plus a manifest; the format is described in
``docs/shards.md``. Every shard is a plain safetensors file:

>>> from safetensors.numpy import load_file                        # doctest: +SKIP
>>> shard = load_file("shards/train-00000.safetensors")            # doctest: +SKIP
>>> shard["tokens"], shard["doc_offsets"]                          # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferrolm import _inputs
from ferrolm._core import CoreShardWriter, FerrolmError
from ferrolm._files import atomic_write_json, copy_file_atomic, remove_stale_temporaries
from ferrolm._progress import ProgressLine
from ferrolm.loader import PackedLoader
from ferrolm.tokenizer import Tokenizer

__all__ = ["Manifest", "PackedLoader", "ShardInfo", "expand_inputs", "merge_shards", "shard_corpus"]

MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".ndjson", ".parquet")


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    tokens: int
    documents: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A shard directory's ``manifest.json``, read back."""

    directory: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, verify_files: bool = False) -> Manifest:
        """Read ``manifest.json``, validated by the core (format version, vocabulary size against
        the dtype, special ids, plain file names listed once, totals); ``verify_files`` also checks
        every shard's size and sha256."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.exists():
            raise FileNotFoundError(f"{path}: no manifest (not a shard directory, or an unfinished run)")
        data = json.loads(CoreShardWriter.read_manifest(os.fspath(directory), verify_files=verify_files))
        return cls(directory, data)

    @property
    def vocab_size(self) -> int:
        return int(self.data["vocab_size"])

    @property
    def dtype(self) -> str:
        return str(self.data["dtype"])

    @property
    def eos_id(self) -> int | None:
        return self.data["eos_id"]

    @property
    def bos_id(self) -> int | None:
        return self.data["bos_id"]

    @property
    def total_tokens(self) -> int:
        return int(self.data["total_tokens"])

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.data["skipped"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise KeyError(f"split {split!r} (this manifest has {sorted(self.data['splits'])})")
        return [
            ShardInfo(self.directory / s["file"], s["tokens"], s["documents"], s["bytes"], s["sha256"])
            for s in self.data["splits"][split]["shards"]
        ]

    def tokens(self, split: str) -> int:
        return int(self.data["splits"][split]["tokens"])

    def documents(self, split: str) -> int:
        return int(self.data["splits"][split]["documents"])

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_pretrained(self.directory / self.data["tokenizer"]["file"])


def expand_inputs(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files, directories (searched recursively for text / JSON lines / Parquet files, optionally
    .zst or .gz compressed, hidden ones skipped) and glob patterns -> a sorted list of distinct files
    (sorted: the shards do not depend on the order the inputs are named in). The rule for what an
    input names is ``ferrolm._inputs``' (the tokenizer trainer's too)."""
    return sorted({Path(p) for p in _inputs.expand_inputs(inputs, TEXT_SUFFIXES)})


class _Progress:
    """The sharding progress line on stderr: documents/s, MB/s, tokens so far, ETA by input bytes
    (redrawn on a terminal, plain lines in a log: ``ferrolm._progress``)."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.started = total_bytes, time.perf_counter()
        self.line = ProgressLine(enabled)

    def update(self, done_bytes: int, documents: int, tokens: int, final: bool = False) -> None:
        if not self.line.due(final):
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = done_bytes / elapsed
        eta = (self.total - done_bytes) / rate if rate > 0 else 0.0
        self.line.show(
            f"shard: {done_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  {documents:,} docs "
            f"({documents / elapsed:,.0f}/s)  {rate / 1e6:,.1f} MB/s  {tokens:,} tokens  "
            f"{'done in ' + format(elapsed, '.1f') + ' s' if final else 'ETA ' + format(eta, '.0f') + ' s'}",
            final=final,
        )


def shard_corpus(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    tokenizer: Tokenizer | str | os.PathLike[str],
    *,
    text_field: str = "text",
    val_fraction: float = 0.0005,
    shard_tokens: int = 100_000_000,
    seed: int = 0,
    boundary: str = "eos",
    eos_token: str | None = None,
    bos_token: str | None = None,
    dtype: str | None = None,
    text_split: str = "file",
    delimiter: str | None = None,
    on_bad_line: str = "skip",
    on_invalid_utf8: str = "replace",
    resume: bool = False,
    num_parts: int = 1,
    part: int = 0,
    show_progress: bool = True,
    num_threads: int | None = None,
) -> Manifest:
    """Tokenize a corpus into safetensors shards plus ``manifest.json`` (see docs/shards.md).

    ``inputs``: files, directories or globs of ``.txt`` (one document per file, or split by
    ``text_split="blank_lines"`` / ``"delimiter"``), ``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz`` and
    ``.parquet`` (column ``text_field``; needs pyarrow). Each document is encoded with
    ``encode_ordinary`` and followed by EOS (``boundary``: "eos", "bos", "both" or "none").
    Documents go to ``val`` by a seeded hash of their bytes (fraction ``val_fraction``).
    ``num_parts``/``part`` take a deterministic slice of the sorted input files (file i goes to part
    i % num_parts), for spreading one corpus over many jobs; join the parts with ``merge_shards``.
    ``resume=True`` finishes an interrupted run with output identical to an uninterrupted one.
    Bad JSON lines are skipped and counted (``on_bad_line="error"`` fails naming file:line);
    unreadable files always fail.
    """
    if on_bad_line not in ("skip", "error"):
        raise FerrolmError(f"on_bad_line must be 'skip' or 'error', got {on_bad_line!r}")
    if on_invalid_utf8 not in ("replace", "error"):
        raise FerrolmError(f"on_invalid_utf8 must be 'replace' or 'error', got {on_invalid_utf8!r}")
    if boundary not in ("eos", "bos", "both", "none"):
        raise FerrolmError(f"boundary must be 'eos', 'bos', 'both' or 'none', got {boundary!r}")
    if not (num_parts >= 1 and 0 <= part < num_parts):
        raise FerrolmError(f"part must be in [0, num_parts): got part={part}, num_parts={num_parts}")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(tokenizer)

    def special_id(name: str | None, role: str) -> int:
        if name is None:
            found = tokenizer.eot_token if role == "eos" else None
            if found is None:
                raise FerrolmError(f"boundary={boundary!r} needs a {role} token: pass {role}_token='<...>'")
            return found
        if name not in tokenizer.special_tokens:
            raise FerrolmError(f"{role}_token={name!r} is not a special token of the tokenizer")
        return tokenizer.special_tokens[name]

    eos = special_id(eos_token, "eos") if boundary in ("eos", "both") else None
    bos = special_id(bos_token or eos_token, "bos") if boundary in ("bos", "both") else None
    if dtype is None:
        dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"

    files = expand_inputs(inputs)[part::num_parts]
    if not files:
        raise FerrolmError(f"no input files for part {part} of {num_parts}")
    writer = CoreShardWriter(
        os.fspath(output_dir),
        tokenizer._core,
        tokenizer.to_json(),
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        seed=seed,
        bos=bos,
        eos=eos,
        dtype=dtype,
        resume=resume,
        num_threads=num_threads,
    )
    progress = _Progress(sum(p.stat().st_size for p in files), show_progress)
    records, done_bytes = [], 0
    for path in files:
        if _is_parquet(path):
            writer.begin_file(os.fspath(path))
            documents, size = _add_parquet(writer, path, text_field, on_bad_line)
        else:
            # Rust calls `within` while it reads the file (progress inside a large one); Ctrl-C
            # stops it there too, leaving only finished shards, which resume=True continues.
            def within(file_bytes: int, documents: int, tokens: int, before: int = done_bytes) -> None:
                progress.update(before + file_bytes, documents, tokens)

            documents, size = writer.add_file(
                os.fspath(path),
                text_field=text_field,
                text_split=text_split,
                delimiter=delimiter,
                strict_lines=on_bad_line == "error",
                strict_utf8=on_invalid_utf8 == "error",
                progress=within,
            )
        records.append((os.fspath(path), documents, size))
        done_bytes += path.stat().st_size
        progress.update(done_bytes, writer.documents_read, writer.tokens_so_far)
    progress.update(done_bytes, writer.documents_read, writer.tokens_so_far, final=True)
    # The manifest the writer just wrote, as it wrote it (Manifest.load would re-read it and
    # re-check the tokenizer this run copied there: 0.13 s for GPT-2's).
    manifest = Manifest(Path(output_dir), json.loads(writer.finish(records)))
    if val_fraction > 0 and manifest.documents("val") == 0:
        # The split is by document hash: a small corpus can draw no validation document at all,
        # and training would then skip validation without a word.
        documents = manifest.documents("train")
        warnings.warn(
            f"val_fraction={val_fraction} put none of the {documents:,} document(s) in the val split "
            f"of {output_dir}, so training will not validate: for about 3 val documents use "
            f"val_fraction={min(0.5, 3 / max(documents, 1)):.2g}",
            UserWarning,
            stacklevel=2,
        )
    return manifest


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(".parquet")


def _add_parquet(writer: CoreShardWriter, path: Path, text_field: str, on_bad_line: str) -> tuple[int, int]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FerrolmError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise FerrolmError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
    documents, row = 0, 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        texts = batch.column(0).to_pylist()
        good = [t for t in texts if isinstance(t, str)]
        bad = len(texts) - len(good)
        if bad and on_bad_line == "error":
            index = next(i for i, t in enumerate(texts) if not isinstance(t, str))
            raise FerrolmError(f"{path}: row {row + index}: column {text_field!r} is not a string")
        writer.count_bad_lines(bad)
        writer.add_documents(good)
        documents += len(good)
        row += len(texts)
    return documents, path.stat().st_size


def merge_shards(part_dirs: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str]) -> Manifest:
    """Join the shard directories of ``shard_corpus(..., num_parts=N, part=i)`` runs into one.

    Shards are hard-linked (copied across file systems) into ``output_dir`` in part order and
    renumbered; the joined manifest is written last. Every part is validated first (file names
    inside its directory, sizes and sha256 of every shard): nothing is linked from a part that
    names a path outside it or whose files differ from its manifest."""
    parts = [Manifest.load(d, verify_files=True) for d in part_dirs]
    if not parts:
        raise FerrolmError("merge_shards needs at least one part directory")
    first = parts[0].data
    for other in parts[1:]:
        for key in ("tokenizer", "dtype", "bos_id", "eos_id", "seed", "val_fraction", "vocab_size"):
            if other.data[key] != first[key]:
                raise FerrolmError(
                    f"{other.directory}: {key} is {other.data[key]!r} but {parts[0].directory} has {first[key]!r}; "
                    "only parts of the same run can be merged"
                )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        raise FerrolmError(f"{out / MANIFEST} exists: choose an empty directory")
    remove_stale_temporaries(out)  # what a killed merge left half-copied (only ours: see ferrolm._files)
    copy_file_atomic(parts[0].directory / first["tokenizer"]["file"], out / first["tokenizer"]["file"])
    merged = {k: v for k, v in first.items() if k not in ("splits", "inputs", "skipped")}
    merged["splits"], merged["inputs"] = {}, []
    merged["skipped"] = {k: sum(p.data["skipped"][k] for p in parts) for k in first["skipped"]}
    for key in ("total_tokens", "total_documents", "documents_read", "input_bytes"):
        merged[key] = sum(p.data[key] for p in parts)
    for split in first["splits"]:
        shards = []
        for manifest in parts:
            for shard in manifest.data["splits"][split]["shards"]:
                name = f"{split}-{len(shards):05d}.safetensors"
                _link_or_copy(manifest.directory / shard["file"], out / name)
                shards.append({**shard, "file": name})
        merged["splits"][split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
    for manifest in parts:
        merged["inputs"] += manifest.data["inputs"]
    atomic_write_json(out / MANIFEST, merged, indent=2)  # last: its presence means the merge is complete
    return Manifest.load(out)


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # another file system: a copy
        copy_file_atomic(source, target)
