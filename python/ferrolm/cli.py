"""The ``ferrolm`` command line.

Every subcommand is a thin shell over the Python API, so what the CLI does a script can do too.
Errors print one line (``ferrolm: error: ...``) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import json
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

    started = time.perf_counter()
    tok = Tokenizer.train(
        args.inputs,
        args.vocab_size,
        pattern=args.pattern,
        special_tokens=args.special_token or ["<|endoftext|>"],
        min_frequency=args.min_frequency,
        text_field=args.text_field,
        show_progress=not args.quiet,
    )
    out = Path(args.out)
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
