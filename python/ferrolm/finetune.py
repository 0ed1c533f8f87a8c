"""Fine-tuning for sequence classification: a pretrained GPT, a labelled file, a classifier out.

Reads top to bottom like ``ferrolm.train``: the config, reading labelled files, the model (the GPT
backbone plus a linear ``score`` head), metrics, the classifier directory, the loop, then evaluation and
prediction. ``ferrolm finetune / evaluate / predict`` are thin shells over ``finetune``, ``evaluate``
and ``Classifier``.

- The head is Hugging Face's ``GPT2ForSequenceClassification`` (and ``LlamaForSequenceClassification``):
  ``score = Linear(n_embd, num_labels, bias=False)`` applied to the final hidden state of each text's
  LAST real token, the only position that has read the whole text in a causal model. ``ferrolm export``
  writes such a run as that Hugging Face class, whose logits equal ours.
- Padded batches, not packed ones. Each batch is padded on the right to its longest text with the
  tokenizer's ``<|endoftext|>`` id (what Hugging Face users set as ``pad_token_id`` for GPT-2, which has
  no pad token). In a causal model a token sees only the tokens before it, so the last real token never
  sees the pads after it: no attention mask is needed, the plain causal kernel runs, and a text's logits
  do not depend on the batch it is in. Packing several texts per row with a document mask would waste
  less compute on pads, but labelled texts are short and batches are padded only to their own longest
  text (evaluation also sorts by length first), so the saving is small, while padding keeps the forward
  pass and the pooling identical to the Hugging Face class we export to. Texts are encoded as ordinary
  text (``encode_ordinary``), so the pad id never occurs inside a text and "last real token" is also
  Hugging Face's "last token that is not ``pad_token_id``".
- A bidirectional encoder (a ``--objective mlm`` run, ``causal=False``) would let every real token attend
  to the pads. For it each row's pads become a document of their own in ``cu_seqlens`` (the document
  mask of ``ferrolm.kernels``' varlen attention), so real tokens attend to real tokens only. A RoBERTa
  encoder (``arch="roberta"``) pools as ``RobertaForSequenceClassification`` does: texts are framed
  ``<s> text </s>``, padded with ``<pad>``, and the head (dense + tanh + out_proj) reads ``<s>``; it
  exports as that class. A GPT-layout encoder (``arch="gpt2"``/``"llama"`` with ``causal=False``) reads
  the last real token, which in an encoder has seen the whole text; Hugging Face has no class for it,
  so those runs cannot be exported.
- Distributed (``torchrun --nproc_per_node=N -m ferrolm finetune``, ``ferrolm.distributed``, DDP or
  FSDP2): ``batch_size`` is the GLOBAL batch. Each epoch's example order is a seeded permutation of the
  whole training set, the same on every rank; each global batch is cut into ``world_size`` contiguous
  slices (sizes differ by one at most) and rank ``r`` takes slice ``r``; each rank's loss is its slice's
  SUMMED cross-entropy divided by the GLOBAL batch size, so the ranks' losses and gradients sum to the
  global batch's mean, and x world_size undoes the average DDP and FSDP take: N ranks take the step one
  process takes on the same examples, up to floating-point summation order. A rank whose slice is
  empty (a last batch smaller than world_size) runs a one-token row whose loss is multiplied by 0, so
  every rank reaches the same collectives and no example is skipped. Evaluation is split the same way
  and the log-probabilities are summed over ranks (every row comes from one rank, the others add exact
  zeros), so every rank scores the same numbers and takes the same best-epoch decision. Only rank 0
  writes files; FSDP's shards are gathered on rank 0 into the single-process weights file. Dropout
  draws from one stream per rank (rank 0's is the single-process one): with dropout > 0 the ranks
  match one process in distribution, not bit for bit.
- Files (convention 8): ``FT_RUN/classifier.json`` is written last, atomically, and names the weights
  file it goes with (with its sha256); a new best epoch writes new weights under a new name first, so a
  crash at any point leaves the previous best classifier complete. No pickle.

>>> summary = finetune(FinetuneConfig(model="runs/tiny", train="train.csv", eval="dev.csv",
...                                   out="runs/sst2"))                       # doctest: +SKIP
>>> Classifier.load("runs/sst2").predict(["a gripping, funny film"])          # doctest: +SKIP
[('positive', 0.97)]
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ferrolm import distributed
from ferrolm._core import FerrolmError
from ferrolm._files import (
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    parse_jsonl,
    read_bytes,
    remove_stale_temporaries,
    sha256_file,
)
from ferrolm.checkpoint import (
    check_file,
    check_finite,
    check_vocab,
    load_pretrained,
    read_tensors,
    read_versioned_json,
)
from ferrolm.config import FinetuneConfig, check_columns
from ferrolm.memory import check_memory
from ferrolm.model import GPT, GPTConfig
from ferrolm.train import _Progress, _rank_seed, lr_at, resolve_device

__all__ = [
    "Classifier",
    "Example",
    "FinetuneConfig",
    "SequenceClassifier",
    "TextFrame",
    "classification_metrics",
    "epoch_order",
    "evaluate",
    "finetune",
    "predict",
    "rank_loss",
    "rank_slice",
    "read_examples",
    "text_frame",
]

CLASSIFIER_FORMAT = "ferrolm-classifier"
CLASSIFIER_VERSION = 1
CLASSIFIER_FILE = "classifier.json"  # its presence marks a complete fine-tuned classifier directory
DATA_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}

Label = int | str


# ----------------------------------------------------------------------------------------------------
# Config: FinetuneConfig (every option, its default, help and rules) is ferrolm.config's; the
# learning-rate schedule is ferrolm.train.lr_at's, with BERT's linear decay.


# ----------------------------------------------------------------------------------------------------
# Labelled files: CSV, TSV (header row first) and JSON lines (one object per line)


@dataclass(frozen=True)
class Example:
    text: str
    label: Label
    line: int  # where the record starts in its file (1-based), for error messages


def read_examples(
    path: str | os.PathLike[str], text_column: str = "sentence", label_column: str = "label"
) -> list[Example]:
    """The labelled examples of a ``.csv``, ``.tsv`` or ``.jsonl``/``.json`` (JSON lines) file.

    CSV and TSV files are read with Python's ``csv`` module (a header row, fields quoted with ``"`` when
    they hold the delimiter, a quote or a newline). Labels are integers when every label of the file is
    one (a JSON integer, or a field such as ``3`` or ``-1``), strings otherwise. Every problem is a
    ``FerrolmError`` naming the file, the line and the column.
    """
    path = Path(path)
    check_columns(text_column, label_column)
    kind = DATA_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise FerrolmError(
            f"{path}: unknown data format {path.suffix!r}: use .csv, .tsv or .jsonl (JSON lines)"
        )
    raw = read_bytes(path, f"labelled data ({kind.upper()} with columns {text_column!r}, {label_column!r})")
    try:
        content = raw.decode("utf-8-sig")  # a byte-order mark (as Excel writes) is dropped
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise FerrolmError(
            f"{path}:{line}: not valid UTF-8 (byte {error.start}); save the file as UTF-8"
        ) from None
    records = _jsonl_records(path, content) if kind == "jsonl" else _delimited_records(path, content, kind)
    examples = []
    for line, record in records:
        for column in (text_column, label_column):
            if column not in record:
                present = ", ".join(repr(c) for c in record)
                raise FerrolmError(f"{path}:{line}: no column {column!r} (columns: {present})")
        text, label = record[text_column], record[label_column]
        if not isinstance(text, str):
            raise FerrolmError(f"{path}:{line}: column {text_column!r} must be a string, got {text!r}")
        if not text.strip():
            raise FerrolmError(f"{path}:{line}: column {text_column!r} is empty (every example needs text)")
        if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
            raise FerrolmError(
                f"{path}:{line}: column {label_column!r} must be a non-empty string or an integer, got {label!r}"
            )
        examples.append(Example(text, label, line))
    if not examples:
        raise FerrolmError(
            f"{path}: no examples (the file is empty{' but for its header' if raw.strip() else ''})"
        )
    as_ints = [i for e in examples if (i := _as_int(e.label)) is not None]
    if len(as_ints) == len(examples):
        return [dataclasses.replace(e, label=i) for e, i in zip(examples, as_ints, strict=True)]
    return [dataclasses.replace(e, label=str(e.label)) for e in examples]


def _as_int(label: Label) -> int | None:
    """An integer label, or the integer a field spells in canonical form ("3", "-1"; not "03", "+3")."""
    if isinstance(label, int):
        return label
    return int(label) if re.fullmatch(r"-?(0|[1-9][0-9]*)", label) and label != "-0" else None


def _delimited_records(path: Path, content: str, kind: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(content, newline=""), delimiter="," if kind == "csv" else "\t")
    records: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    try:
        while True:
            start = reader.line_num + 1  # line_num counts the lines read so far; a record may span several
            row = next(reader, None)
            if row is None:
                break
            if not row:  # a blank line
                continue
            if header is None:
                repeated = sorted({name for name in row if row.count(name) > 1})
                if repeated:
                    raise FerrolmError(
                        f"{path}:{start}: the header names {', '.join(map(repr, repeated))} more than once; "
                        "every column needs its own name"
                    )
                header = row
                continue
            if len(row) != len(header):
                raise FerrolmError(
                    f"{path}:{start}: {len(row)} fields, the header has {len(header)} "
                    f"({', '.join(map(repr, header))}); quote fields that hold the delimiter"
                )
            records.append((start, dict(zip(header, row, strict=True))))
    except csv.Error as error:
        raise FerrolmError(f"{path}:{reader.line_num}: malformed {kind.upper()} ({error})") from None
    return records


def _jsonl_records(path: Path, content: str) -> list[tuple[int, dict[str, Any]]]:
    records = parse_jsonl(path, content, "JSON lines: one object per line")
    for line, record in records:
        if not isinstance(record, dict):
            raise FerrolmError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
    return records


def _label_ids(examples: list[Example], labels: Sequence[Label], path: str) -> list[int]:
    """Each example's label as an index into ``labels`` (a classifier's sorted label list)."""
    ints = all(isinstance(label, int) for label in labels)
    index = {label: i for i, label in enumerate(labels)}
    ids = []
    for example in examples:
        label = _as_int(example.label) if ints else str(example.label)
        if label not in index:
            raise FerrolmError(
                f"{path}:{example.line}: label {example.label!r} is not one the classifier knows "
                f"({', '.join(map(repr, labels))})"
            )
        ids.append(index[label])
    return ids


# ----------------------------------------------------------------------------------------------------
# Model


class SequenceClassifier(nn.Module):
    """A GPT backbone and a classification head, pooled the way the backbone's Hugging Face family does
    (``GPTConfig.spec.pooling``):

    - "last" (GPT-2, Llama: ``GPT2ForSequenceClassification``): a linear ``score`` (no bias) on each
      text's last real token, the only position that has read the whole text in a causal model;
    - "first": the first token (``<s>`` or ``[CLS]``, see ``text_frame``) through ``spec.classifier``:
      RoBERTa's ``RobertaClassificationHead`` ("dense_tanh": ``pool`` dense + tanh, then ``score`` with
      bias) or ModernBERT's ("dense_gelu_norm": ``pool`` dense + GELU + ``pool_norm``, then ``score``).

    ``forward(idx (B, T), lengths (B,)) -> logits (B, num_labels)``; rows are right-padded, row ``b``'s
    real tokens are ``idx[b, :lengths[b]]``.
    """

    def __init__(self, gpt: GPT, num_labels: int) -> None:
        super().__init__()
        self.gpt = gpt
        C = gpt.config.n_embd
        spec = gpt.config.spec
        self.pooling, self.head = spec.pooling, spec.classifier
        if self.head == "linear":  # Hugging Face's `score`: no bias
            self.score = nn.Linear(C, num_labels, bias=False)
        else:  # a dense layer first, then a classifier with a bias (RoBERTa's, ModernBERT's)
            self.pool = nn.Linear(C, C, bias=spec.bias or self.head == "dense_tanh")
            if self.head == "dense_gelu_norm":
                self.pool_norm = nn.LayerNorm(C, eps=gpt.config.norm_eps, bias=spec.norm_bias)
            self.score = nn.Linear(C, num_labels)
            nn.init.normal_(self.pool.weight, mean=0.0, std=0.02)
            for bias in (self.pool.bias, self.score.bias):
                if bias is not None:
                    nn.init.zeros_(bias)
            self.dropout = nn.Dropout(gpt.config.dropout)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)  # like every other linear layer

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        kwargs: dict[str, Any] = {}
        if not self.gpt.config.causal:
            # An encoder: row b is two documents, its text and its pads, so no text token sees a pad.
            row_starts = torch.arange(B, device=idx.device) * T  # (B,)
            bounds = torch.stack([row_starts + lengths, row_starts + T], dim=1).flatten()  # (2B,)
            cu_seqlens = torch.cat([bounds.new_zeros(1), bounds]).to(torch.int32)  # (2B + 1,)
            kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=T)
        hidden, _ = self.gpt(idx, return_hidden=True, **kwargs)  # (B, T, C)
        if self.pooling == "first":
            x = hidden[:, 0]  # (B, C): the <s> / [CLS] token
        else:
            x = hidden[torch.arange(B, device=idx.device), lengths - 1]  # (B, C): the last real token
        if self.head == "dense_tanh":
            x = self.dropout(torch.tanh(self.pool(self.dropout(x))))  # (B, C)
        elif self.head == "dense_gelu_norm":
            x = self.dropout(self.pool_norm(F.gelu(self.pool(x))))  # (B, C)
        return self.score(x)  # (B, num_labels)

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        groups = self.gpt.optimizer_groups(weight_decay)
        for name, p in self.head_weights().items():  # matmul weights decayed like the others, biases not
            parameter = self.get_parameter(name)
            groups[0 if p.dim() >= 2 else 1]["params"].append(parameter)
        return groups

    def head_weights(self) -> dict[str, torch.Tensor]:
        """The head's tensors: ``score.weight`` (and ``score.bias``, ``pool.*``, ``pool_norm.*`` for the
        dense heads)."""
        return {
            name: p.detach().contiguous()
            for name, p in self.named_parameters()
            if not name.startswith("gpt.")
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors under their ferrolm names, plus the head's."""
        return {**self.gpt.weights(), **self.head_weights()}


@dataclass(frozen=True)
class TextFrame:
    """How a text becomes a classifier's input: ``prefix + ids + suffix``, batches padded with ``pad_id``."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int


def text_frame(config: GPTConfig, special_tokens: dict[str, int], source: str) -> TextFrame:
    """The framing of the backbone's Hugging Face family (``spec.frame_tokens``): RoBERTa's tokenizer
    writes ``<s> text </s>`` and pads with ``<pad>`` (ModernBERT's: ``[CLS] text [SEP]``, ``[PAD]``), its
    classifier reads the first token; GPT-2's adds nothing and users pad with ``<|endoftext|>`` (the
    classifier reads the last real token, which never sees the pads)."""
    frame = config.spec.frame_tokens
    if frame:
        begin, end, pad = frame
        missing = [name for name in frame if name not in special_tokens]
        if missing:
            raise FerrolmError(
                f"{source}: a {config.arch} classifier frames texts as {begin} text {end} and pads with "
                f"{pad}; the tokenizer lacks {', '.join(missing)}"
            )
        return TextFrame((special_tokens[begin],), (special_tokens[end],), special_tokens[pad])
    for name in ("<|endoftext|>", "</s>", "<|end_of_text|>"):  # Tokenizer.eot_token's names
        if name in special_tokens:
            return TextFrame((), (), special_tokens[name])
    raise FerrolmError(f"{source}: the tokenizer has no <|endoftext|> (or </s>) token to pad with")


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to the longest: (idx (B, T) int64, lengths (B,) int64)."""
    T = max(len(s) for s in sequences)
    idx = torch.full((len(sequences), T), pad_id, dtype=torch.long)  # (B, T)
    for row, s in enumerate(sequences):
        idx[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)  # (B,)
    return idx.to(device), lengths.to(device)


@torch.no_grad()
def _log_probs(
    model: SequenceClassifier,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Log-probabilities (N, num_labels), float32 on the CPU, in eval mode. Texts are batched by length
    (less padding); each text's result does not depend on its batch (see the module docstring).

    With ``world_size`` > 1 each batch of ``batch_size`` texts is split as training splits a global
    batch: this rank fills its rows and leaves the others 0, so the sum over ranks is the whole result.
    Every rank runs one forward per batch, an empty slice a one-token row (FSDP all-gathers the
    parameters in every forward: all ranks must run the same number)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = torch.zeros(len(sequences), model.score.out_features)  # (N, K)
    with _autocast(device):
        for start in range(0, len(order), batch_size):
            rows = rank_slice(order[start : start + batch_size], rank, world_size)
            idx, lengths = pad_batch([sequences[i] for i in rows] or [[pad_id]], pad_id, device)
            log_probs = F.log_softmax(model(idx, lengths).float(), dim=-1).cpu()  # (B, K)
            if rows:
                out[rows] = log_probs
    model.train(was_training)
    return out


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# ----------------------------------------------------------------------------------------------------
# Metrics


def classification_metrics(true: Sequence[int], predicted: Sequence[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 and the confusion matrix of label indices.

    ``confusion[t][p]`` counts examples of true label ``t`` predicted ``p``. Macro-F1 averages the F1 of
    every label that occurs among the true OR the predicted labels (scikit-learn's default), where
    F1 = 2 TP / (2 TP + FP + FN).
    """
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(true, predicted, strict=True):
        confusion[t][p] += 1
    n = len(true)
    f1s = []
    for k in range(num_labels):
        tp = confusion[k][k]
        fn = sum(confusion[k]) - tp
        fp = sum(row[k] for row in confusion) - tp
        if tp + fn + fp:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": sum(confusion[k][k] for k in range(num_labels)) / n if n else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "confusion": confusion,
    }


def _score(log_probs: torch.Tensor, label_ids: Sequence[int]) -> dict[str, Any]:
    """Metrics of log-probabilities (N, K) against the true label ids, with the mean cross-entropy."""
    target = torch.tensor(label_ids, dtype=torch.long)
    metrics = classification_metrics(label_ids, log_probs.argmax(dim=-1).tolist(), log_probs.shape[1])
    metrics["loss"] = float(F.nll_loss(log_probs, target)) if len(label_ids) else float("nan")
    metrics["n"] = len(label_ids)
    return metrics


# ----------------------------------------------------------------------------------------------------
# The pretrained model in, the classifier directory out


def load_backbone(path: str | os.PathLike[str]) -> tuple[GPT, Any]:
    """(GPT, ferrolm Tokenizer) of a ``ferrolm pretrain`` run directory or a Hugging Face directory."""
    from ferrolm import Tokenizer

    path = Path(path)
    if (path / CLASSIFIER_FILE).is_file():
        raise FerrolmError(
            f"{path} is a fine-tuned classifier: fine-tune from the pretrained model it came from "
            f"(its {CLASSIFIER_FILE} names it under source_model)"
        )
    model = load_pretrained(path)
    tokenizer = Tokenizer.from_pretrained(path)
    check_vocab(tokenizer.vocab_size, model.config.vocab_size, path, path)
    return model, tokenizer


def _encode(
    tokenizer: Any, texts: Sequence[str], max_length: int, frame: TextFrame | None = None
) -> tuple[list[list[int]], int]:
    """Token ids of each text, framed (``frame.prefix + ids + frame.suffix``) and cut so that the
    whole is at most ``max_length`` (the text's end is cut, never the frame); and how many were cut."""
    prefix, suffix = (list(frame.prefix), list(frame.suffix)) if frame is not None else ([], [])
    keep = max_length - len(prefix) - len(suffix)
    if keep < 1:
        raise FerrolmError(
            f"max_length {max_length} leaves no room for text inside the frame {prefix}/{suffix}"
        )
    ids = tokenizer.encode_ordinary_batch(list(texts))  # ordinary text: never the pad (special) id
    return [prefix + s[:keep] + suffix for s in ids], sum(len(s) > keep for s in ids)


def _full_weights(ctx: distributed.Context, model: SequenceClassifier) -> dict[str, torch.Tensor]:
    """``model.weights()`` on rank 0 (``{}`` elsewhere), from the full state dict: FSDP's shards are
    all-gathered (a collective: every rank calls it)."""
    state = ctx.full_model_state(model)
    tied = model.gpt.config.tie_embeddings  # the tied lm_head.weight is transformer.wte.weight: kept once
    return {
        name.removeprefix("gpt."): tensor.detach().contiguous()
        for name, tensor in state.items()
        if not (tied and name == "gpt.lm_head.weight")
    }


def _start_out(out: Path, tokenizer: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written (only ours: see ferrolm._files)
    atomic_write_text(out / "tokenizer.json", tokenizer.to_json())


def _check_new_out(out: Path) -> None:
    if (out / CLASSIFIER_FILE).exists():
        raise FerrolmError(f"{out} already holds a fine-tuned classifier: choose another --out")


def _save_best(out: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights under a new name, then classifier.json naming them (atomically), then the old weights go."""
    from safetensors.torch import save_file

    name = f"model-epoch-{meta['epoch']:03d}.safetensors"
    weights = {k: v.cpu() for k, v in weights.items()}
    check_finite(weights, f"epoch {meta['epoch']}", ": the run diverged; not saved (lower --lr)")
    with atomic_file(out / name) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    meta = {**meta, "weights": name, "size": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    atomic_write_json(out / CLASSIFIER_FILE, meta)
    for old in out.glob("model-epoch-*.safetensors"):
        if old.name != name:
            old.unlink()


# ----------------------------------------------------------------------------------------------------
# The loop


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation of range(n) by torch's CPU generator (Mersenne
    Twister) seeded with ``seed`` and the epoch, the same on every rank and on every run."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def rank_slice(rows: Sequence[int], rank: int, world_size: int) -> Sequence[int]:
    """Rank ``rank``'s contiguous share of a global batch (shares differ in size by one at most)."""
    n = len(rows)
    return rows[rank * n // world_size : (rank + 1) * n // world_size]


def rank_loss(
    model: nn.Module,  # a SequenceClassifier, or its DDP / FSDP wrapper
    sequences: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    global_batch: int,
    pad_id: int,
) -> tuple[torch.Tensor, int]:
    """(loss, real tokens) of one rank's rows: their SUMMED cross-entropy divided by the number of rows in
    the GLOBAL batch, so that the losses (and gradients) of all ranks add up to the global batch's mean."""
    device = next(model.parameters()).device  # (works for a wrapped model too)
    idx, lengths = pad_batch(sequences, pad_id, device)
    target = torch.tensor(label_ids, dtype=torch.long, device=device)
    with _autocast(device):
        logits = model(idx, lengths)  # (b, K)
    loss = F.cross_entropy(logits.float(), target, reduction="sum") / global_batch
    return loss, int(lengths.sum())


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune ``config.model`` to classify ``config.train`` into ``config.out``; the epoch with the best
    eval accuracy (ties: the lower eval loss) is kept. Returns a summary.

    Under ``torchrun`` every process calls it (``torchrun --nproc_per_node=N -m ferrolm finetune``):
    ``config.parallel`` picks DDP or FSDP2, each rank trains on its slice of every global batch of
    ``batch_size`` examples, and only rank 0 writes files (see the module docstring)."""
    # Every check that needs no peer runs first: each rank sees the same config and environment, so
    # each raises the same error, and none is left waiting in a collective for one that stopped.
    config.validate()
    _, world_size, _ = distributed.world_from_env()
    if config.batch_size < world_size:
        raise FerrolmError(
            f"batch_size {config.batch_size} (the global batch) is smaller than world_size {world_size}: "
            f"each process needs an example in every step; use --batch-size {world_size} or more"
        )
    device = resolve_device(config.device)
    ctx = distributed.init(config.parallel, device)
    with ctx:  # on leaving, the ranks meet and leave the group (see Context.close)
        return _finetune(config, ctx)


def _finetune(config: FinetuneConfig, ctx: distributed.Context) -> dict[str, Any]:
    """The loop of ``finetune``, as one rank runs it (a single process is rank 0 of 1)."""
    device = ctx.device
    out = Path(config.out)
    ctx.on_main(_check_new_out, out)  # rank 0 looks; every rank gets its verdict

    # --- data: labels come from the training set, sorted (integers numerically) ----------------------
    def read_data() -> tuple[list[Example], list[Example], list[Label], list[int], list[int]]:
        train = read_examples(config.train, config.text_column, config.label_column)
        labels: list[Label] = sorted({e.label for e in train})  # type: ignore[type-var]
        if len(labels) < 2:
            raise FerrolmError(f"{config.train}: needs at least 2 distinct labels, found {labels}")
        evaluation = read_examples(config.eval, config.text_column, config.label_column)
        return (
            train,
            evaluation,
            labels,
            _label_ids(train, labels, config.train),
            _label_ids(evaluation, labels, config.eval),
        )

    # Every rank reads the files; an error on any rank (a file one node cannot see) stops every rank.
    train, evaluation, labels, train_y, eval_y = ctx.agreed(read_data)

    # --- model: the pretrained backbone, a fresh head (the same seed: the same head on every rank) ----
    torch.manual_seed(config.seed)
    gpt, tokenizer = ctx.agreed(load_backbone, config.model)
    shards = ctx.world_size if ctx.parallel == "fsdp" else 1  # the weights fit; does their training?
    check_memory(gpt.config, device, training=True, shards=shards, source=f"finetune {config.model}")
    frame = text_frame(gpt.config, tokenizer.special_tokens, str(config.model))
    pad_id = frame.pad_id
    max_length = config.max_length or gpt.config.block_size
    if max_length > gpt.config.block_size:
        raise FerrolmError(f"max_length {max_length} exceeds the model's context of {gpt.config.block_size}")
    gpt.config.dropout = config.dropout
    for module in gpt.modules():
        if isinstance(module, nn.Dropout):
            module.p = config.dropout
    for name, parameter in gpt.named_parameters():
        if name.startswith(("lm_head.", "lm_transform.")):
            # The LM head (an untied weight, RoBERTa's MLM transform and bias) takes no part in
            # classification (its gradient is always None, AdamW never moves it); frozen, DDP does not
            # wait for that gradient either. (A tied lm_head.weight is transformer.wte.weight: trained.)
            parameter.requires_grad_(False)
    model = SequenceClassifier(gpt, len(labels)).to(device)
    ctx.broadcast_module(model)  # every rank starts from rank 0's weights
    # What forward and backward run through: DDP, FSDP2 (sharded per block, in place) or the model.
    wrapped = ctx.wrap(model, blocks=model.gpt.transformer.h)  # type: ignore[arg-type]
    if ctx.rank > 0:  # dropout: a stream per rank (rank 0's is the single-process one)
        torch.manual_seed(_rank_seed(config.seed, ctx.rank))
    train_x, cut = _encode(tokenizer, [e.text for e in train], max_length, frame)
    eval_x, eval_cut = _encode(tokenizer, [e.text for e in evaluation], max_length, frame)

    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    warmup = (
        config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
    )
    optimizer = torch.optim.AdamW(
        model.optimizer_groups(config.weight_decay),  # after wrap: FSDP's parameters are its shards
        lr=config.lr,
        betas=(0.9, 0.999),  # the usual fine-tuning betas (BERT); short runs need no 0.95
        eps=1e-8,
        fused=device.type == "cuda" and ctx.parallel != "fsdp",  # FSDP's DTensor shards use foreach
    )

    progress = _Progress(config.progress and ctx.is_main, total_steps, 0)
    if cut or eval_cut:
        progress.note(f"{cut} training and {eval_cut} eval texts are longer than {max_length} tokens: cut")
    meta = {
        "format": CLASSIFIER_FORMAT,
        "version": CLASSIFIER_VERSION,
        "model_config": gpt.config.to_dict(),
        "num_labels": len(labels),
        "labels": labels,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {str(label): i for i, label in enumerate(labels)},
        "pad_token_id": pad_id,
        "frame": {"prefix": list(frame.prefix), "suffix": list(frame.suffix)},  # around every text
        "max_length": max_length,
        "text_column": config.text_column,
        "label_column": config.label_column,
        "source_model": str(config.model),
        "finetune_config": dataclasses.asdict(config),
    }
    records: list[dict[str, Any]] = []
    ctx.on_main(_start_out, out, tokenizer)

    step, best = 0, None
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = epoch_order(len(train), config.seed, epoch)
        train_loss, train_count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]  # the global batch
            lr = lr_at(step, total_steps, lr=config.lr, warmup=warmup, decay="linear")
            for group in optimizer.param_groups:
                group["lr"] = lr
            started = time.perf_counter()
            rows = rank_slice(batch, ctx.rank, ctx.world_size)  # this rank's share
            if rows:
                loss, tokens = rank_loss(
                    wrapped, [train_x[i] for i in rows], [train_y[i] for i in rows], len(batch), pad_id
                )
            else:  # a last batch smaller than world_size: every rank must still run the forward and
                # backward (DDP's all-reduce, FSDP's all-gathers), so a one-token row that counts for 0
                loss, tokens = rank_loss(wrapped, [[pad_id]], [0], len(batch), pad_id)[0] * 0.0, 0
            # DDP and FSDP average the ranks' gradients; x world_size makes that average their sum, the
            # gradient of the global batch's mean loss: the one a single process computes.
            (loss * ctx.world_size).backward()
            # The slices' losses add up to the global batch's mean; the job's tokens for the speed.
            job = torch.tensor([float(loss.detach()), tokens], dtype=torch.float64, device=device)
            batch_loss, job_tokens = ctx.all_reduce(job).tolist()
            # Every rank sees the same sum, so all stop together, before the step spreads NaN weights.
            _check_loss(
                batch_loss, f"the training loss at step {step + 1} (epoch {epoch}, lr {lr:.3g})", out, best
            )
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss += batch_loss * len(batch)
            train_count += len(batch)
            tokens_per_s = job_tokens / max(time.perf_counter() - started, 1e-9)
            progress.update(step + 1, batch_loss, lr, tokens_per_s, world_size=ctx.world_size)
            step += 1

        # Each rank scores its slices; every row comes from one rank and zeros from the others, so the
        # sum is exact and the same on every rank: so are the metrics and the best-epoch decision.
        log_probs = _log_probs(model, eval_x, pad_id, config.batch_size, device, ctx.rank, ctx.world_size)
        result = _score(ctx.all_reduce(log_probs.to(device)).cpu(), eval_y)
        _check_loss(result["loss"], f"the eval loss after epoch {epoch}", out, best)
        is_best = best is None or (result["accuracy"], -result["loss"]) > (best["accuracy"], -best["loss"])
        records.append(
            {
                "epoch": epoch,
                "step": step,
                "train_loss": train_loss / max(train_count, 1),
                **{f"eval_{k}": v for k, v in result.items()},
                "best": is_best,
            }
        )
        if is_best:
            best = {**result, "epoch": epoch}
            weights = _full_weights(ctx, model)  # on rank 0 (FSDP: gathered, every rank takes part)
            ctx.on_main(_save_best, out, weights, {**meta, "epoch": epoch, "step": step, "metrics": result})
        ctx.on_main(atomic_write_text, out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        progress.note(
            f"epoch {epoch}/{config.epochs}: eval accuracy {result['accuracy']:.4f}, macro-F1 "
            f"{result['macro_f1']:.4f}, loss {result['loss']:.4f}" + (" (best so far)" if is_best else "")
        )
    progress.close()
    assert best is not None
    return {
        "run_dir": str(out),
        "best_epoch": best["epoch"],
        "accuracy": best["accuracy"],
        "macro_f1": best["macro_f1"],
        "eval_loss": best["loss"],
        "epochs": config.epochs,
        "steps": step,
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "labels": labels,
        "world_size": ctx.world_size,
    }


def _check_loss(loss: float, what: str, out: Path, best: dict[str, Any] | None) -> None:
    """A NaN or infinite loss stops fine-tuning with an error: a diverged model is never saved as the
    best epoch, and the command does not exit 0."""
    if math.isfinite(loss):
        return
    kept = (
        f"the best classifier so far (epoch {best['epoch']}) is in {out}"
        if best is not None
        else "nothing was saved"
    )
    raise FerrolmError(f"{what} is {loss}: fine-tuning diverged; {kept}; lower --lr (or --grad-clip)")


# ----------------------------------------------------------------------------------------------------
# Evaluation and prediction


class Classifier:
    """A fine-tuned classifier directory, loaded once: ``predict`` texts, ``evaluate`` labelled files.

    >>> clf = Classifier.load("runs/sst2")                                   # doctest: +SKIP
    >>> clf.predict(["what a film", "dull"])                                 # doctest: +SKIP
    [('positive', 0.93), ('negative', 0.88)]
    """

    def __init__(self, model: SequenceClassifier, tokenizer: Any, meta: dict[str, Any], device: torch.device):
        self.model, self.tokenizer, self.meta, self.device = model, tokenizer, meta, device
        self.labels: list[Label] = meta["labels"]
        framing = meta.get("frame") or {}  # (classifiers saved before framing existed: none)
        self.frame = TextFrame(
            tuple(framing.get("prefix", ())), tuple(framing.get("suffix", ())), meta["pad_token_id"]
        )

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str], device: str = "cpu") -> Classifier:
        from ferrolm import Tokenizer

        run_dir = Path(run_dir)
        meta_path = run_dir / CLASSIFIER_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{run_dir}: no {CLASSIFIER_FILE} (not a ferrolm finetune output)")
        meta = read_versioned_json(meta_path, CLASSIFIER_FORMAT, CLASSIFIER_VERSION, "classifier")
        name = meta.get("weights")
        if not isinstance(name, str) or not re.fullmatch(r"model-epoch-[0-9]{3,}\.safetensors", name):
            raise FerrolmError(
                f"{meta_path}: weights must name a model-epoch-NNN.safetensors file in {run_dir}, got {name!r}"
            )
        weights_path = run_dir / name
        check_file(weights_path, meta.get("sha256"), meta_path, size=meta.get("size"))
        state = read_tensors(weights_path)
        gpt = GPT(GPTConfig.from_dict(meta["model_config"]))
        model = SequenceClassifier(gpt, meta["num_labels"])
        head = {name: state.pop(name, None) for name in model.head_weights()}
        for name, own in model.head_weights().items():
            if head[name] is None or tuple(head[name].shape) != tuple(own.shape):  # type: ignore[union-attr]
                raise FerrolmError(f"{weights_path}: no {name} of shape {tuple(own.shape)} (num_labels, ...)")
        gpt.load_weights(state, source=str(weights_path))
        with torch.no_grad():
            for name, tensor in head.items():
                model.get_parameter(name).copy_(tensor)  # type: ignore[arg-type]
        target = resolve_device(device)
        return cls(model.to(target).eval(), Tokenizer.from_pretrained(run_dir), meta, target)

    def log_probs(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Log-probabilities (N, num_labels) of ``texts``, label order ``self.labels``."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise FerrolmError(f"text {i} is empty or not a string: {text!r}")
        ids, _ = _encode(self.tokenizer, texts, self.meta["max_length"], self.frame)
        return _log_probs(self.model, ids, self.meta["pad_token_id"], batch_size, self.device)

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[tuple[Label, float]]:
        """(label, probability) of the likeliest label of each text."""
        best = self.log_probs(texts, batch_size).max(dim=-1)
        return [
            (self.labels[i], math.exp(lp))
            for lp, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ]

    def evaluate(
        self,
        data: str | os.PathLike[str],
        *,
        text_column: str | None = None,
        label_column: str | None = None,
        batch_size: int = 64,
    ) -> dict[str, Any]:
        """Accuracy, macro-F1, confusion matrix (rows true, columns predicted, in ``labels`` order), mean
        cross-entropy ``loss`` and example count ``n`` on a labelled file. Columns default to the ones
        the classifier was trained with."""
        examples = read_examples(
            data, text_column or self.meta["text_column"], label_column or self.meta["label_column"]
        )
        label_ids = _label_ids(examples, self.labels, str(data))
        result = _score(self.log_probs([e.text for e in examples], batch_size), label_ids)
        return {**result, "labels": self.labels}


def evaluate(
    run_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """``Classifier.load(run_dir).evaluate(data)``: keys accuracy, macro_f1, confusion, labels, loss, n."""
    return Classifier.load(run_dir, device).evaluate(
        data, text_column=text_column, label_column=label_column, batch_size=batch_size
    )


def predict(
    run_dir: str | os.PathLike[str], texts: Sequence[str], *, device: str = "cpu"
) -> list[tuple[Label, float]]:
    """``Classifier.load(run_dir).predict(texts)``: (label, probability) per text."""
    return Classifier.load(run_dir, device).predict(texts)
