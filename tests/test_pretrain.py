"""ferrolm.train and the pretrain / export / generate / plot commands, on CPU with tiny models.

The exact-resume test is the contract of the checkpoints: N straight steps, and the same run crashed
after a checkpoint, resumed and finished, give bit-identical losses.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

from ferrolm import FerrolmError, Tokenizer, _core  # noqa: E402

if not hasattr(_core, "CoreLoader"):
    pytest.skip("this ferrolm._core was built without the packed loader", allow_module_level=True)

import ferrolm.train as train_module  # noqa: E402
from ferrolm.cli import main  # noqa: E402
from ferrolm.data import shard_corpus  # noqa: E402
from ferrolm.train import TrainConfig, load_model, pretrain  # noqa: E402

SMALL = dict(preset="tiny", batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_batches=2, progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        (corpus / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8", errors="replace"))
    tokenizer = Tokenizer.train([str(corpus)], 384, show_progress=False)
    tokenizer.save(root / "tokenizer.json")
    shard_corpus(
        str(corpus), root / "shards", str(root / "tokenizer.json"), val_fraction=0.1, show_progress=False
    )
    return root / "shards"


def losses(run: Path, kind: str = "train") -> dict[int, float]:
    key = "loss" if kind == "train" else "val_loss"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["kind"] == kind}


def test_tiny_model_learns_and_writes_its_run(shards, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    summary = pretrain(TrainConfig(data=str(shards), out=str(run), max_steps=40, eval_interval=20, **SMALL))
    val = losses(run, "val")
    assert sorted(val) == [0, 20, 40]
    assert val[40] < val[20] < val[0] - 0.5  # visibly falling
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 4 * 32
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "tokenizer.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    state = json.loads((run / "checkpoints" / "step-00000040" / "state.json").read_text())
    assert {"model_config", "train_config", "scheduler", "loader", "rng", "optimizer"} <= set(state)
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))  # no pickle


@pytest.mark.parametrize(
    "options",
    [
        dict(grad_accum=2, model={"dropout": 0.1}),  # dropout: the torch RNG must be restored too
        dict(objective="mlm", doc_mask=True, packing="best_fit"),  # the masking generator
        dict(preset="tiny-llama", doc_mask=True),
    ],
    ids=["clm-accum-dropout", "mlm-docmask-bestfit", "llama-docmask"],
)
def test_exact_resume_after_a_crash(shards, tmp_path, monkeypatch, options) -> None:  # type: ignore[no-untyped-def]
    config = {**SMALL, **options, "max_steps": 8, "eval_interval": 4, "checkpoint_interval": 3}
    straight = tmp_path / "straight"
    pretrain(TrainConfig(data=str(shards), out=str(straight), **config))

    crashed = tmp_path / "crashed"
    real_forward = train_module._forward
    # Evaluations also call _forward: only count training calls, by crashing on the 5th step's loss
    monkeypatch.setattr(train_module, "_forward", _count_training(real_forward, config))
    with pytest.raises(FerrolmError, match="loss is nan at step 5"):
        pretrain(TrainConfig(data=str(shards), out=str(crashed), **config))
    monkeypatch.setattr(train_module, "_forward", real_forward)
    assert (crashed / "checkpoints" / "latest").read_text().strip() == "step-00000003"  # untouched

    pretrain(TrainConfig(data=str(shards), out=str(crashed), **config), resume=True)
    assert losses(crashed) == losses(straight)  # bit-identical, every step 1..8
    assert losses(crashed, "val") == losses(straight, "val")
    assert len(losses(crashed)) == 8


def _count_training(real_forward, config):  # type: ignore[no-untyped-def]
    """A _forward whose training loss turns NaN in step 5 (evaluations run under no_grad)."""
    seen = {"n": 0}
    per_step = config.get("grad_accum", 1)

    def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        loss = real_forward(*args, **kwargs)
        if torch.is_grad_enabled():
            seen["n"] += 1
            if seen["n"] > 4 * per_step:
                return loss * float("nan")
        return loss

    return forward


def test_loss_is_normalised_over_the_accumulation_window(shards, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """grad_accum=2 x batch 2 sees the same rows as 1 x batch 4 (the loader's stream does not depend on
    the batch size) and, normalised by the window's target count, takes the same step."""
    common = {**SMALL, "packing": "best_fit", "doc_mask": True, "max_steps": 1, "progress": False}
    one, two = tmp_path / "one", tmp_path / "two"
    pretrain(TrainConfig(data=str(shards), out=str(one), **{**common, "batch_size": 4}))
    pretrain(TrainConfig(data=str(shards), out=str(two), **{**common, "batch_size": 2, "grad_accum": 2}))
    assert losses(one)[1] == pytest.approx(losses(two)[1], rel=1e-6)
    # The gradient, not the weights: Adam's first step is sign-like and blows up rounding noise.
    grad_norms = [
        json.loads(line)["grad_norm"]
        for r in (one, two)
        for line in (r / "metrics.jsonl").open()
        if json.loads(line)["kind"] == "train"
    ]
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-5)


def test_bad_inputs_are_clear_errors(shards, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    pretrain(TrainConfig(data=str(shards), out=str(run), max_steps=2, **{k: v for k, v in SMALL.items()}))
    with pytest.raises(FerrolmError, match="already holds a run"):
        pretrain(TrainConfig(data=str(shards), out=str(run), max_steps=2, **SMALL))
    with pytest.raises(FerrolmError, match="batch_size is 8"):
        pretrain(
            TrainConfig(data=str(shards), out=str(run), max_steps=4, **{**SMALL, "batch_size": 8}),
            resume=True,
        )
    with pytest.raises(FerrolmError, match="not divisible by n_head"):
        pretrain(TrainConfig(data=str(shards), out=str(tmp_path / "x"), model={"n_head": 3}, **SMALL))
    if not torch.cuda.is_available():
        with pytest.raises(FerrolmError, match="CUDA is not available"):
            pretrain(TrainConfig(data=str(shards), out=str(tmp_path / "y"), **{**SMALL, "device": "cuda"}))
    # A model whose vocabulary is not the shards' tokenizer's.
    from ferrolm.export import export_hf
    from ferrolm.model import GPT, GPTConfig

    export_hf(GPT(GPTConfig.preset("tiny", vocab_size=999)), tmp_path / "hf999")
    with pytest.raises(FerrolmError, match="tokenizer has 384 tokens, the model 999"):
        pretrain(
            TrainConfig(data=str(shards), out=str(tmp_path / "z"), init_from=str(tmp_path / "hf999"), **SMALL)
        )
    # A corrupt checkpoint: one flipped byte in the weights.
    weights = run / "checkpoints" / "step-00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(FerrolmError, match="corrupt"):
        pretrain(TrainConfig(data=str(shards), out=str(run), max_steps=4, **SMALL), resume=True)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 1
    assert "corrupt" in capsys.readouterr().err
    # A partial checkpoint (state.json missing): named as incomplete.
    (weights.parent / "state.json").unlink()
    with pytest.raises(FerrolmError, match="incomplete checkpoint"):
        load_model(run)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(run)


def test_cli_pretrain_resume_export_generate_plot(shards, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    toml = tmp_path / "run.toml"
    toml.write_text(
        'preset = "tiny-llama"\nbatch_size = 4\nseq_len = 32\nlr = 3e-3\nwarmup = 2\n[model]\nn_kv_head = 1\n'
    )
    args = ["pretrain", "--data", str(shards), "--out", str(run), "--config", str(toml), "--quiet"]
    assert main([*args, "--max-steps", "4", "--eval-interval", "4"]) == 0
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "6", "--quiet"]) == 0
    assert max(losses(run)) == 6
    assert main(["export", str(run), "--out", str(hf_dir)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()
    }
    model = load_model(run)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 384, (2, 32))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    capsys.readouterr()
    assert (
        main(["generate", str(hf_dir), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"])
        == 0
    )
    printed = capsys.readouterr().out
    tok = Tokenizer.from_pretrained(hf_dir)
    prompt = tok.encode("def ")
    expected = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
    )[0].tolist()
    assert printed == tok.decode(expected) + "\n"
    (run / "loss.png").unlink()
    assert main(["plot", str(run)]) == 0 and (run / "loss.png").exists()


def test_the_resolved_config_is_saved_in_the_run_and_repeats_it(shards, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ferrolm.config import load_toml

    run, again = tmp_path / "run", tmp_path / "again"
    toml = tmp_path / "run.toml"
    toml.write_text("batch_size = 2\nseq_len = 16\nwarmup = 1\n[model]\nn_layer = 1\n")
    args = ["pretrain", "--config", str(toml), "--data", str(shards), "--max-steps", "2", "--quiet"]
    assert main([*args, "--out", str(run), "--eval-interval", "2"]) == 0
    saved = TrainConfig.from_dict(load_toml(run / "config.toml"), source="config.toml")
    assert (saved.batch_size, saved.seq_len, saved.max_steps, saved.model) == (2, 16, 2, {"n_layer": 1})
    assert saved.out == str(run) and saved.progress is False and saved.eval_interval == 2
    # The saved file starts an equal run elsewhere: the same losses.
    assert main(["pretrain", "--config", str(run / "config.toml"), "--out", str(again)]) == 0
    assert load_toml(again / "config.toml") == {**load_toml(run / "config.toml"), "out": str(again)}
    losses = [(run / "metrics.jsonl").read_text(), (again / "metrics.jsonl").read_text()]
    first, second = ([line for line in text.splitlines() if '"train"' in line] for text in losses)
    assert len(first) == 2 and [_loss(x) for x in first] == [_loss(x) for x in second]


def _loss(line: str) -> float:
    value = json.loads(line).get("loss")
    assert isinstance(value, float) and value == value  # a number, not NaN
    return value
