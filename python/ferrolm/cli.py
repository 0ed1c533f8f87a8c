"""The ``ferrolm`` command line.

Every subcommand is a thin shell over the Python API, so what the CLI does a script can do too.
Errors print one line (``ferrolm: error: ...``) unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

from ferrolm.config import FinetuneConfig, TrainConfig

EPILOG_DEMO = """examples:
  ferrolm demo                      # tokenizer -> shards -> pretrain -> generate -> fine-tune -> evaluate
  ferrolm demo --steps 1000 --device cuda     # longer pretraining on a GPU
  ferrolm demo --corpus my_texts/   # your own .txt / .py / .md / .jsonl files; its top-level
                                    # directories become the labels of the classification stage
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

    run_demo(
        out=Path(args.out),
        corpus=args.corpus,
        vocab_size=args.vocab_size,
        max_mb=args.max_mb,
        pretrain_steps=args.steps,
        finetune_epochs=args.epochs,
        device=args.device,
        seed=args.seed,
    )
    return 0


def _load(path: str, pattern: str | None = None):  # type: ignore[no-untyped-def]
    from ferrolm import Tokenizer

    return Tokenizer.from_pretrained(path, pattern=pattern)


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from ferrolm import Tokenizer

    out = Path(args.out)
    # Fail before a long training run, not after it. Missing directories are created when saving
    # (as Tokenizer.save does): the first one that exists must be a writable directory.
    parent = out if out.is_dir() else out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {args.out}: {parent} is not a directory")
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
    from ferrolm._files import read_text

    tok = _load(args.tokenizer, args.pattern)
    text = args.text if args.text is not None else read_text(args.file, "a UTF-8 text file to encode")
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


EPILOG_PRETRAIN = """examples:
  ferrolm pretrain --data shards/ --out runs/tiny --preset tiny --max-steps 500 --device cpu
  ferrolm pretrain --data shards/ --out runs/gpt2 --preset gpt2-small --max-tokens 10e9 --batch-size 16 \\
      --grad-accum 32 --device cuda --compile --packing best_fit --doc-mask
  ferrolm pretrain --config run.toml                 # the same options as TOML (CLI flags win)
  ferrolm pretrain --out runs/tiny --resume          # continue the latest checkpoint exactly
  torchrun --nproc_per_node=8 -m ferrolm pretrain --data shards/ --out runs/gpt2 --preset gpt2-small \\
      --batch-size 16 --global-batch-size 512 --parallel ddp     # or fsdp; see docs/distributed.md
"""


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ferrolm.train import load_checkpoint, pretrain, saved_train_config

    # Precedence, lowest first: the defaults, the resumed run's saved config, --config, the flags.
    values = _config_file_values(args, TrainConfig)
    out = args.out or values.get("out")
    if args.resume:
        if not out:
            raise ValueError("--resume needs --out RUN (or out in --config)")
        path, state = load_checkpoint(out, verify=False)  # the configuration; pretrain checks the files
        saved = dataclasses.asdict(saved_train_config(state, path))
        values = {**saved, **{k: v for k, v in values.items() if k != "model"}}
    flags = _config_flag_values(args, TrainConfig)
    # --model KEY=VALUE and --dropout (a GPTConfig field, kept as a flag of its own) add to the table.
    model = {**values.get("model", {}), **flags.pop("model", {})}
    if args.dropout is not None:
        model["dropout"] = args.dropout
    if model:
        values["model"] = model
    values.update(flags)
    _require(args, TrainConfig, values)
    config = TrainConfig.from_dict(values, source="pretrain options")
    summary = pretrain(config, resume=args.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports for the job
        return 0
    val = summary["val_loss"]
    print(
        f"trained {summary['steps']} steps, {summary['tokens']:,} tokens: train loss "
        f"{summary['train_loss']:.4f}"
        + (f", val loss {val:.4f}" if val is not None else "")
        + f" -> {summary['run_dir']}"
    )
    return 0


# ----------------------------------------------------------------------------------------------------
# Config dataclasses as flags: one flag per field, its type, default, help and choices from the field


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass ``cls`` (``ferrolm.config``), in a group of its own.

    ``--name-with-dashes`` for ``name_with_dashes``; the type from the annotation (int, float, str,
    ``X | None``, ``Literal`` choices; ``--flag/--no-flag`` for a bool; ``KEY=VALUE`` repeatable for a
    table), the help, choices and parser from the field's metadata, the default shown from the field.
    Every flag's argparse default is None: "not given", so a --config file or a resumed run's value
    stays unless the flag is given."""
    from ferrolm.config import field_choices, field_types, unwrap_optional

    types = field_types(cls)
    group = parser.add_argument_group(f"options (also the keys of a --config TOML file, as {cls.__name__})")
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = field.metadata
        base, _ = unwrap_optional(types[field.name])
        choices = field_choices(field, types[field.name])
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]
        shown = meta.get("default_text") or _shown(default)
        text = meta.get("help", "")
        if choices is not None and meta.get("metavar"):  # a long list: in the help, not the usage line
            text += f"; one of: {', '.join(map(str, choices))}"
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": None,
            "help": (
                f"{text} (required: here or in --config)"
                if meta.get("required")
                else f"{text} (default: {shown})"
            ).replace("%", "%%"),
        }
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is dict:
            kwargs.update(action="append", type=_key_value)
        else:
            kwargs["type"] = _typed(meta.get("parse") or base)
            if choices is not None:
                kwargs["choices"] = choices
        group.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def _typed(convert: Any) -> Any:
    """``convert`` (int, float, str, typing.Literal's str, a parser) as an argparse type whose error
    names the expected value; argparse adds the flag."""
    if typing.get_origin(convert) is typing.Literal:
        return str

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as error:
            wanted = {int: "an integer", float: "a number"}.get(convert)
            raise argparse.ArgumentTypeError(
                f"expected {wanted}, got {text!r}" if wanted else str(error)
            ) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``: VALUE is read as a TOML value (``6``, ``0.1``, ``true``, ``"x"``), or as a string
    when it is not one (``arch=llama``)."""
    from ferrolm.config import toml_value

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value = toml_value(raw)
    return key.strip(), raw if value is None else value


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    return "none" if default in (None, "", {}) else str(default)


def _config_file_values(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The fields ``--config FILE`` gives; unknown keys and bad values are refused naming the file."""
    from ferrolm.config import load_toml

    if not args.config:
        return {}
    values = load_toml(args.config)
    cls.from_dict(values, source=str(args.config))
    return values


def _config_flag_values(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The fields given as flags (add_config_options's); a table's KEY=VALUE pairs as a dict."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None
    }
    return {k: dict(v) if isinstance(v, list) else v for k, v in given.items()}


def _require(args: argparse.Namespace, cls: Any, values: dict[str, Any]) -> None:
    """The fields a run cannot start without, given by neither the flags nor the --config file: the
    usage error argparse gives for a missing required argument."""
    missing = [
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if f.metadata.get("required") and not values.get(f.name)
    ]
    if missing:
        args.parser.error(
            f"the following arguments are required: {', '.join(missing)} (a flag or a key of --config)"
        )


def _cmd_export(args: argparse.Namespace) -> int:
    from ferrolm.export import export_run

    print(f"wrote {export_run(args.run, args.out)}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from ferrolm.generate import main_generate

    main_generate(
        args.path,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        args.device,
    )
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from ferrolm.train import plot_metrics

    print(f"wrote {plot_metrics(args.run, args.out)}")
    return 0


def add_model_commands(commands) -> None:  # type: ignore[no-untyped-def]
    """pretrain, export, generate, plot: the trainer's subcommands."""
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain a GPT (or a masked-LM encoder) on shards, with checkpoints and exact resume",
        description="Pretrain a Transformer on a shard directory: AdamW, warmup + cosine, gradient "
        "accumulation, bf16 autocast on CUDA, evaluation on the val split, checkpoints (safetensors + "
        "JSON, atomic), metrics.jsonl and loss.png in the run directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_PRETRAIN,
    )
    pretrain.add_argument(
        "--config", metavar="FILE", help="run.toml: the options below as keys, a [model] table for GPTConfig"
    )
    pretrain.add_argument("--resume", action="store_true", help="continue RUN's latest checkpoint exactly")
    pretrain.add_argument(
        "--quiet", dest="progress", action="store_const", const=False, help="= --no-progress"
    )
    # GPTConfig's dropout, a flag of its own since before --model KEY=VALUE (= --model dropout=P).
    pretrain.add_argument("--dropout", type=float, metavar="P", help="= --model dropout=P (default: 0.0)")
    add_config_options(pretrain, TrainConfig)
    pretrain.set_defaults(func=_cmd_pretrain, parser=pretrain)

    export = commands.add_parser(
        "export",
        help="write a run's latest checkpoint (or a fine-tuned classifier) as a Hugging Face directory",
        description="Write config.json, model.safetensors and the tokenizer files that "
        "transformers' GPT2LMHeadModel / LlamaForCausalLM (and AutoTokenizer) load; a 'ferrolm "
        "finetune' output becomes a GPT2ForSequenceClassification / LlamaForSequenceClassification.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  ferrolm export runs/tiny --out hf/tiny",
    )
    export.add_argument("run", help="run directory or fine-tuned classifier directory")
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(func=_cmd_export)

    generate = commands.add_parser(
        "generate",
        help="continue a prompt with a trained or exported model (KV cache, streamed)",
        description="Generate text from a run directory or a Hugging Face directory, streaming tokens "
        "to stdout. --temperature 0 is greedy decoding.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n  ferrolm generate runs/tiny --prompt "def main(" --max-new-tokens 100\n'
        '  ferrolm generate hf/tiny --prompt "Once" --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1',
    )
    generate.add_argument("path", help="run directory or Hugging Face directory")
    generate.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    generate.add_argument("--max-new-tokens", type=int, default=100, help="default 100")
    generate.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    generate.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    generate.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    generate.add_argument("--device", default="cpu", help="default cpu")
    generate.set_defaults(func=_cmd_generate)

    plot = commands.add_parser(
        "plot",
        help="plot a run's training and validation loss to a PNG",
        description="Plot a run's training and validation loss (from its metrics.jsonl) against the step, "
        "as a PNG.",
        epilog="example:\n  ferrolm plot runs/tiny            # writes runs/tiny/loss.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plot.add_argument("run", help="run directory")
    plot.add_argument("--out", default=None, help="PNG path (default RUN/loss.png)")
    plot.set_defaults(func=_cmd_plot)


EPILOG_FINETUNE = """examples:
  ferrolm finetune --model runs/tiny --train train.csv --eval dev.csv --out runs/sentiment
  ferrolm finetune --model hf/gpt2 --train train.tsv --eval dev.tsv --text-column sentence \\
      --label-column label --out runs/sst2 --epochs 3 --lr 2e-5 --batch-size 32 --device cuda
  torchrun --nproc_per_node=8 -m ferrolm finetune --model hf/gpt2 --train train.csv --eval dev.csv \\
      --out runs/sst2 --batch-size 64 --parallel ddp    # 64 examples per step in all; see docs/distributed.md
"""


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ferrolm.finetune import finetune

    values = {**_config_file_values(args, FinetuneConfig), **_config_flag_values(args, FinetuneConfig)}
    _require(args, FinetuneConfig, values)
    summary = finetune(FinetuneConfig.from_dict(values, source="finetune options"))
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports for the job
        return 0
    print(
        f"best epoch {summary['best_epoch']}/{summary['epochs']}: eval accuracy {summary['accuracy']:.4f}, "
        f"macro-F1 {summary['macro_f1']:.4f}, loss {summary['eval_loss']:.4f} -> {summary['run_dir']}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ferrolm.finetune import CLASSIFIER_FILE, evaluate

    if not (Path(args.run) / CLASSIFIER_FILE).is_file():  # a language model: loss, perplexity, bpb
        return _cmd_evaluate_lm(args)
    if args.stride is not None or args.max_length is not None:
        raise ValueError(
            f"evaluate: {args.run} is a classifier; --stride and --max-length apply to language models"
        )
    result = evaluate(
        args.run,
        args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return 0
    correct = sum(result["confusion"][k][k] for k in range(len(result["labels"])))
    print(f"examples  {result['n']}")
    print(f"accuracy  {result['accuracy']:.4f}  ({correct}/{result['n']})")
    print(f"macro-F1  {result['macro_f1']:.4f}")
    print(f"loss      {result['loss']:.4f}")
    print("confusion matrix (rows: true label, columns: predicted label)")
    names = [str(label) for label in result["labels"]]
    width = max(len(name) for name in [*names, *(str(c) for row in result["confusion"] for c in row)])
    print(" " * width + "  " + "  ".join(name.rjust(width) for name in names))
    for name, row in zip(names, result["confusion"], strict=True):
        print(name.rjust(width) + "  " + "  ".join(str(c).rjust(width) for c in row))
    return 0


def _cmd_evaluate_lm(args: argparse.Namespace) -> int:
    from ferrolm.lm_eval import evaluate_lm

    for name in ("text_column", "label_column"):
        if getattr(args, name) is not None:
            raise ValueError(
                f"evaluate: --{name.replace('_', '-')} applies to classifiers; {args.run} is not one"
            )
    result = evaluate_lm(
        args.run,
        args.data,
        stride=args.stride,
        max_length=args.max_length,
        batch_size=args.batch_size,
        split=args.split,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"tokens         {result['tokens']}  ({result['bytes']} bytes)")
    print(f"windows        {result['windows']} of {result['max_length']} tokens, stride {result['stride']}")
    print(f"loss           {result['loss']:.4f}")
    print(f"perplexity     {result['perplexity']:.3f}")
    print(f"bits per byte  {result['bits_per_byte']:.4f}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ferrolm._files import read_text
    from ferrolm.finetune import Classifier

    texts = list(args.text or [])
    if args.file:
        lines = read_text(args.file, "texts to classify, one per line").splitlines()
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise ValueError("predict: give --text TEXT (repeatable) or --file FILE (one text per line)")
    for label, probability in Classifier.load(args.run, args.device).predict(texts):
        print(f"{label}\t{probability:.4f}")
    return 0


def add_finetune_commands(commands) -> None:  # type: ignore[no-untyped-def]
    """finetune, evaluate, predict: sequence classification on top of a pretrained model."""
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a pretrained model to classify texts (CSV, TSV or JSON lines)",
        description="Sequence classification on top of a ferrolm run or a Hugging Face GPT-2/Llama/"
        "RoBERTa/ModernBERT directory: a head on each text's last token (GPT) or first token "
        "(encoders), AdamW, warmup + linear decay, evaluation after every epoch; the epoch with the "
        "best eval accuracy is kept in OUT (classifier.json, safetensors weights, tokenizer.json, "
        "metrics.jsonl). Labels may be strings or integers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_FINETUNE,
    )
    finetune.add_argument("--config", metavar="FILE", help="a TOML file: the options below as keys")
    finetune.add_argument(
        "--quiet", dest="progress", action="store_const", const=False, help="= --no-progress"
    )
    add_config_options(finetune, FinetuneConfig)
    finetune.set_defaults(func=_cmd_finetune, parser=finetune)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a fine-tuned classifier (accuracy, macro-F1, confusion) or a language model "
        "(loss, perplexity, bits per byte)",
        description="Score a 'ferrolm finetune' output on a labelled .csv/.tsv/.jsonl file: accuracy, "
        "macro-F1, mean cross-entropy and the confusion matrix (--json: one JSON object with keys "
        "accuracy, macro_f1, confusion, labels, loss, n). Or score a causal language model (a ferrolm "
        "pretrain run or a Hugging Face GPT-2/Llama directory) on a UTF-8 text file or a shard "
        "directory's split: loss, perplexity and bits per byte (nats / ln 2 / UTF-8 bytes: comparable "
        "across tokenizers), with a sliding window of --max-length tokens moving --stride tokens, "
        "as Hugging Face's perplexity guide (--json keys loss, perplexity, bits_per_byte, tokens, bytes, "
        "windows, max_length, stride).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  ferrolm evaluate runs/sst2 --data test.tsv\n"
        "  ferrolm evaluate runs/sst2 --data test.jsonl --text-column text --json\n"
        "  ferrolm evaluate runs/small --data valid.txt --stride 128     # a language model\n"
        "  ferrolm evaluate runs/small --data shards/ --split val",
    )
    evaluate.add_argument("run", help="classifier (ferrolm finetune --out), ferrolm run or Hugging Face dir")
    evaluate.add_argument(
        "--data",
        required=True,
        help="classifier: labelled .csv/.tsv/.jsonl; LM: a text file or shard directory",
    )
    evaluate.add_argument("--text-column", help="default: the column the classifier was trained with")
    evaluate.add_argument("--label-column", help="default: the column the classifier was trained with")
    evaluate.add_argument("--stride", type=int, help="LM: tokens the window moves (default max-length / 2)")
    evaluate.add_argument(
        "--max-length", type=int, help="LM: tokens per window (default: the model's context)"
    )
    evaluate.add_argument("--split", default="val", help="LM on shards: the split (default val)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="default 64")
    evaluate.add_argument("--device", default="cpu", help="default cpu")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = commands.add_parser(
        "predict",
        help="classify texts with a fine-tuned classifier: label and probability",
        description="Print the likeliest label of each text and its probability, one tab-separated "
        "line per text, in order.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n  ferrolm predict runs/sst2 --text "a gripping film" --text "dull and long"\n'
        "  ferrolm predict runs/sst2 --file reviews.txt      # one text per line",
    )
    predict.add_argument("run", help="fine-tuned classifier directory (ferrolm finetune --out)")
    predict.add_argument("--text", action="append", help="a text to classify (repeatable)")
    predict.add_argument("--file", help="a UTF-8 file with one text per line")
    predict.add_argument("--device", default="cpu", help="default cpu")
    predict.set_defaults(func=_cmd_predict)


class _Parser(argparse.ArgumentParser):
    """argparse's parser with an optional default subcommand: when the first word is not one of its
    subcommands, ``default_command`` is (``ferrolm shard INPUTS...`` is ``ferrolm shard tokenize
    INPUTS...``, as ``git stash`` is ``git stash push``). Subparsers are made of the parent's class."""

    default_command: str | None = None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self.default_command is not None:
            args = list(sys.argv[1:] if args is None else args)
            names = next(a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction))
            if not args or args[0] not in names:
                args = [self.default_command, *args]
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ferrolm",
        description="Rust-accelerated language-model training: tokenizer, data, trainer.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples (the whole workflow; `ferrolm demo` runs it on Python's standard library):
  ferrolm tokenizer train corpus/ --vocab-size 32768 --out tokenizer.json
  ferrolm shard corpus/ --tokenizer tokenizer.json --out shards/
  ferrolm pretrain --data shards/ --out runs/small --preset small --max-steps 2000
  ferrolm generate runs/small --prompt "def "
  ferrolm finetune --model runs/small --train train.csv --eval dev.csv --out runs/clf
  ferrolm evaluate runs/clf --data test.csv
  torchrun --nproc_per_node=8 -m ferrolm pretrain ... --parallel ddp

run 'ferrolm COMMAND --help' for a command's options and an example""",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the main job end to end on an embedded corpus (Python's standard library)",
        description="The whole pipeline on a corpus every Python installation carries (its standard "
        "library), no download, minutes on a laptop CPU: train a byte-level BPE tokenizer, shard the "
        "corpus, pretrain a small GPT (falling validation loss, loss.png), generate a sample, fine-tune "
        "a classifier (which package does a snippet of code come from?), evaluate it on held-out files "
        "and print a summary. Each stage is the code path of the matching command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_DEMO,
    )
    demo.add_argument("--out", default="ferrolm-demo", help="output directory (default: ferrolm-demo)")
    demo.add_argument("--corpus", default=None, help="a file or directory to use instead of the stdlib")
    demo.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    demo.add_argument("--max-mb", type=float, default=8.0, help="corpus size cap in MB (default: 8)")
    demo.add_argument("--steps", type=int, default=300, help="pretraining steps (default: 300)")
    demo.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default: 3)")
    demo.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    demo.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    demo.set_defaults(func=_cmd_demo)

    shard_description = (
        "Tokenize text / JSON lines / zstd / gzip / Parquet files into safetensors shards and a "
        "manifest, on all cores, resumable. 'ferrolm shard merge PARTS... --out DIR' joins parts."
    )
    shard_commands = commands.add_parser(
        "shard",
        help="tokenize a corpus into safetensors shards + manifest (see also: shard merge)",
        description=shard_description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_SHARD,
    )
    # `ferrolm shard INPUTS...` (the default action) and `ferrolm shard merge PARTS...`.
    shard_actions = shard_commands.add_subparsers(dest="shard_command", metavar="ACTION")
    shard_commands.default_command = "tokenize"
    shard = shard_actions.add_parser(
        "tokenize",
        prog="ferrolm shard",  # the default action: its usage line is the command's
        help="tokenize a corpus (the default: `ferrolm shard INPUTS...`)",
        description=shard_description,
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

    merge = shard_actions.add_parser(
        "merge",
        help="join shard directories written with --num-parts/--part into one",
        description="Join shard directories written with --num-parts/--part into one.",
        epilog="example:\n  ferrolm shard merge part0/ part1/ --out shards/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("parts", nargs="+", help="part directories, in order")
    merge.add_argument("--out", required=True, help="output directory (new or empty)")
    merge.set_defaults(func=_cmd_shard_merge)

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
        description="Encode a text (or a file) and print its token ids, space-separated.",
        epilog='example:\n  ferrolm tokenizer encode --tokenizer gpt2/ --text "hello world"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    encode.add_argument("--tokenizer", required=True, help="tokenizer.json, a GPT-2 directory, ...")
    encode.add_argument("--pattern", default=None, help="gpt2 | cl100k | o200k | a regex (tiktoken files)")
    source = encode.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to encode")
    source.add_argument("--file", help="a UTF-8 file to encode")
    encode.add_argument("--allow-special", action="store_true", help="encode special tokens in the text")
    encode.set_defaults(func=_cmd_tokenizer_encode)

    decode = tok_commands.add_parser(
        "decode",
        help="print the text of token ids",
        description="Decode token ids back to text.",
        epilog="example:\n  ferrolm tokenizer decode --tokenizer gpt2/ 31373 995",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    decode.add_argument("--tokenizer", required=True, help="tokenizer.json, a GPT-2 directory, ...")
    decode.add_argument("--pattern", default=None, help="gpt2 | cl100k | o200k | a regex (tiktoken files)")
    decode.add_argument("ids", nargs="+", help="token ids")
    decode.set_defaults(func=_cmd_tokenizer_decode)

    info = tok_commands.add_parser(
        "info",
        help="vocabulary size, special tokens and pattern",
        description="Print a tokenizer's vocabulary size, special tokens and pre-tokenization pattern.",
        epilog="example:\n  ferrolm tokenizer info tokenizer.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument("path", help="a tokenizer file or directory")
    info.add_argument("--pattern", default=None, help="gpt2 | cl100k | o200k | a regex (tiktoken files)")
    info.set_defaults(func=_cmd_tokenizer_info)

    convert = tok_commands.add_parser(
        "convert",
        help="convert between tokenizer.json, GPT-2 files and tiktoken rank files",
        description="Read any tokenizer ferrolm reads (tokenizer.json, vocab.json + merges.txt, "
        "encoder.json + vocab.bpe, a tiktoken file) and write it as tokenizer.json or a tiktoken file.",
        epilog="example:\n  ferrolm tokenizer convert gpt2/ --out gpt2.tiktoken --format tiktoken",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("path", help="a tokenizer file or directory")
    convert.add_argument("--out", required=True, help="output file (or directory for tokenizer.json)")
    convert.add_argument("--format", choices=["json", "tiktoken"], default="json", help="default json")
    convert.add_argument("--pattern", default=None, help="gpt2 | cl100k | o200k | a regex (tiktoken files)")
    convert.set_defaults(func=_cmd_tokenizer_convert)

    add_model_commands(commands)
    add_finetune_commands(commands)
    _add_common_options(parser)
    return parser


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    """--version and --debug on every parser of the tree, so that each command's --help lists them
    (``main`` takes --debug out before parsing: it is accepted anywhere on the line)."""
    from ferrolm import __version__

    parser.add_argument("--version", action="version", version=f"ferrolm {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks on errors (accepted anywhere on the command line)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_common_options(sub)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere: argparse only knows an option on the parser that defines it, and a user
    # adds --debug after the command that failed. Taken out before parsing (not after a `--`).
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    words = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    parser = build_parser()
    args = parser.parse_args(words)
    args.debug = debug
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
        _error_line(f"ferrolm: error{_rank_label()}: {_describe(error)}")
        return 1
    except Exception as error:  # under torchrun: one line per rank, not N interleaved tracebacks
        if args.debug or not _rank_label():
            raise
        _error_line(
            f"ferrolm: error{_rank_label()}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]} "
            "(--debug for the traceback)"
        )
        return 1


def _describe(error: BaseException) -> str:
    """The one line an error prints: it names the file (or the key) and what went wrong.

    ferrolm's own errors already do; these are the fallbacks for what reaches here from elsewhere:
    an OSError from open() ("[Errno 2] No such file or directory: 'x'") becomes "x: No such file or
    directory"; a bare KeyError (its message is only the key) says it is a missing key; a raw
    UnicodeDecodeError says what was not UTF-8."""
    if isinstance(error, OSError) and error.filename is not None:
        where = os.fsdecode(error.filename)
        if error.filename2 is not None:
            where += f" -> {os.fsdecode(error.filename2)}"
        return f"{where}: {error.strerror or error}"
    if isinstance(error, UnicodeDecodeError):
        return (
            f"input is not valid UTF-8 ({error.reason} at byte {error.start}); expected UTF-8 text "
            "(--debug for the traceback)"
        )
    if isinstance(error, KeyError):
        key = error.args[0] if error.args else ""
        if isinstance(key, str) and " " in key:  # a message written for the user (e.g. an unknown token)
            return key
        return f"missing key {key!r} in the data read (--debug for the traceback)"
    return str(error)


def _error_line(text: str) -> None:
    """``text`` and its newline in ONE write: torchrun starts its workers with ``python -u`` (unbuffered),
    where print() writes them separately and the ranks' lines interleave on a shared stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _rank_label() -> str:
    """' (rank R/W)' in a process torchrun started with several ranks, '' otherwise."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f" (rank {rank}/{world})" if world.isdigit() and int(world) > 1 else ""


if __name__ == "__main__":
    raise SystemExit(main())
