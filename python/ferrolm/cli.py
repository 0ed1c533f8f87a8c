"""The ``ferrolm`` command line.

Every subcommand is a thin shell over the Python API, so what the CLI does a script can do too.
Errors print one line (``ferrolm: error: ...``) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EPILOG_DEMO = """example:
  ferrolm demo                      # train a tokenizer on Python's standard library and use it
  ferrolm demo --corpus my_texts/   # the same on your own .txt / .jsonl / .jsonl.zst files
"""

EPILOG_TOKENIZER = """examples:
  ferrolm tokenizer train corpus/ --vocab-size 32768 --out tokenizer.json --pattern cl100k
  ferrolm tokenizer encode --tokenizer tokenizer.json --text "hello world"
  ferrolm tokenizer decode --tokenizer tokenizer.json 31373 995
  ferrolm tokenizer info gpt2/
  ferrolm tokenizer convert gpt2/ --out gpt2.tiktoken --format tiktoken
"""


def _cmd_demo(args: argparse.Namespace) -> int:
    from ferrolm.demo import run_demo

    run_demo(out=Path(args.out), corpus=args.corpus, vocab_size=args.vocab_size, max_mb=args.max_mb)
    return 0


def _load(path: str, pattern: str | None = None):  # type: ignore[no-untyped-def]
    from ferrolm import Tokenizer

    return Tokenizer.from_pretrained(path, pattern=pattern)


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from ferrolm import Tokenizer

    out = Path(args.out)
    # Fail before a long training run, not after it.
    parent = out.parent if not out.is_dir() else out
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {args.out}: directory {parent} is not writable")
    started = time.perf_counter()
    tok = Tokenizer.train(
        args.inputs,
        args.vocab_size,
        pattern=args.pattern,
        special_tokens=args.special_token or ["<|endoftext|>"],
        min_frequency=args.min_frequency,
        text_field=args.text_field,
        tie_break=args.tie_break,
        errors=args.errors,
        num_threads=args.threads,
        show_progress=not args.quiet,
    )
    if out.suffix == ".tiktoken":
        tok.save_tiktoken(out)
    else:
        tok.save(out)
    print(f"trained {tok.vocab_size} tokens in {time.perf_counter() - started:.1f} s -> {out}")
    return 0


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer, args.pattern)
    text = args.text if args.text is not None else Path(args.file).read_text(encoding="utf-8")
    ids = tok.encode(text, allowed_special="all" if args.allow_special else frozenset())
    print(" ".join(map(str, ids)))
    return 0


def _cmd_tokenizer_decode(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer, args.pattern)
    sys.stdout.write(tok.decode([int(i) for i in args.ids]) + "\n")
    return 0


def _cmd_tokenizer_info(args: argparse.Namespace) -> int:
    tok = _load(args.path, args.pattern)
    info = {
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special_tokens,
        "pattern": tok.pattern,
    }
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def _cmd_tokenizer_convert(args: argparse.Namespace) -> int:
    tok = _load(args.path, args.pattern)
    if args.format == "tiktoken":
        tok.save_tiktoken(args.out)
    else:
        tok.save(args.out)
    print(f"wrote {args.out}")
    return 0


EPILOG_SHARD = """examples:
  ferrolm shard corpus/*.jsonl.zst --tokenizer tokenizer.json --out shards/ --val-fraction 0.001
  ferrolm shard books/ --tokenizer gpt2/ --out shards/ --text-split blank_lines
  ferrolm shard data/ --tokenizer tok.json --out part3/ --num-parts 8 --part 3   # one job of 8
  ferrolm shard merge part0/ part1/ ... --out shards/                            # join the parts
"""


def _cmd_shard(args: argparse.Namespace) -> int:
    from ferrolm.data import shard_corpus

    manifest = shard_corpus(
        args.inputs,
        args.out,
        args.tokenizer,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        boundary=args.boundary,
        eos_token=args.eos_token,
        bos_token=args.bos_token,
        dtype=args.dtype,
        text_split=args.text_split,
        delimiter=args.delimiter,
        on_bad_line=args.on_bad_line,
        on_invalid_utf8=args.on_invalid_utf8,
        resume=args.resume,
        num_parts=args.num_parts,
        part=args.part,
        show_progress=not args.quiet,
    )
    _print_manifest_summary(manifest)
    return 0


def _cmd_shard_merge(args: argparse.Namespace) -> int:
    from ferrolm.data import merge_shards

    _print_manifest_summary(merge_shards(args.parts, args.out))
    return 0


def _print_manifest_summary(manifest) -> None:  # type: ignore[no-untyped-def]
    for split in manifest.data["splits"]:
        print(
            f"{split}: {manifest.tokens(split):,} tokens, {manifest.documents(split):,} documents, "
            f"{len(manifest.shards(split))} shards"
        )
    skipped = {k: v for k, v in manifest.skipped.items() if v}
    print(f"skipped: {skipped or 'nothing'}")
    print(f"manifest: {manifest.directory / 'manifest.json'}")


def build_shard_merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferrolm shard merge",
        description="Join shard directories written with --num-parts/--part into one.",
        epilog="example:\n  ferrolm shard merge part0/ part1/ --out shards/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("parts", nargs="+", help="part directories, in order")
    parser.add_argument("--out", required=True)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.set_defaults(func=_cmd_shard_merge)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferrolm",
        description="Rust-accelerated language-model training: tokenizer, data, trainer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run 'ferrolm COMMAND --help' for a command's options and an example",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the main job end to end on an embedded corpus (Python's standard library)",
        description="Train a byte-level BPE tokenizer on a corpus every Python installation carries "
        "(its standard library), save it in Hugging Face and tiktoken formats, reload it, encode the "
        "corpus on all cores and report compression, speed and a round-trip check.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_DEMO,
    )
    demo.add_argument("--out", default="ferrolm-demo", help="output directory (default: ferrolm-demo)")
    demo.add_argument("--corpus", default=None, help="a file or directory to use instead of the stdlib")
    demo.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    demo.add_argument("--max-mb", type=float, default=8.0, help="corpus size cap in MB (default: 8)")
    demo.set_defaults(func=_cmd_demo)

    shard = commands.add_parser(
        "shard",
        help="tokenize a corpus into safetensors shards + manifest (see also: shard merge)",
        description="Tokenize text / JSON lines / zstd / gzip / Parquet files into safetensors shards "
        "and a manifest, on all cores, resumable. 'ferrolm shard merge PARTS... --out DIR' joins parts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_SHARD,
    )
    shard.add_argument("inputs", nargs="+", help="files, directories or globs")
    shard.add_argument("--tokenizer", required=True, help="tokenizer.json, a GPT-2 directory, ...")
    shard.add_argument("--out", required=True, help="output directory")
    shard.add_argument("--text-field", default="text", help="JSON lines / Parquet field (default: text)")
    shard.add_argument("--val-fraction", type=float, default=0.0005, help="default 0.0005")
    shard.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the train/val split hash")
    shard.add_argument("--boundary", choices=["eos", "bos", "both", "none"], default="eos")
    shard.add_argument("--eos-token", default=None, help="default: the tokenizer's <|endoftext|>")
    shard.add_argument("--bos-token", default=None)
    shard.add_argument("--dtype", choices=["uint16", "uint32"], default=None, help="default: by vocab size")
    shard.add_argument("--text-split", choices=["file", "blank_lines", "delimiter"], default="file")
    shard.add_argument("--delimiter", default=None, help="with --text-split delimiter")
    shard.add_argument("--on-bad-line", choices=["skip", "error"], default="skip")
    shard.add_argument("--on-invalid-utf8", choices=["replace", "error"], default="replace")
    shard.add_argument("--resume", action="store_true", help="finish an interrupted run")
    shard.add_argument("--num-parts", type=int, default=1)
    shard.add_argument("--part", type=int, default=0)
    shard.add_argument("--quiet", action="store_true")
    shard.set_defaults(func=_cmd_shard)

    tokenizer = commands.add_parser(
        "tokenizer",
        help="train, inspect, convert and run tokenizers",
        description="Train, inspect, convert and run byte-level BPE tokenizers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_TOKENIZER,
    )
    tok_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = tok_commands.add_parser(
        "train",
        help="train a vocabulary on text files",
        description="Train a byte-level BPE vocabulary (Hugging Face BpeTrainer-identical by default).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  ferrolm tokenizer train corpus/ --vocab-size 32768 --out tokenizer.json",
    )
    train.add_argument("inputs", nargs="+", help="files, directories or globs (.txt, .jsonl, .jsonl.zst)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="tokenizer.json, or a *.tiktoken file")
    train.add_argument("--pattern", default="cl100k", help="gpt2 | cl100k | o200k | a regex (default cl100k)")
    train.add_argument("--special-token", action="append", help="repeatable; default <|endoftext|>")
    train.add_argument("--min-frequency", type=int, default=0)
    train.add_argument("--text-field", default="text", help="JSON lines field holding the text")
    train.add_argument(
        "--tie-break",
        choices=["hf", "bytes"],
        default="hf",
        help="equal counts: smallest ids (hf, identical to Hugging Face) or byte order (bytes)",
    )
    train.add_argument(
        "--errors",
        choices=["replace", "strict"],
        default="replace",
        help="invalid UTF-8 in text files: replace with U+FFFD (with a warning) or fail",
    )
    train.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_tokenizer_train)

    encode = tok_commands.add_parser(
        "encode",
        help="print the token ids of a text",
        epilog='example:\n  ferrolm tokenizer encode --tokenizer gpt2/ --text "hello world"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encode.add_argument("--tokenizer", required=True)
    encode.add_argument("--pattern", default=None)
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--text")
    source.add_argument("--file")
    encode.add_argument("--allow-special", action="store_true", help="encode special tokens in the text")
    encode.set_defaults(func=_cmd_tokenizer_encode)

    decode = tok_commands.add_parser(
        "decode",
        help="print the text of token ids",
        epilog="example:\n  ferrolm tokenizer decode --tokenizer gpt2/ 31373 995",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    decode.add_argument("--tokenizer", required=True)
    decode.add_argument("--pattern", default=None)
    decode.add_argument("ids", nargs="+")
    decode.set_defaults(func=_cmd_tokenizer_decode)

    info = tok_commands.add_parser(
        "info",
        help="vocabulary size, special tokens and pattern",
        epilog="example:\n  ferrolm tokenizer info tokenizer.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("path")
    info.add_argument("--pattern", default=None)
    info.set_defaults(func=_cmd_tokenizer_info)

    convert = tok_commands.add_parser(
        "convert",
        help="convert between tokenizer.json, GPT-2 files and tiktoken rank files",
        epilog="example:\n  ferrolm tokenizer convert gpt2/ --out gpt2.tiktoken --format tiktoken",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("path")
    convert.add_argument("--out", required=True)
    convert.add_argument("--format", choices=["json", "tiktoken"], default="json")
    convert.add_argument("--pattern", default=None)
    convert.set_defaults(func=_cmd_tokenizer_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `ferrolm shard merge ...` shares its first word with `ferrolm shard INPUTS...`.
    words = [a for a in argv if a != "--debug"]
    if words[:2] == ["shard", "merge"]:
        parser = build_shard_merge_parser()
        args = parser.parse_args(words[2:] + (["--debug"] if "--debug" in argv else []))
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ferrolm: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError) as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"ferrolm: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
