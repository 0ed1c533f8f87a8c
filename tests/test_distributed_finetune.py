"""Distributed fine-tuning under torchrun, on the CPU: gloo, 2 processes, tiny classifiers.

The contract (docs/distributed.md, "Fine-tuning"): ``batch_size`` is the global batch, so 2 processes
take the steps one process takes on the same examples; per-epoch train loss, eval metrics and the kept
weights match a 1-process run up to fp32 summation order. An FSDP run is gathered into the
single-process layout, which ``ferrolm evaluate / predict / export`` read unchanged. A bad configuration
stops both ranks with one line each, never a hang. The torchrun helpers come from test_distributed.py
(plain functions: a 2-process launch with a timeout, and the one-line-per-rank check).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

from safetensors.torch import load_file  # noqa: E402
from test_distributed import assert_every_rank_failed, torchrun  # noqa: E402
from test_finetune import sentiment, write_csv  # noqa: E402

from ferrolm import FerrolmError, Tokenizer  # noqa: E402
from ferrolm.cli import main  # noqa: E402
from ferrolm.export import export_hf  # noqa: E402
from ferrolm.finetune import Classifier, FinetuneConfig, evaluate, finetune  # noqa: E402
from ferrolm.model import GPT, GPTConfig  # noqa: E402

# 61 examples in global batches of 5: every step splits 2 + 3 over the ranks, and each epoch ends with
# a batch of 1, where rank 0's slice is empty (it runs a one-token row whose loss counts for nothing).
SPLITS = (("train", 61, 1), ("dev", 23, 2), ("test", 40, 3))  # (file, examples, seed)
RUN = dict(epochs=2, lr=1e-3, batch_size=5, dropout=0.0, seed=3)
# Same examples, different summation order (fp32): measured relative differences are about 1e-7.
LOSS_TOLERANCE = 1e-5
# Max abs difference of the kept weights after 26 AdamW steps: measured about 5e-7 (DDP, FSDP).
WEIGHT_TOLERANCE = 1e-5
# GPT-2's attention KEY bias has an exactly zero gradient (softmax ignores a constant added to all of a
# query's scores), so all it gets is rounding noise, which AdamW normalises into steps of about
# lr x noise / eps: its values (~1e-5, drifted from 0 in either run) differ with the summation order.
NOISE_ONLY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """train/dev/test CSVs and tiny random GPT-2 (tied LM head) and Llama (untied) HF directories."""
    root = tmp_path_factory.mktemp("distributed-finetune")
    paths = {name: write_csv(root / f"{name}.csv", sentiment(n, seed)) for name, n, seed in SPLITS}
    tokenizer = Tokenizer.train(iter([t for t, _ in sentiment(200, 0)]), 300, show_progress=False)
    tokenizer.save(root / "tokenizer.json")
    for preset in ("tiny", "tiny-llama"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset(preset, vocab_size=tokenizer.vocab_size))
        paths[preset] = export_hf(model, root / preset, tokenizer_file=root / "tokenizer.json")
    return {"root": root, **paths}


def one_process(task: dict[str, Path], preset: str) -> Path:
    """The 1-process run every 2-process run must reproduce."""
    out = task["root"] / f"one-{preset}"
    config = FinetuneConfig(
        model=str(task[preset]), train=str(task["train"]), eval=str(task["dev"]), out=str(out),
        progress=False, **RUN,  # type: ignore[arg-type]
    )  # fmt: skip
    finetune(config)
    return out


def two_processes(task: dict[str, Path], preset: str, parallel: str, tmp_path: Path) -> Path:
    out = tmp_path / parallel
    options = [f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]
    args = ["finetune", f"--model={task[preset]}", f"--train={task['train']}", f"--eval={task['dev']}"]
    result = torchrun([*args, f"--out={out}", *options, f"--parallel={parallel}", "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best epoch") == 1, result.stdout  # rank 0 reports for the job
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    """The same epochs, losses, metrics, best epoch, files and (close) weights as the 1-process run."""
    got, want = (
        [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        for r in (run, reference)
    )
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2]
    for mine, theirs in zip(got, want, strict=True):
        for key in ("train_loss", "eval_loss"):  # the job's, not rank 0's share
            assert mine[key] == pytest.approx(theirs[key], rel=LOSS_TOLERANCE), (key, mine["epoch"])
        for key in ("step", "eval_accuracy", "eval_macro_f1", "eval_confusion", "eval_n", "best"):
            assert mine[key] == theirs[key], (key, mine["epoch"])
    meta, want_meta = (json.loads((r / "classifier.json").read_text()) for r in (run, reference))
    assert {p.name for p in run.iterdir()} == {p.name for p in reference.iterdir()}
    assert (run / "tokenizer.json").read_text() == (reference / "tokenizer.json").read_text()
    assert meta["weights"] == want_meta["weights"] and meta["labels"] == want_meta["labels"]
    weights, want_weights = (load_file(r / meta["weights"]) for r in (run, reference))
    assert sorted(weights) == sorted(want_weights)  # the single-process layout
    for name, want_tensor in want_weights.items():
        diff = (weights[name] - want_tensor).abs()  # same shape, or this fails
        if name.endswith("attn.c_attn.bias"):  # (3C,): query, key, value biases
            key = slice(len(diff) // 3, 2 * len(diff) // 3)
            assert diff[key].max().item() < NOISE_ONLY_TOLERANCE, name
            diff[key] = 0.0
        assert diff.max().item() < WEIGHT_TOLERANCE, (name, diff.max().item())


def test_ddp_matches_one_process(task, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """(a) DDP with Llama's untied LM head (frozen: DDP must not wait for its gradient)."""
    run = two_processes(task, "tiny-llama", "ddp", tmp_path)
    assert_same_run(run, one_process(task, "tiny-llama"))


def test_fsdp_matches_one_process_and_its_run_is_a_plain_one(task, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """(b) FSDP2 with GPT-2's tied LM head: gathered on rank 0 into the weights file of a 1-process run,
    which the single-process tools read unchanged."""
    run = two_processes(task, "tiny", "fsdp", tmp_path)
    reference = one_process(task, "tiny")
    assert_same_run(run, reference)

    assert main(["evaluate", str(run), "--data", str(task["test"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    want = evaluate(reference, task["test"])
    assert result["confusion"] == want["confusion"] and result["loss"] == pytest.approx(
        want["loss"], rel=1e-5
    )
    texts = ["the movie was truly lovely", "the plot was very horrible"]
    assert [label for label, _ in Classifier.load(run).predict(texts)] == [
        label for label, _ in Classifier.load(reference).predict(texts)
    ]
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["num_labels"] == 2


def test_a_bad_train_file_stops_every_rank(task, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """(c) Every rank reads the files; the first rank's error reaches the other through a collective."""
    bad = write_csv(tmp_path / "bad.csv", sentiment(10, 4), header=("text", "label"))
    out = tmp_path / "out"
    args = ["finetune", f"--model={task['tiny']}", f"--train={bad}", f"--eval={task['dev']}", f"--out={out}"]
    result = torchrun([*args, "--quiet"], tmp_path)
    assert_every_rank_failed(result, "bad.csv:2: no column 'sentence' (columns: 'text', 'label')")
    assert "(reported by rank 0)" in result.stderr
    assert not out.exists()


def test_a_global_batch_smaller_than_the_world_fails_before_any_collective(task, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """(c) Checked from the environment torchrun sets, before the process group: no rank waits."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")  # no MASTER_ADDR: reaching the process group would fail otherwise
    config = FinetuneConfig(model=str(task["tiny"]), train=str(task["train"]), eval=str(task["dev"]),
                            out=str(task["root"] / "never"), batch_size=3)  # fmt: skip
    with pytest.raises(FerrolmError, match=r"batch_size 3 \(the global batch\) is smaller than world_size 4"):
        finetune(config)
    with pytest.raises(FerrolmError, match="parallel must be auto, none, ddp or fsdp"):
        finetune(FinetuneConfig(**{**vars(config), "parallel": "zero"}))
