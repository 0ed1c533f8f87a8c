"""The run configurations: ``TrainConfig`` (``ferrolm pretrain``) and ``FinetuneConfig`` (``ferrolm finetune``).

Each option is declared once, here, as a dataclass field: its type (the annotation), its default, its
help text and its choices (``option(...)`` puts them in the field's metadata). ``ferrolm.cli`` builds the
command-line flags from these fields; ``load_toml`` reads the same fields from a ``run.toml``; ``check``
holds the rules for their values, so the Python API, a TOML file, a saved checkpoint and the command line
are checked by the same code, and a new field is a flag and a TOML key without another line.

This module imports nothing heavy (no torch): ``ferrolm --help`` and ``ferrolm --version`` build their
parser from it in an environment without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ferrolm._core import FerrolmError
from ferrolm._files import read_text
from ferrolm.archs import PRESETS

__all__ = [
    "PARALLEL_MODES",
    "FinetuneConfig",
    "TrainConfig",
    "check_number",
    "dump_toml",
    "load_toml",
    "option",
]

# How the model is spread over the processes torchrun starts (ferrolm.distributed).
Parallel = Literal["auto", "none", "ddp", "fsdp"]
PARALLEL_MODES: tuple[str, ...] = typing.get_args(Parallel)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices: Any = None,
    default_text: str | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    required: str | None = None,
) -> Any:
    """A config field with what the command line shows of it.

    ``help`` says what the option does; the default is added from the field itself (``default_text``
    replaces it where the value alone says nothing, e.g. None = "the model's context"). ``choices`` are
    the command line's choices when the annotation is not a ``Literal``: the keys of a table owned
    elsewhere (the presets), whose owner checks the value.
    ``parse`` turns the command-line string into the value when the annotation's type does not (e.g.
    ``10e9`` tokens). ``required`` says what the value is when a run cannot start without it (the
    default is then "", and ``validate`` refuses it empty)."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "default_text": default_text,
        "parse": parse,
        "metavar": metavar,
        "required": required,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_count(text: str) -> int:
    """A whole number written as an integer or in scientific notation: ``10e9`` tokens, ``2_000``."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a whole number such as 1000000 or 10e9, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"expected a whole number such as 1000000 or 10e9, got {text!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------
# Field types: what a field's annotation allows, for the checks and for the command line


def field_types(cls: type) -> dict[str, Any]:
    """Each field's resolved annotation (this module uses ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for ``T | None``, (hint, False) otherwise."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def field_choices(field: dataclasses.Field[Any], hint: Any) -> tuple[Any, ...] | None:
    """The allowed values of a field: its ``Literal`` annotation, or ``choices`` in its metadata."""
    base, _ = unwrap_optional(hint)
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)
    return field.metadata.get("choices")


def _words(values: tuple[Any, ...]) -> str:
    names = [str(v) for v in values]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_fields(config: Any, source: str) -> None:
    """The rules every field's annotation states: a bool is a bool, a str a str, a table a dict, a
    ``Literal`` one of its values. Numbers are checked with their ranges by each config's ``check``."""
    types = field_types(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        base, optional = unwrap_optional(types[field.name])
        if value is None and optional:
            continue
        # A Literal is the field's own type. Metadata choices are another table's keys (the presets),
        # checked by that table's owner (GPTConfig.preset): a checkpoint whose preset has since been
        # renamed still loads and exports. For them a string is the rule here.
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
        if choices is not None:
            if not isinstance(value, str) or value not in choices:
                raise FerrolmError(f"{source}: {field.name} must be {_words(choices)}, got {value!r}")
        elif base is bool and not isinstance(value, bool):
            raise FerrolmError(f"{source}: {field.name} must be true or false, got {value!r}")
        elif base is str and not isinstance(value, str):
            raise FerrolmError(f"{source}: {field.name} must be a string, got {value!r}")
        elif typing.get_origin(base) is dict and not isinstance(value, dict):
            raise FerrolmError(f"{source}: {field.name} must be a table (a dict), got {value!r}")


def check_required(config: Any, source: str) -> None:
    """The fields a run cannot start without (``required`` in their metadata) are given."""
    for field in dataclasses.fields(config):
        what = field.metadata.get("required")
        if what and not getattr(config, field.name):
            raise FerrolmError(f"{source}: {field.name} ({what}) is required")


def check_number(
    source: str,
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """The one rule for the float options of ``TrainConfig`` and ``FinetuneConfig``: a finite real number
    (not a bool, a string, NaN or infinity) in the interval from ``low`` to ``high`` (an open end
    excludes its bound: ``lr`` must be > 0). Raises ``FerrolmError`` naming the field and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        if high == math.inf:
            wanted = f"{'>' if open_low else '>='} {low:g}"
        else:
            wanted = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise FerrolmError(f"{source}: {name} must be a finite number {wanted}, got {value!r}")


def check_int(source: str, name: str, value: Any, low: int = 1, *, optional: bool = False) -> None:
    """An integer (not a bool) >= ``low``; None too when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise FerrolmError(f"{source}: {name} must be {wanted}, got {value!r}")


def check_device(source: str, value: Any) -> None:
    if not isinstance(value, str) or (value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:")):
        raise FerrolmError(f"{source}: device must be cpu, cuda or auto, got {value!r}")


class _Config:
    """What both configs share: construction from a TOML table or a saved JSON object."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> Any:
        """A config from ``data`` (a TOML file, a checkpoint's saved config); the fields not given keep
        their defaults. Unknown keys and bad values raise ``FerrolmError`` naming ``source`` and the key.
        Required fields (``data``, ``out``...) are checked by ``validate``: another source may give them."""
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise FerrolmError(f"{source}: unknown keys {unknown} (known: {sorted(known)})")
        config = cls(**data)
        config.check(source)  # type: ignore[attr-defined]
        return config


# ----------------------------------------------------------------------------------------------------
# Pretraining


@dataclass
class TrainConfig(_Config):
    data: str = option(
        "", "shard directory (ferrolm shard output)", metavar="DIR", required="a shard directory"
    )
    out: str = option(
        "",
        "run directory: checkpoints/, metrics.jsonl, loss.png, tokenizer.json, config.toml",
        metavar="DIR",
        required="a run directory",
    )
    preset: str = option(
        "tiny", "model size and architecture (encoders: --objective mlm)", choices=PRESETS, metavar="NAME"
    )
    # GPTConfig fields overriding the preset (a [model] table in run.toml).
    model: dict[str, Any] = option(
        factory=dict,
        help="a GPTConfig field overriding the preset, e.g. n_layer=6 (repeatable; a TOML value)",
        default_text="the preset's",
        metavar="KEY=VALUE",
    )
    init_from: str | None = option(
        None,
        "start from a ferrolm run directory (its latest checkpoint's weights) or a Hugging Face directory",
        default_text="random weights",
        metavar="DIR",
    )
    objective: Literal["clm", "mlm"] = option(
        "clm", "clm: next-token prediction (decoder); mlm: masked-LM (encoder)"
    )
    mask_prob: float = option(0.15, "mlm: fraction of the tokens predicted (BERT's value)")
    max_steps: int | None = option(
        None, "optimizer steps", default_text="from --max-tokens, or 1000", metavar="N"
    )
    max_tokens: int | None = option(
        None,
        "training tokens instead of --max-steps (global batch x seq_len per step), e.g. 10e9",
        default_text="none",
        parse=parse_count,
        metavar="N",
    )
    batch_size: int = option(8, "rows per micro-step, per process", metavar="N")
    seq_len: int | None = option(None, "tokens per row", default_text="the model's context", metavar="N")
    grad_accum: int | None = option(
        None, "micro-steps per optimizer step", default_text="from --global-batch-size, or 1", metavar="N"
    )
    # Fixing the global batch (not grad_accum) keeps the optimizer step the same whatever the number of GPUs.
    global_batch_size: int | None = option(
        None,
        "rows per optimizer step over all processes (= processes x grad accum x batch size)",
        default_text="processes x batch size x grad accum",
        metavar="N",
    )
    parallel: Parallel = option(
        "auto", "under torchrun: ddp (replicas) or fsdp (sharded); auto = ddp with several processes"
    )
    reduce_dtype: Literal["float32", "bfloat16"] = option(
        "float32", "fsdp on CUDA: dtype of the gradient reduce-scatter (bfloat16 halves the traffic)"
    )
    lr: float = option(6e-4, "peak learning rate (GPT-3's value for 125M models)")
    min_lr_ratio: float = option(0.1, "the cosine decays to lr x this (Chinchilla: 10x lower)")
    warmup: int = option(100, "linear warmup steps (capped at max steps)", metavar="N")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, on matmul weights only")
    beta1: float = option(0.9, "AdamW first-moment decay")
    # 0.95 (not 0.999) is steadier for language models (GPT-3).
    beta2: float = option(0.95, "AdamW second-moment decay")
    eps: float = option(1e-8, "AdamW denominator epsilon")
    grad_clip: float = option(1.0, "max global gradient norm, 0 = off")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    compile: bool = option(False, "torch.compile the model (CUDA: faster after a minute of compiling)")
    packing: Literal["concat", "best_fit"] = option(
        "concat", "how the loader fills rows: the token stream cut into rows, or whole documents best-fit"
    )
    doc_mask: bool = option(False, "attend within documents only; positions restart at every document")
    eval_interval: int = option(100, "evaluate on the val split every N steps (and at the end)", metavar="N")
    eval_batches: int = option(10, "val batches per evaluation (the same ones each time)", metavar="N")
    checkpoint_interval: int = option(500, "checkpoint every N steps (and at the end)", metavar="N")
    keep_checkpoints: int = option(3, "checkpoints kept; older ones are deleted after a new one", metavar="N")
    log_interval: int = option(1, "append a train record to metrics.jsonl every N steps", metavar="N")
    seed: int = option(0, "seed of the model init, the loader order, dropout and masking", metavar="N")
    progress: bool = option(True, "a progress line on stderr")

    def check(self, source: str = "train config") -> TrainConfig:
        """Every field's rule (not whether ``data`` and ``out`` are given: ``validate`` adds that)."""
        check_fields(self, source)
        check_device(source, self.device)
        for name in (
            "batch_size",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
            "keep_checkpoints",
            "log_interval",
        ):
            check_int(source, name, getattr(self, name))
        check_int(source, "seed", self.seed, 0)
        for name in ("max_steps", "max_tokens", "seq_len", "grad_accum", "global_batch_size"):
            check_int(source, name, getattr(self, name), optional=True)
        check_int(source, "warmup", self.warmup, 0)
        check_number(source, "lr", self.lr, open_low=True)
        check_number(source, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_number(source, "mask_prob", self.mask_prob, 0.0, 1.0, open_low=True)
        check_number(source, "weight_decay", self.weight_decay)
        check_number(source, "beta1", self.beta1, 0.0, 1.0, open_high=True)
        check_number(source, "beta2", self.beta2, 0.0, 1.0, open_high=True)
        check_number(source, "eps", self.eps, open_low=True)
        check_number(source, "grad_clip", self.grad_clip)
        return self

    def validate(self) -> TrainConfig:
        check_required(self, "train config")
        return self.check()

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(grad_accum, global_batch_size) for ``world_size`` ranks; raises when they cannot agree.
        Every rank computes it from the same config and environment, before any collective."""
        per_micro_step = world_size * self.batch_size  # rows the job takes per micro-step
        if self.global_batch_size is None:
            grad_accum = self.grad_accum or 1
            return grad_accum, per_micro_step * grad_accum
        if self.global_batch_size % per_micro_step:
            raise FerrolmError(
                f"global_batch_size {self.global_batch_size} is not divisible by world_size {world_size} x "
                f"batch_size {self.batch_size} = {per_micro_step}: change --batch-size or the number of "
                "processes"
            )
        grad_accum = self.global_batch_size // per_micro_step
        if self.grad_accum is not None and self.grad_accum != grad_accum:
            raise FerrolmError(
                f"global_batch_size {self.global_batch_size} = world_size {world_size} x batch_size "
                f"{self.batch_size} x grad_accum {grad_accum}, but grad_accum is {self.grad_accum}: give "
                "one of the two"
            )
        return grad_accum, self.global_batch_size


# ----------------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass
class FinetuneConfig(_Config):
    model: str = option(
        "",
        "pretrained model: a ferrolm run or a Hugging Face GPT-2/Llama/RoBERTa/ModernBERT directory",
        metavar="DIR",
        required="a run or Hugging Face directory",
    )
    train: str = option("", "labelled training data: .csv, .tsv or .jsonl", metavar="FILE", required="a file")
    eval: str = option(
        "",
        "labelled data scored after every epoch (chooses the epoch kept)",
        metavar="FILE",
        required="a labelled file scored each epoch",
    )
    out: str = option(
        "",
        "output directory: classifier.json (with this config), the weights, tokenizer.json",
        metavar="DIR",
        required="a directory",
    )
    text_column: str = option("sentence", "column (CSV/TSV header) or JSON key of the text (GLUE's name)")
    label_column: str = option("label", "column or JSON key of the label: a string or an integer")
    epochs: int = option(3, "passes over the training set (BERT and GPT-1 fine-tune for 3)", metavar="N")
    # Small: the pretrained weights need only a nudge.
    lr: float = option(1e-5, "peak learning rate")
    batch_size: int = option(32, "examples per step, over all processes under torchrun", metavar="N")
    max_length: int | None = option(
        None, "tokens kept per text (the end is cut)", default_text="the model's context", metavar="N"
    )
    warmup_ratio: float = option(0.06, "fraction of all steps warming up linearly (RoBERTa's value)")
    warmup_steps: int | None = option(
        None, "warmup length in steps, instead of --warmup-ratio", default_text="none", metavar="N"
    )
    weight_decay: float = option(0.01, "AdamW decay on matmul weights only (BERT's fine-tuning value)")
    grad_clip: float = option(1.0, "max global gradient norm, 0 = off")
    # GPT-2's value: small labelled sets overfit without it.
    dropout: float = option(0.1, "dropout on the embeddings and residuals")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when available)")
    parallel: Parallel = option(
        "auto", "under torchrun: ddp (replicas) or fsdp (sharded); auto = ddp with several processes"
    )
    seed: int = option(0, "seed of the head init, dropout and each epoch's example order", metavar="N")
    progress: bool = option(True, "a progress line on stderr")

    def check(self, source: str = "finetune config") -> FinetuneConfig:
        """Every field's rule (not whether model, train, eval and out are given: ``validate`` adds that)."""
        check_fields(self, source)
        for name in ("epochs", "batch_size"):
            check_int(source, name, getattr(self, name))
        check_int(source, "max_length", self.max_length, optional=True)
        check_int(source, "warmup_steps", self.warmup_steps, 0, optional=True)
        check_int(source, "seed", self.seed, 0)
        check_number(source, "lr", self.lr, open_low=True)
        check_number(source, "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_number(source, "weight_decay", self.weight_decay)
        check_number(source, "grad_clip", self.grad_clip)
        check_number(source, "dropout", self.dropout, 0.0, 1.0, open_high=True)
        check_columns(self.text_column, self.label_column)
        check_device(source, self.device)
        return self

    def validate(self) -> FinetuneConfig:
        check_required(self, "finetune config")
        return self.check()


def check_columns(text_column: Any, label_column: Any) -> None:
    """The text and label columns of labelled data: two different non-empty names."""
    for name, value in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise FerrolmError(f"finetune config: {name} must be a non-empty column name, got {value!r}")
    if text_column == label_column:
        raise FerrolmError(
            f"text_column and label_column are both {text_column!r}: the text and the label must be "
            "different columns (--text-column, --label-column)"
        )


# ----------------------------------------------------------------------------------------------------
# run.toml: the same fields as a file (read by --config, written into every run directory)

CONFIG_FILE = "config.toml"  # the resolved configuration a run was started with, in its directory


def _tomllib() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 (tomli is a dependency there)
        import tomli as tomllib
    return tomllib


def toml_value(text: str) -> Any:
    """``text`` read as one TOML value (``6``, ``0.1``, ``true``, ``"x"``, ``[1, 2]``); None if it is not one."""
    tomllib = _tomllib()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return None


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run.toml's table: top-level keys are config fields; a ``[model]`` table (pretraining) overrides
    GPTConfig fields. Raises ``FerrolmError`` naming the file on a syntax error."""
    tomllib = _tomllib()
    try:
        return tomllib.loads(read_text(path, "a run.toml (config keys, a [model] table)"))
    except tomllib.TOMLDecodeError as error:
        raise FerrolmError(f"{path}: not valid TOML: {error}") from None


def dump_toml(config: Any) -> str:
    """A config as TOML that ``load_toml`` + ``from_dict`` read back to an equal config. TOML has no
    null: a field that is None is left out (None is the default of every field that may be None), and
    so is a None in the ``model`` table (it cannot be said; it would read back as the preset's value)."""
    scalars, tables = [], []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, dict):
            body = [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
            tables.append(f"[{field.name}]\n" + "".join(line + "\n" for line in body))
        elif value is not None:
            scalars.append(f"{field.name} = {_toml_value(value)}\n")
    return "".join(scalars) + "".join("\n" + table for table in tables)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's int and float literals are TOML's (1e-05, 0.0006, 3)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (the same escapes) but for DEL, which TOML wants escaped;
        # not ASCII-only: JSON writes U+10000 and above as surrogate pairs, which TOML refuses.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise FerrolmError(f"cannot write {value!r} as a TOML value")
