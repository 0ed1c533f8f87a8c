"""Issue 13, training part: checkpoints, fine-tuning, export, generation and the CLI refuse what they
cannot trust.

The file mechanics (``ferrolm._files``: atomic writes, stale temporaries, reads that name the file),
tampered checkpoints (state.json fields, the ``files`` list, the ``latest`` pointer, the tokenizer),
NaN weights and losses, float options, impossible model sizes, leftovers of a kill -9, a torn last
line of metrics.jsonl, and one-line CLI errors that name the file: each is a clear error (or, for
leftovers and torn lines, cleaned up), never a traceback, a hang or a silently wrong output."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
os.environ["HF_HUB_OFFLINE"] = "1"

from ferrolm import FerrolmError, Tokenizer  # noqa: E402
from ferrolm._files import (  # noqa: E402
    atomic_file,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    publish_directory,
    read_json,
    read_jsonl,
    read_text,
    remove_stale_temporaries,
    sha256_file,
    temporary_owner,
    temporary_path,
)
from ferrolm.checkpoint import load_checkpoint, write_checkpoint  # noqa: E402
from ferrolm.cli import main  # noqa: E402
from ferrolm.data import shard_corpus  # noqa: E402
from ferrolm.export import export_hf, export_run  # noqa: E402
from ferrolm.finetune import FinetuneConfig, finetune, read_examples  # noqa: E402
from ferrolm.memory import check_memory, parameter_count  # noqa: E402
from ferrolm.model import GPT, PRESETS, GPTConfig  # noqa: E402
from ferrolm.train import TrainConfig, load_model, pretrain, read_metrics  # noqa: E402

SMALL = dict(preset="tiny", batch_size=2, seq_len=32, lr=3e-3, warmup=1, eval_batches=1, progress=False)
DEAD_PID = 2147483632  # above any pid_max: no such process (the Rust test's choice)


# ----------------------------------------------------------------------------------------------------
# Fixtures: a tokenizer, shards, a 2-step run, a tiny classifier


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hardening-training")
    corpus = root / "corpus"
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:12]:
        (corpus / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8", errors="replace"))
    Tokenizer.train([str(corpus)], 384, show_progress=False).save(root / "tokenizer.json")
    shard_corpus(
        str(corpus), root / "shards", str(root / "tokenizer.json"), val_fraction=0.1, show_progress=False
    )
    return root / "shards"


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("run") / "run"
    pretrain(TrainConfig(data=str(shards), out=str(out), max_steps=2, eval_interval=2, **SMALL))
    return out


def copy_run(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def resume(shards: Path, run: Path, steps: int = 3) -> dict:  # type: ignore[type-arg]
    config = TrainConfig(data=str(shards), out=str(run), max_steps=steps, eval_interval=100, **SMALL)
    return pretrain(config, resume=True)


def state_path(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002" / "state.json"


def edit_state(run: Path, change) -> None:  # type: ignore[no-untyped-def]
    state = json.loads(state_path(run).read_text())
    change(state)
    state_path(run).write_text(json.dumps(state))


def one_error_line(capsys) -> str:  # type: ignore[no-untyped-def]
    err = capsys.readouterr().err
    assert err.startswith("ferrolm: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "[Errno" not in err and "codec can't decode" not in err, err
    return err


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("task")
    rows = [(f"the film was {w}", "pos" if w in ("good", "great") else "neg") for w in ["good", "bad"] * 8]
    rows += [("the plot was great", "pos"), ("the plot was dull", "neg")]
    for name in ("train", "dev"):
        (root / f"{name}.csv").write_text(
            "sentence,label\n" + "".join(f"{t},{label}\n" for t, label in rows), encoding="utf-8"
        )
    return {"train": root / "train.csv", "dev": root / "dev.csv"}


@pytest.fixture(scope="module")
def classifier(run, task, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("clf") / "clf"
    finetune(
        FinetuneConfig(
            model=str(run), train=str(task["train"]), eval=str(task["dev"]), out=str(out), epochs=1,
            lr=1e-3, batch_size=8, device="cpu", dropout=0.0, progress=False,
        )
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# ferrolm._files: atomic writes


def test_atomic_writes_leave_the_content_and_no_temporary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff")
    atomic_write_json(tmp_path / "c.json", {"k": [1, "é"]})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8")) == {"k": [1, "é"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]
    assert temporary_path(tmp_path / "a.txt").name == f".a.txt.tmp-{os.getpid()}"  # the Rust name
    assert sha256_file(tmp_path / "b.bin") == hashlib.sha256(b"\x00\xff").hexdigest()
    # A writer that fails half way leaves the old file and no temporary.
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]


def test_publish_directory_is_all_or_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    final = tmp_path / "step-00000001"
    with publish_directory(final) as tmp:
        assert tmp.name == f".step-00000001.tmp-{os.getpid()}" and not final.exists()
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"
    with pytest.raises(RuntimeError), publish_directory(final) as tmp:
        (tmp / "x").write_text("2")
        raise RuntimeError("crash")
    assert (final / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    with publish_directory(final) as tmp:  # the same step again replaces it
        (tmp / "y").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["y"]


# ----------------------------------------------------------------------------------------------------
# ferrolm._files: stale temporaries (the Rust rule of rust/files.rs)


def test_stale_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path) -> None:  # type: ignore[no-untyped-def]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    gone = int(finished.stdout)  # a process that has exited
    dead_file = tmp_path / f".model.safetensors.tmp-{DEAD_PID}"
    dead_dir = tmp_path / f".step-00000003.tmp-{gone}"
    ours = temporary_path(tmp_path / "latest")
    live = tmp_path / f".state.json.tmp-{os.getppid()}"  # our parent is alive
    foreign = [
        tmp_path / f"notes.tmp-{DEAD_PID}",
        tmp_path / f".x.tmp-{DEAD_PID}a",
        tmp_path / "step-00000001",
    ]
    for path in (dead_file, ours, live, *foreign[:2]):
        path.write_text("x")
    (dead_dir / "inner").mkdir(parents=True)
    foreign[2].mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_dir])
    assert all(p.exists() for p in (ours, live, *foreign))
    assert remove_stale_temporaries(tmp_path / "missing") == []


@given(st.text(max_size=30))
def test_temporary_owner_reads_only_our_pattern(name: str) -> None:
    owner = temporary_owner(name)
    if owner is not None:
        head, _, pid = name.rpartition(".tmp-")
        assert head.startswith(".") and len(head) >= 2 and pid.isascii() and pid.isdigit()
        assert owner == int(pid)
    assert temporary_owner(temporary_path(Path("d") / (name.replace("/", "_") or "x")).name) == os.getpid()


def test_temporary_owner_matches_the_rust_cases() -> None:
    assert temporary_owner(".a.tmp-12") == 12
    assert temporary_owner("a.tmp-12") is None
    assert temporary_owner(".a.tmp-x") is None
    assert temporary_owner(".tmp-12") is None  # no name before the suffix
    assert temporary_owner(".a.tmp-１２") is None  # non-ASCII digits are not a pid


# ----------------------------------------------------------------------------------------------------
# ferrolm._files: reads that name the file


def test_reads_name_the_file_and_what_was_expected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FerrolmError, match=r"missing.json: no such file \(expected a config\)"):
        read_json(tmp_path / "missing.json", "a config")
    with pytest.raises(FerrolmError, match=r": is a directory"):
        read_text(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FerrolmError, match="not a regular file"):  # refused, not blocked on
        read_text(fifo)
    (tmp_path / "bad.txt").write_bytes(b"ok\nstill ok\n\xff\xfe\n")
    with pytest.raises(FerrolmError, match=r"bad.txt:3: not valid UTF-8 \(byte 12\)"):
        read_text(tmp_path / "bad.txt")
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n  "b": nope\n}')
    with pytest.raises(FerrolmError, match=r"bad.json:3: not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FerrolmError, match=r"deep.json:1: not valid JSON \(nested too deeply"):
        read_json(tmp_path / "deep.json")
    (tmp_path / "m.jsonl").write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(FerrolmError, match=r"m.jsonl:2: not valid JSON"):  # a bad line in the middle
        read_jsonl(tmp_path / "m.jsonl", torn_tail=True)


records_strategy = st.lists(
    st.dictionaries(st.sampled_from(["kind", "step", "loss", "é"]), st.integers() | st.text(max_size=8)),
    min_size=1,
    max_size=5,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(records=records_strategy, cut=st.floats(0.0, 1.0, exclude_max=True))
def test_a_torn_last_line_is_dropped_and_nothing_else(tmp_path, records, cut) -> None:  # type: ignore[no-untyped-def]
    """Cut the bytes anywhere inside the last record (a crash mid-append): every complete record comes
    back, the torn one does not; without torn_tail the same file is an error naming its last line."""
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    last = lines[-1][:-1]  # without its newline
    kept = 1 + int(cut * (len(last) - 1))  # 1 .. len(last) - 1 bytes: a proper prefix of an object
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(lines[:-1]) + last[:kept])
    assert [r for _, r in read_jsonl(path, torn_tail=True)] == records[:-1]
    with pytest.raises(FerrolmError, match=rf"metrics.jsonl:{len(records)}: not valid"):
        read_jsonl(path)
    path.write_bytes(b"".join(lines))
    assert [r for _, r in read_jsonl(path, torn_tail=True)] == records


# ----------------------------------------------------------------------------------------------------
# Item 8: checkpoint integrity


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(step=-5), r"step must be an integer >= 0, got -5"),
        (lambda s: s.update(step=7), r"state.json: step is 7, but the directory is step-00000002"),
        (lambda s: s.update(step="3"), r"step must be an integer >= 0, got '3'"),
        (lambda s: s.update(step=True), r"step must be an integer >= 0, got True"),
        (lambda s: s.update(tokens=1.5), r"tokens must be an integer >= 0"),
        (lambda s: s.pop("loader"), r"loader must be an object, got '\(missing\)'"),
        (lambda s: s.update(rng=[]), r"rng must be an object"),
        (lambda s: s.update(files={}), r"files does not list model.safetensors"),
        (lambda s: s["files"].pop("optimizer.safetensors"), r"files does not list optimizer.safetensors"),
        (lambda s: s["files"].update({"../x.safetensors": s["files"]["model.safetensors"]}), r"files lists '../x"),
        (lambda s: s["files"].update({"model.safetensors": "ab" * 32}), r"files\['model.safetensors'\] must be"),
        (lambda s: s["files"]["model.safetensors"].update(size=1), r"model.safetensors: corrupt \(\d+ bytes"),
        (lambda s: s.update(tokenizer_sha256="x"), r"tokenizer_sha256 must be a sha256"),
        (lambda s: s["model_config"].update(n_layer="2"), r"model_config: .*n_layer must be a positive integer"),
        (lambda s: s["model_config"].update(dropout="x"), r"state.json: model_config: "),
        (lambda s: s["optimizer"].update(param_groups=3), r"optimizer.param_groups must be a list"),
        (lambda s: s.update(world_size=0), r"world_size must be an integer >= 1"),
    ],
    ids=[
        "negative-step", "other-step", "string-step", "bool-step", "float-tokens", "no-loader", "rng-list", "files-empty",
        "files-missing-optimizer", "files-outside", "files-entry-not-object", "files-wrong-size",
        "tokenizer-sha", "model-config-type", "model-config-dropout", "param-groups", "world-size",
    ],
)  # fmt: skip
def test_tampered_state_json_is_one_error_naming_file_and_field(run, tmp_path, change, match, capsys) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    edit_state(copy, change)
    with pytest.raises(FerrolmError, match=match) as raised:
        load_model(copy)
    assert "state.json" in str(raised.value) or "safetensors" in str(raised.value)
    # The command line: one line, for the resume (configuration only) and the export.
    assert main(["pretrain", "--out", str(copy), "--resume", "--max-steps", "3", "--quiet"]) == 1
    assert "state.json" in one_error_line(capsys) or "safetensors" in match
    assert main(["export", str(copy), "--out", str(tmp_path / "hf")]) == 1
    one_error_line(capsys)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s["train_config"].update(lr="fast"), r"train_config: train config: lr must be a finite"),
        (lambda s: s["train_config"].update(seed=None), r"train_config: .*seed must be an integer >= 0"),
        (lambda s: s["train_config"].pop("preset"), r"state.json: train_config does not record preset"),
        (lambda s: s["train_config"].update(batch_size=-1), r"train_config: .*batch_size must be a positive"),
        (
            lambda s: s["rng"].update(torch_cpu="not base64!"),
            r"state.json: rng: not a random-generator state",
        ),
        (lambda s: s["loader"].update(position="x"), r"state.json: loader: .*position"),
    ],
    ids=[
        "train-config-lr",
        "train-config-seed",
        "no-preset",
        "train-config-batch",
        "rng-garbage",
        "loader-garbage",
    ],
)
def test_tampered_resume_fields_are_one_error(shards, run, tmp_path, change, match) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    edit_state(copy, change)
    with pytest.raises(FerrolmError, match=match):
        resume(shards, copy)


def test_an_unlisted_safetensors_file_is_refused(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    ckpt = copy / "checkpoints" / "step-00000002"
    shutil.copyfile(ckpt / "model.safetensors", ckpt / "model-extra.safetensors")
    with pytest.raises(FerrolmError, match=r"model-extra.safetensors not listed in .*state.json"):
        load_model(copy)


def test_a_truncated_tensor_file_is_refused_without_hashing(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    weights = copy / "checkpoints" / "step-00000002" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(FerrolmError, match=r"optimizer.safetensors: corrupt \(\d+ bytes, .* records \d+"):
        load_checkpoint(copy, verify=False)


@pytest.mark.parametrize(
    "pointer",
    [
        b"../elsewhere/step-00000002",
        b"/tmp/step-00000002",
        b"step-00000002/../../x",
        b"",
        b"latest",
        b"\xff\xfe",
    ],
    ids=["dotdot", "absolute", "inner-dotdot", "empty", "not-a-step", "not-utf8"],
)
def test_latest_must_name_a_checkpoint_inside_checkpoints(run, tmp_path, pointer, capsys) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    # A complete checkpoint outside the run, where "../elsewhere" points: never loaded.
    shutil.copytree(copy / "checkpoints" / "step-00000002", copy / "elsewhere" / "step-00000002")
    (copy / "checkpoints" / "latest").write_bytes(pointer + b"\n")
    with pytest.raises(FerrolmError, match=r"latest(:1: not valid UTF-8|: names .*, expected a checkpoint)"):
        load_checkpoint(copy)
    assert main(["export", str(copy), "--out", str(tmp_path / "hf")]) == 1
    assert "latest" in one_error_line(capsys)


def test_a_symlinked_checkpoint_outside_is_refused(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    ckpt = copy / "checkpoints" / "step-00000002"
    shutil.move(ckpt, tmp_path / "outside")
    ckpt.symlink_to(tmp_path / "outside")
    with pytest.raises(FerrolmError, match="outside"):
        load_checkpoint(copy)


def test_resume_checks_the_runs_tokenizer_against_the_checkpoint(shards, run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    tok = copy / "tokenizer.json"
    tok.write_text(json.dumps(json.loads(tok.read_text()), indent=4))  # the same tokens, other bytes
    with pytest.raises(FerrolmError, match=r"tokenizer.json: not the tokenizer .* was trained with"):
        resume(shards, copy)
    tok.unlink()  # deleted: copied again from the shards, and the run resumes
    assert resume(shards, copy)["steps"] == 3


def test_nan_weights_are_never_checkpointed(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    _, state = load_checkpoint(copy)
    model = load_model(copy)
    weights = model.weights()
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters())
    meta = {k: v for k, v in state.items() if k not in ("format", "version", "step", "files", "optimizer")}
    with pytest.raises(FerrolmError, match=r"step 3: transformer.h.0.mlp.c_fc.weight holds 1 NaN"):
        write_checkpoint(copy, 3, weights, optimizer.state_dict(), meta, keep=3)
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["latest", "step-00000002"]


def test_export_refuses_nan_weights_and_a_tokenizer_larger_than_the_model(
    shards, run, tmp_path, capsys
) -> None:  # type: ignore[no-untyped-def]
    model = GPT(GPTConfig.preset("tiny", vocab_size=384))
    with torch.no_grad():
        model.transformer.wte.weight[3, 3] = float("inf")
    with pytest.raises(FerrolmError, match=r"export: .*wte.* NaN or infinite"):
        export_hf(model, tmp_path / "nan")
    assert not (tmp_path / "nan" / "model.safetensors").exists()
    small = GPT(GPTConfig.preset("tiny", vocab_size=100))
    with pytest.raises(FerrolmError, match=r"the tokenizer has 384 tokens but the model being exported has vocab_size 100"):  # fmt: skip
        export_hf(small, tmp_path / "small", tokenizer_file=run / "tokenizer.json")
    # A run whose tokenizer was swapped for a larger one: export says so in one line.
    copy = copy_run(run, tmp_path)
    bigger = Tokenizer.train([str(shards.parent / "corpus")], 450, show_progress=False)
    bigger.save(copy / "tokenizer.json")
    assert main(["export", str(copy), "--out", str(tmp_path / "hf")]) == 1
    assert "tokenizer has" in one_error_line(capsys)


def test_generate_refuses_a_tokenizer_larger_than_the_model(run, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    hf = export_hf(GPT(GPTConfig.preset("tiny", vocab_size=100)), tmp_path / "hf")  # no tokenizer
    shutil.copyfile(run / "tokenizer.json", hf / "tokenizer.json")  # 384 tokens: ids 100+ out of range
    assert main(["generate", str(hf), "--prompt", "def main", "--max-new-tokens", "3"]) == 1
    assert "the tokenizer has 384 tokens" in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------------
# Item 5: fine-tuning


def test_a_nan_loss_stops_finetuning_and_never_saves_it(run, task, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ferrolm.finetune as finetune_module

    real, calls = finetune_module.rank_loss, {"n": 0}

    def diverging(*args, **kwargs):  # type: ignore[no-untyped-def]
        loss, tokens = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), tokens  # epoch 2 (3 steps per epoch)

    monkeypatch.setattr(finetune_module, "rank_loss", diverging)
    out = tmp_path / "clf"
    config = FinetuneConfig(
        model=str(run), train=str(task["train"]), eval=str(task["dev"]), out=str(out), epochs=2, lr=1e-3,
        batch_size=8, device="cpu", progress=False,
    )  # fmt: skip
    with pytest.raises(FerrolmError, match=r"training loss at step 4 \(epoch 2.* is nan.*epoch 1\) is in"):
        finetune(config)
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["epoch"] == 1  # the last good epoch, complete
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / meta["weights"]).values())


def test_a_diverging_learning_rate_never_exits_0(run, task, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """--lr 1e6 (the issue's case): the run stops with one line, and no classifier holds NaN weights."""
    out = tmp_path / "clf"
    args = ["finetune", "--model", str(run), "--train", str(task["train"]), "--eval", str(task["dev"])]
    code = main([*args, "--out", str(out), "--lr", "1e6", "--epochs", "3", "--batch-size", "4", "--quiet"])
    if code == 0:  # it did not diverge: then every saved weight is finite
        capsys.readouterr()
    else:
        assert "diverged" in one_error_line(capsys)
    if (out / "classifier.json").exists():
        from safetensors.torch import load_file

        weights = json.loads((out / "classifier.json").read_text())["weights"]
        assert all(torch.isfinite(t).all() for t in load_file(out / weights).values())


@pytest.mark.parametrize("lr", ["inf", "nan", "-1", "0", "-inf", "1e400"])
def test_finetune_lr_must_be_finite_and_positive(run, task, tmp_path, lr, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["finetune", "--model", str(run), "--train", str(task["train"]), "--eval", str(task["dev"])]
    assert main([*args, "--out", str(tmp_path / "o"), f"--lr={lr}", "--quiet"]) == 1
    assert "lr must be a finite number > 0" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("warmup_ratio", float("nan"), r"warmup_ratio must be a finite number in \[0, 1\]"),
        ("weight_decay", float("inf"), r"weight_decay must be a finite number >= 0"),
        ("grad_clip", -1.0, r"grad_clip must be a finite number >= 0"),
        ("dropout", float("nan"), r"dropout must be a finite number in \[0, 1\)"),
        ("lr", True, r"lr must be a finite number > 0, got True"),
        ("lr", "1e-3", r"lr must be a finite number > 0, got '1e-3'"),
    ],
)
def test_finetune_float_options_are_checked(field, value, match) -> None:  # type: ignore[no-untyped-def]
    config = FinetuneConfig(model="m", train="t.csv", eval="e.csv", out="o", **{field: value})
    with pytest.raises(FerrolmError, match=match):
        config.validate()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr", float("inf"), r"lr must be a finite number > 0"),
        ("lr", float("nan"), r"lr must be a finite number > 0"),
        ("min_lr_ratio", 2.0, r"min_lr_ratio must be a finite number in \[0, 1\]"),
        ("mask_prob", 0.0, r"mask_prob must be a finite number in \(0, 1\]"),
        ("weight_decay", float("nan"), r"weight_decay must be a finite number >= 0"),
        ("beta1", 1.0, r"beta1 must be a finite number in \[0, 1\)"),
        ("beta2", -0.1, r"beta2 must be a finite number in \[0, 1\)"),
        ("eps", 0.0, r"eps must be a finite number > 0"),
        ("grad_clip", float("inf"), r"grad_clip must be a finite number >= 0"),
        ("warmup", -1, r"warmup must be an integer >= 0"),
        ("batch_size", True, r"batch_size must be a positive integer"),
    ],
)
def test_train_float_options_are_checked_by_the_same_rule(field, value, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FerrolmError, match=match):
        TrainConfig(data="d", out="o", **{field: value}).validate()


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_lr_is_accepted_exactly_when_finite_and_positive(lr: float) -> None:
    for config in (TrainConfig(data="d", out="o", lr=lr), FinetuneConfig(model="m", train="t", eval="e", out="o", lr=lr)):  # fmt: skip
        if math.isfinite(lr) and lr > 0:
            config.validate()
        else:
            with pytest.raises(FerrolmError, match="lr must be a finite number > 0"):
                config.validate()


def test_text_and_label_columns_must_differ_and_headers_be_unique(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "d.csv"
    data.write_text("sentence,label\nhi,pos\n", encoding="utf-8")
    with pytest.raises(FerrolmError, match="text_column and label_column are both 'label'"):
        read_examples(data, "label", "label")
    with pytest.raises(FerrolmError, match="text_column and label_column are both 'x'"):
        FinetuneConfig(model="m", train="t", eval="e", out="o", text_column="x", label_column="x").validate()
    data.write_text("sentence,label,sentence,label,id\nhi,pos,ho,neg,1\n", encoding="utf-8")
    with pytest.raises(FerrolmError, match=r"d.csv:1: the header names 'label', 'sentence' more than once"):
        read_examples(data)
    (tmp_path / "d.tsv").write_text("sentence\tsentence\tlabel\nhi\tho\tpos\n", encoding="utf-8")
    with pytest.raises(FerrolmError, match=r"d.tsv:1: the header names 'sentence' more than once"):
        read_examples(tmp_path / "d.tsv")


# ----------------------------------------------------------------------------------------------------
# Item 10: the memory estimate


@settings(max_examples=40, deadline=None)
@given(
    preset=st.sampled_from(sorted(PRESETS)),
    n_layer=st.integers(1, 3),
    vocab=st.integers(1, 1000),
    tie=st.booleans(),
    causal=st.booleans(),
    mlp=st.one_of(st.none(), st.integers(1, 300)),
)
def test_parameter_count_is_exactly_what_the_model_holds(preset, n_layer, vocab, tie, causal, mlp) -> None:  # type: ignore[no-untyped-def]
    overrides = dict(n_layer=n_layer, vocab_size=vocab, tie_embeddings=tie, causal=causal, mlp_hidden=mlp)
    try:
        config = GPTConfig.preset(
            preset, **{**overrides, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "block_size": 64}
        )
    except FerrolmError:  # a combination the architecture refuses (a causal RoBERTa, ...)
        assume(False)
    # Counted on the meta device from 1 and 2 layers: must equal the real model of any depth.
    assert parameter_count(config) == GPT(config).num_params(non_embedding=False)


def test_an_impossible_model_is_refused_with_the_figure_before_allocating(shards, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # n_layer=100000 of the "small" preset: 79 billion parameters, ~1.3 TB to train.
    config = TrainConfig(data=str(shards), out=str(tmp_path / "r"), max_steps=1, model={"n_layer": 100_000}, **{**SMALL, "preset": "small"})  # fmt: skip
    with pytest.raises(
        FerrolmError, match=r"pretrain: [\d,]+ parameters \(n_layer=100000.* need at least [\d,.]+ GB"
    ):
        pretrain(config)
    # A manifest claiming 4 billion tokens (uint32 shards allow it): 256 billion embedding parameters.
    corpus, s32 = shards.parent / "corpus", tmp_path / "s32"
    shard_corpus(str(corpus), s32, str(shards.parent / "tokenizer.json"), dtype="uint32", show_progress=False)
    manifest = json.loads((s32 / "manifest.json").read_text())
    manifest["vocab_size"] = 4_000_000_000
    (s32 / "manifest.json").write_text(json.dumps(manifest))
    # The manifest is checked against its tokenizer first (ferrolm.data): refused before any model.
    with pytest.raises(
        FerrolmError, match=r"manifest.json: vocab_size: is 4000000000, but its tokenizer .* has \d+ tokens"
    ):
        pretrain(TrainConfig(data=str(s32), out=str(tmp_path / "r32"), max_steps=1, **SMALL))
    # A vocabulary of 10**12 tokens reaching the model: 64 trillion parameters of embeddings.
    with pytest.raises(FerrolmError, match=r"vocab_size=1000000000000\).* GB, more than"):
        GPT(GPTConfig.preset("tiny", vocab_size=10**12))
    needed = check_memory(GPTConfig.preset("gpt2-small", vocab_size=50257), training=True)
    assert needed == 16 * parameter_count(GPTConfig.preset("gpt2-small", vocab_size=50257))


def test_a_huge_model_in_a_checkpoint_or_hugging_face_config_is_refused(run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    edit_state(copy, lambda s: s["model_config"].update(n_embd=2**20, n_head=4))  # a 13 TB matmul
    with pytest.raises(FerrolmError, match=r"GB, more than this machine's RAM"):
        load_model(copy)
    hf = export_hf(GPT(GPTConfig.preset("tiny", vocab_size=384)), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["n_layer"] = 10**8
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(FerrolmError, match=r"n_layer=100000000.*GB"):
        GPT.from_pretrained(hf)


# ----------------------------------------------------------------------------------------------------
# Items 15 and 16: leftovers of a killed run, torn metrics, one-line errors


KILLED_MID_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
from ferrolm._files import publish_directory
with publish_directory(Path(sys.argv[1]) / "step-00000003") as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 100000)
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-checkpoint
"""


def test_resume_removes_temporaries_of_a_killed_run_and_only_those(shards, run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    root = copy / "checkpoints"
    child = subprocess.run([sys.executable, "-c", KILLED_MID_CHECKPOINT, str(root)], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = [p for p in root.iterdir() if p.name.startswith(".step-00000003.tmp-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").exists()  # what kill -9 leaves
    stale_tok = copy / f".tokenizer.json.tmp-{DEAD_PID}"
    stale_tok.write_text("{")
    live = root / f".step-00000009.tmp-{os.getpid()}"  # ours (this process is alive): kept
    live.mkdir()
    foreign = copy / "notes.tmp-5"
    foreign.write_text("mine")
    assert resume(shards, copy)["steps"] == 3
    assert not left[0].exists() and not stale_tok.exists()
    assert live.exists() and foreign.exists()
    assert (root / "latest").read_text().strip() == "step-00000003"


def test_a_torn_last_metrics_line_is_dropped_on_resume(shards, run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    metrics = copy / "metrics.jsonl"
    with open(metrics, "ab") as f:
        f.write('{"kind": "train", "step": 3, "loss": 1.2, "note": "é'.encode()[:-1])  # cut inside "é"
    assert resume(shards, copy)["steps"] == 3
    steps = [(r["kind"], r["step"]) for r in read_metrics(copy)]
    assert [s for k, s in steps if k == "train"] == [1, 2, 3]
    assert metrics.read_bytes().endswith(b"}\n")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"kind": "train", "step": 1}\n\xff\n{"kind": "train", "step": 2}\n', r"metrics.jsonl:2: not valid UTF-8"),
        (b'{"kind": "train", "step": 1}\n{"kind": \n{"kind": "val", "step": 2}\n', r"metrics.jsonl:2: not valid JSON"),
        (b'{"kind": "train", "step": "1"}\n', r"metrics.jsonl:1: expected ferrolm metrics"),
        (b"[1, 2]\n", r"metrics.jsonl:1: expected ferrolm metrics"),
    ],
    ids=["bad-utf8", "bad-json-middle", "string-step", "not-object"],
)  # fmt: skip
def test_a_damaged_metrics_file_is_one_error_naming_it(shards, run, tmp_path, content, match, capsys) -> None:  # type: ignore[no-untyped-def]
    copy = copy_run(run, tmp_path)
    (copy / "metrics.jsonl").write_bytes(content)
    with pytest.raises(FerrolmError, match=match):
        resume(shards, copy)
    assert main(["plot", str(copy)]) == 1
    assert "metrics.jsonl" in one_error_line(capsys)


def test_cli_errors_name_the_file_and_what_was_expected(run, classifier, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    # evaluate --data missing.csv: not a raw [Errno 2].
    assert main(["evaluate", str(classifier), "--data", str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv: no such file (expected labelled data" in one_error_line(capsys)
    # predict --file: missing, not UTF-8.
    assert main(["predict", str(classifier), "--file", str(tmp_path / "none.txt")]) == 1
    assert "none.txt: no such file (expected texts to classify" in one_error_line(capsys)
    (tmp_path / "latin1.txt").write_bytes("a fine film\ncafé\n".encode("latin-1"))
    assert main(["predict", str(classifier), "--file", str(tmp_path / "latin1.txt")]) == 1
    assert "latin1.txt:2: not valid UTF-8" in one_error_line(capsys)
    # tokenizer encode --file.
    assert main(["tokenizer", "encode", "--tokenizer", str(run / "tokenizer.json"), "--file", str(tmp_path / "latin1.txt")]) == 1  # fmt: skip
    assert "latin1.txt:2: not valid UTF-8" in one_error_line(capsys)
    # A run whose latest pointer is not UTF-8, and one whose state.json lost the loader.
    copy = copy_run(run, tmp_path)
    (copy / "checkpoints" / "latest").write_bytes(b"step-\xff\n")
    assert main(["pretrain", "--out", str(copy), "--resume", "--quiet"]) == 1
    assert "latest:1: not valid UTF-8" in one_error_line(capsys)
    copy = copy_run(run, tmp_path, "copy2")
    edit_state(copy, lambda s: s.pop("loader"))
    assert main(["pretrain", "--out", str(copy), "--resume", "--quiet"]) == 1
    err = one_error_line(capsys)
    assert "state.json: loader must be an object" in err and err != "ferrolm: error: loader\n"
    # A --config file that is missing or not UTF-8.
    assert main(["pretrain", "--config", str(tmp_path / "run.toml"), "--quiet"]) == 1
    assert "run.toml: no such file (expected a run.toml" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FileNotFoundError(2, "No such file or directory", "data/x.csv"), "data/x.csv: No such file or directory"),
        (KeyError("loader"), "missing key 'loader'"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "input is not valid UTF-8"),
        (KeyError("unknown token 'x'"), "unknown token 'x'"),
    ],
    ids=["oserror", "bare-keyerror", "unicode", "keyerror-message"],
)  # fmt: skip
def test_the_cli_handler_never_prints_a_bare_errno_key_or_codec_message(
    error, expected, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    import ferrolm.cli as cli

    def fails(args):  # type: ignore[no-untyped-def]
        raise error

    monkeypatch.setattr(cli, "_cmd_plot", fails)
    assert main(["plot", "run"]) == 1
    assert expected in one_error_line(capsys)


def test_resume_after_every_check_still_continues_exactly(shards, run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The checks change nothing for a good run: resumed to step 4, the losses are those of 4 steps."""
    copy = copy_run(run, tmp_path)
    resume(shards, copy, steps=4)
    straight = tmp_path / "straight"
    pretrain(TrainConfig(data=str(shards), out=str(straight), max_steps=4, eval_interval=2, **SMALL))
    train = {r["step"]: r["loss"] for r in read_metrics(straight) if r["kind"] == "train"}
    resumed = {r["step"]: r["loss"] for r in read_metrics(copy) if r["kind"] == "train"}
    assert resumed == train
    assert export_run(copy, tmp_path / "hf") == tmp_path / "hf"
