"""``ferrolm demo``: the main job end to end, on a corpus every Python installation carries.

Each stage calls the same function the command line calls on a user's own data:

1. corpus    - Python's standard library sources (or ``--corpus PATH``), files spread over the whole
               tree up to ``max_mb``;
2. tokenizer - ``Tokenizer.train``: a byte-level BPE vocabulary (cl100k pattern), saved as
               ``tokenizer.json`` and ``tokenizer.tiktoken``, both reloaded and checked to agree;
3. shard     - ``shard_corpus``: one document per file, a validation split by hash;
4. pretrain  - ``pretrain``: a small GPT with a falling validation loss, ``loss.png``;
5. generate  - ``generate_tokens``: a sample continuation of a prompt;
6. fine-tune - ``finetune``: a classifier for a labelled task derived from the corpus: which package
               a snippet of code comes from (``asyncio``, ``email``, ``unittest``, ``xml``; with
               ``--corpus``, the corpus's top-level directories), split by whole file;
7. evaluate  - ``evaluate`` on held-out files: accuracy, macro-F1, confusion matrix.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferrolm._files import atomic_write_text
from ferrolm.tokenizer import Tokenizer

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".jsonl", ".zst"}
# Standard-library packages for the classification task: present in every CPython, each large
# enough for hundreds of snippets, and different enough in vocabulary for a small model.
STDLIB_PACKAGES = ("asyncio", "email", "unittest", "xml")
SNIPPET_CHARS = (160, 480)  # a snippet joins consecutive blocks until it has at least 160 characters
PROMPT = "def __init__(self"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The interpreter's own standard library: .py files, sorted, no tests, no third-party packages."""
    root = stdlib_root()
    return sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "test", "tests"} & set(p.relative_to(root).parts)
    )


def corpus_files(corpus: str | None, max_mb: float) -> list[Path]:
    """The corpus's text files, spread evenly over the sorted list (every k-th) to stay under max_mb,
    so a capped corpus still covers the whole tree rather than its first letters."""
    if corpus is None:
        candidates = stdlib_files()
    else:
        root = Path(corpus)
        if not root.exists():
            raise FileNotFoundError(f"--corpus {corpus}: no such file or directory")
        candidates = (
            [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES)
        )
    if not candidates:
        raise ValueError(f"--corpus {corpus}: no text files found (looked for {sorted(TEXT_SUFFIXES)})")
    total = sum(p.stat().st_size for p in candidates)
    stride = max(1, math.ceil(total / (max_mb * 1e6)))
    return candidates[::stride]


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------
# The labelled task


def snippets(text: str) -> list[str]:
    """Consecutive blank-line-separated blocks joined until each snippet has 160-480 characters."""
    found, current = [], ""
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if not block.strip():
            continue
        current = f"{current}\n\n{block}" if current else block
        if len(current) >= SNIPPET_CHARS[0]:
            found.append(current[: SNIPPET_CHARS[1]])
            current = ""
    return found


def labelled_files(corpus: str | None) -> dict[str, list[Path]]:
    """label -> files: stdlib packages, or a user corpus's top-level directories."""
    if corpus is None:
        root = stdlib_root()
        return {
            name: sorted((root / name).rglob("*.py")) for name in STDLIB_PACKAGES if (root / name).is_dir()
        }
    root = Path(corpus)
    if not root.is_dir():
        return {}
    return {
        d.name: sorted(p for p in d.rglob("*") if p.suffix in TEXT_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir()
    }


def write_task(out: Path, corpus: str | None, per_class: int, seed: int = 0) -> dict[str, Path] | None:
    """train/dev/test JSON lines (``text``, ``label``) for the classification stage, or None when the
    corpus has fewer than two labels with snippets. Files, not snippets, are split (every 5th file to
    test, the next to dev), so no test snippet shares a file with a training one; each class is capped
    at ``per_class`` training snippets (and a quarter of that for dev and test) to keep it balanced."""
    by_label = labelled_files(corpus)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "dev": [], "test": []}
    rng = random.Random(seed)
    for label, files in by_label.items():
        split_snippets: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
        for i, path in enumerate(files):
            split = "test" if i % 5 == 0 else "dev" if i % 5 == 1 else "train"
            split_snippets[split].extend(snippets(_read(path)))
        if not all(split_snippets.values()):
            continue  # too few files for all three splits
        for split, found in split_snippets.items():
            rng.shuffle(found)
            cap = per_class if split == "train" else max(1, per_class // 4)
            rows[split].extend({"text": text, "label": label} for text in found[:cap])
    if len({row["label"] for row in rows["train"]}) < 2:
        return None
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, split_rows in rows.items():
        rng.shuffle(split_rows)
        paths[split] = out / f"{split}.jsonl"
        atomic_write_text(paths[split], "".join(json.dumps(row) + "\n" for row in split_rows))
    return paths


# ----------------------------------------------------------------------------------------------------
# The stages


def run_demo(
    out: Path,
    corpus: str | None = None,
    vocab_size: int = 4096,
    max_mb: float = 8.0,
    *,
    pretrain_steps: int = 300,
    finetune_epochs: int = 3,
    per_class: int = 300,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Run every stage into ``out`` and return the figures the summary prints."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"timings": timings, "outputs": {}}
    stages = 7

    def stage(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        value = work()
        timings[name] = time.perf_counter() - started
        print(f"      ({timings[name]:.1f} s)")
        return value

    # 1. corpus -------------------------------------------------------------------------------------
    files = corpus_files(corpus, max_mb)
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    source = "the Python standard library" if corpus is None else corpus
    print(f"[1/{stages}] corpus: {len(files)} files, {total_mb:.1f} MB from {source}")

    # 2. tokenizer ----------------------------------------------------------------------------------
    print(f"[2/{stages}] tokenizer: training a {vocab_size}-token byte-level BPE vocabulary (cl100k pattern)")

    def train_tokenizer() -> dict[str, Any]:
        tok = Tokenizer.train([str(p) for p in files], vocab_size, pattern="cl100k", show_progress=True)
        json_path, tiktoken_path = out / "tokenizer.json", out / "tokenizer.tiktoken"
        tok.save(json_path)
        tok.save_tiktoken(tiktoken_path)
        from_json = Tokenizer.from_pretrained(json_path)
        from_tiktoken = Tokenizer.from_pretrained(
            tiktoken_path, pattern="cl100k", special_tokens=tok.special_tokens
        )
        texts = [_read(p) for p in files[::10]]
        from_json.encode_batch_numpy(texts[:2], disallowed_special=())  # imports numpy, starts the pool
        started = time.perf_counter()
        tokens, offsets = from_json.encode_batch_numpy(texts, disallowed_special=())
        seconds = time.perf_counter() - started
        ids = [tokens[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
        n_bytes = sum(len(t.encode()) for t in texts)
        results["outputs"]["tokenizer"] = str(json_path)
        results["outputs"]["tiktoken"] = str(tiktoken_path)
        return {
            "vocab_size": tok.vocab_size,
            "bytes_per_token": n_bytes / max(len(tokens), 1),
            "encode_mb_per_s": n_bytes / 1e6 / max(seconds, 1e-9),
            "round_trip": all(from_json.decode(i) == t for i, t in zip(ids, texts, strict=True)),
            "formats_agree": from_tiktoken.encode_ordinary_batch(texts) == [i.tolist() for i in ids],
        }

    results["tokenizer"] = stage("tokenizer", train_tokenizer)
    tok_figures = results["tokenizer"]
    print(
        f"      {tok_figures['bytes_per_token']:.2f} bytes/token, round trip "
        f"{'exact' if tok_figures['round_trip'] else 'FAILED'}, tokenizer.json == tiktoken file: "
        f"{'identical ids' if tok_figures['formats_agree'] else 'DIFFERENT'}"
    )

    # 3. shard --------------------------------------------------------------------------------------
    print(f"[3/{stages}] shard: tokenizing into safetensors shards on all cores")

    def shard() -> Any:
        from ferrolm.data import shard_corpus

        return shard_corpus(
            [str(p) for p in files], out / "shards", out / "tokenizer.json", val_fraction=0.05, seed=seed
        )

    manifest = stage("shard", shard)
    results["shards"] = {"train_tokens": manifest.tokens("train"), "val_tokens": manifest.tokens("val")}
    results["outputs"]["shards"] = str(out / "shards")
    print(
        f"      {manifest.tokens('train'):,} train tokens, {manifest.tokens('val'):,} val tokens "
        f"-> {out / 'shards'}"
    )

    # 4. pretrain -----------------------------------------------------------------------------------
    print(f"[4/{stages}] pretrain: a small GPT for {pretrain_steps} steps")

    def pretrain_model() -> dict[str, Any]:
        from ferrolm.train import TrainConfig, pretrain, read_metrics

        config = TrainConfig(
            data=str(out / "shards"),
            out=str(out / "pretrain"),
            preset="small",
            model=dict(n_layer=4, n_embd=128, n_head=4, block_size=128),
            batch_size=16,
            lr=3e-3,  # a small model tolerates a high peak rate and learns in few steps
            warmup=min(20, pretrain_steps // 5),
            max_steps=pretrain_steps,
            eval_interval=max(1, pretrain_steps // 5),
            eval_batches=8,
            checkpoint_interval=pretrain_steps,
            device=device,
            seed=seed,
        )
        summary = pretrain(config)
        val = [r["val_loss"] for r in read_metrics(out / "pretrain") if r["kind"] == "val"]
        return {**summary, "val_curve": val}

    results["pretrain"] = stage("pretrain", pretrain_model)
    curve = results["pretrain"]["val_curve"]
    results["outputs"]["pretrain"] = str(out / "pretrain")
    results["outputs"]["loss_plot"] = str(out / "pretrain" / "loss.png")
    print("      val loss " + " -> ".join(f"{v:.3f}" for v in curve))

    # 5. generate -----------------------------------------------------------------------------------
    print(f"[5/{stages}] generate: continuing {PROMPT!r}")

    def sample() -> str:
        from ferrolm.generate import generate_tokens, load_for_generation

        model, tok = load_for_generation(out / "pretrain")
        ids = tok.encode_ordinary(PROMPT)
        new = list(
            generate_tokens(model, ids, 48, temperature=0.7, top_k=40, seed=seed, eos_id=tok.eot_token)
        )
        return PROMPT + tok.decode([i for i in new if i != tok.eot_token])

    results["sample"] = stage("generate", sample)
    for line in results["sample"].splitlines()[:8]:
        print(f"      | {line}")

    # 6. fine-tune ----------------------------------------------------------------------------------
    task = write_task(out / "task", corpus, per_class, seed)
    if task is None:
        print(
            f"[6/{stages}] fine-tune: skipped (the corpus needs two or more top-level directories as labels)"
        )
        print(f"[7/{stages}] evaluate: skipped")
    else:
        counts = {split: path.read_text(encoding="utf-8").count("\n") for split, path in task.items()}
        for split, path in task.items():
            results["outputs"][f"task_{split}"] = str(path)
        question = "which package" if corpus is None else "which top-level directory"
        print(
            f"[6/{stages}] fine-tune: {question} does a snippet come from? "
            f"({counts['train']} train / {counts['dev']} dev / {counts['test']} test snippets)"
        )

        def classify() -> dict[str, Any]:
            from ferrolm.finetune import FinetuneConfig, finetune

            return finetune(
                FinetuneConfig(
                    model=str(out / "pretrain"),
                    train=str(task["train"]),
                    eval=str(task["dev"]),
                    text_column="text",
                    label_column="label",
                    out=str(out / "classifier"),
                    epochs=finetune_epochs,
                    lr=1e-3,  # a small model starting from little pretraining: a high rate
                    batch_size=32,
                    device=device,
                    seed=seed,
                )
            )

        results["finetune"] = stage("finetune", classify)
        results["outputs"]["classifier"] = str(out / "classifier")

        print(f"[7/{stages}] evaluate: held-out files")

        def evaluate_classifier() -> dict[str, Any]:
            from ferrolm.finetune import evaluate

            return evaluate(out / "classifier", task["test"], device=device)

        results["evaluate"] = stage("evaluate", evaluate_classifier)
        _print_confusion(results["evaluate"])

    # summary.json (these figures) is written after the summary is printed but listed in it: the
    # summary names every file the demo leaves behind.
    results["outputs"]["summary"] = str(out / "summary.json")
    _print_summary(out, results)
    if not (tok_figures["round_trip"] and tok_figures["formats_agree"]):
        raise RuntimeError("demo check failed: see the summary above")
    atomic_write_text(out / "summary.json", json.dumps(results, indent=1, default=str) + "\n")
    return results


def _print_confusion(figures: dict[str, Any]) -> None:
    labels = [str(label) for label in figures["labels"]]
    width = max(len(label) for label in labels) + 2
    print("      " + " " * width + "".join(f"{label[:8]:>9}" for label in labels) + "   <- predicted")
    for label, row in zip(labels, figures["confusion"], strict=True):
        print(f"      {label:<{width}}" + "".join(f"{count:>9}" for count in row))


def _print_summary(out: Path, results: dict[str, Any]) -> None:
    tok, pre = results["tokenizer"], results["pretrain"]
    print()
    print("summary")
    print(
        f"  tokenizer      {tok['vocab_size']} tokens, {tok['bytes_per_token']:.2f} bytes/token, "
        f"encode {tok['encode_mb_per_s']:.1f} MB/s"
    )
    print(
        f"  shards         {results['shards']['train_tokens']:,} train / {results['shards']['val_tokens']:,} val tokens"
    )
    curve = pre["val_curve"]
    print(
        f"  pretrain       {pre['steps']} steps, {pre['tokens']:,} tokens, val loss {curve[0]:.3f} -> {curve[-1]:.3f}"
    )
    if "evaluate" in results:
        figures = results["evaluate"]
        chance = 1 / len(figures["labels"])
        print(
            f"  classifier     accuracy {figures['accuracy']:.3f} (chance {chance:.3f}), "
            f"macro-F1 {figures['macro_f1']:.3f} on {figures['n']} held-out snippets"
        )
    print("  stage times    " + ", ".join(f"{k} {v:.1f} s" for k, v in results["timings"].items()))
    print(f"  total          {sum(results['timings'].values()):.1f} s")
    print(f"  outputs        {out}/")
    for name, path in results["outputs"].items():
        print(f"    {name:<12} {path}")
