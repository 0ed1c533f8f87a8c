"""Distributed pretraining under torchrun, on the CPU: gloo, 2 processes, a tiny model, a few steps.

The contract: N processes with the same global batch take the step one process takes (the same rows,
the loss normalised by the job's target count), up to floating-point summation order; a checkpoint
written by N processes resumes on one and the data order continues exactly; a bad configuration stops
every rank with a one-line message, never a hang. Each torchrun launch costs a few seconds of start-up
(two Python processes importing torch on the CI's two cores), so the tests share launches.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)
os.environ["HF_HUB_OFFLINE"] = "1"

from ferrolm import FerrolmError, Tokenizer, _core  # noqa: E402

if not hasattr(_core, "CoreLoader"):
    pytest.skip("this ferrolm._core was built without the packed loader", allow_module_level=True)

from ferrolm.cli import main  # noqa: E402
from ferrolm.data import shard_corpus  # noqa: E402
from ferrolm.distributed import resolve_parallel  # noqa: E402
from ferrolm.model import GPT  # noqa: E402
from ferrolm.train import TrainConfig, load_model, pretrain  # noqa: E402

STEPS, CHECKPOINT = 6, 3  # the 2-process runs die in step 5: the last checkpoint is step 3
# Rows per optimizer step: 2 ranks x 2 rows, or 1 process x 4 rows.
RUN = dict(preset="tiny", seq_len=32, lr=3e-3, warmup=2, eval_batches=2, global_batch_size=4)
LAUNCH_TIMEOUT = 120  # seconds: generous for a loaded 2-core CI machine; a hang fails, never blocks
# Same rows, different summation order (fp32): measured differences are ~1e-7 relative.
LOSS_TOLERANCE = 2e-6

# Run ferrolm's CLI with the training forward patched to SIGKILL rank 1 at its KILL_CALL-th training
# micro-step: a crash in the middle of a step, the other rank left in a collective (torchrun stops it).
KILLER = """
import os, signal, sys
import torch
import ferrolm.train as train
from ferrolm.cli import main

real_forward, calls = train._forward, [0]

def forward(*args, **kwargs):
    if torch.is_grad_enabled():  # a training micro-step (evaluation runs under no_grad)
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_CALL"]) and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
    return real_forward(*args, **kwargs)

train._forward = forward
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("distributed")
    (root / "corpus").mkdir()
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    for source in stdlib:
        (root / "corpus" / f"{source.stem}.txt").write_text(
            source.read_text(encoding="utf-8", errors="replace")
        )
    Tokenizer.train([str(root / "corpus")], 384, show_progress=False).save(root / "tok.json")
    shard_corpus(
        str(root / "corpus"), root / "shards", str(root / "tok.json"), val_fraction=0.1, show_progress=False
    )
    return root / "shards"


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """One process, 4 rows per step, never interrupted: what every distributed run must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    pretrain(one_process(shards, run))
    return run


def one_process(shards: Path, run: Path, **options: object) -> TrainConfig:
    """The single-process configuration: 4 rows per micro-step, the runs' schedule."""
    return TrainConfig(
        data=str(shards),
        out=str(run),
        batch_size=4,
        max_steps=STEPS,
        checkpoint_interval=CHECKPOINT,
        progress=False,
        **RUN,
        **options,  # type: ignore[arg-type]
    )


def torchrun(
    args: list[str], tmp_path: Path, kill_call: int | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --nproc_per_node 2 -m ferrolm ARGS`` (or the killer script)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_call is None:
        command += ["-m", "ferrolm", *args]
    else:
        script = tmp_path / "killer.py"
        script.write_text(KILLER)
        command += [str(script), *args]
        env["KILL_CALL"] = str(kill_call)
    return subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env)


def pretrain_args(shards: Path, run: Path, *extra: str) -> list[str]:
    options = {**RUN, "max_steps": STEPS, "checkpoint_interval": CHECKPOINT, "batch_size": 2}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    return ["pretrain", f"--data={shards}", f"--out={run}", *flags, "--quiet", *extra]


def records(run: Path, kind: str = "train") -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def checkpoint_state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())


def assert_same_losses(run: Path, reference: Path, steps: range) -> None:
    got, want = records(run), records(reference)
    for step in steps:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=LOSS_TOLERANCE), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step


def assert_killed_at_step_5(result: subprocess.CompletedProcess[str], run: Path) -> None:
    assert result.returncode != 0, result.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{CHECKPOINT:08d}"
    assert sorted(records(run)) == [1, 2, 3, 4], result.stderr[-2000:]  # rank 0 logged step 4, then died


def test_ddp_matches_one_process_and_resumes_on_one(shards, reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """(a) 2-process DDP = 1 process with the same global batch; (c) killed in step 5, resumed by ONE
    process (2 rows x 2 micro-steps), the data continues with the exact next rows."""
    run = tmp_path / "ddp"
    result = torchrun(pretrain_args(shards, run), tmp_path, kill_call=5)  # --parallel auto: ddp
    assert_killed_at_step_5(result, run)
    assert_same_losses(run, reference, range(1, 5))
    # The val loss at step 0: each rank evaluated its half of the same val rows.
    assert records(run, "val")[0]["val_loss"] == pytest.approx(
        records(reference, "val")[0]["val_loss"], rel=1e-6
    )
    saved = checkpoint_state(run, CHECKPOINT)
    assert saved["world_size"] == 2 and saved["parallel"] == "ddp" and len(saved["rng_by_rank"]) == 2
    assert saved["loader"] == checkpoint_state(reference, CHECKPOINT)["loader"]  # 3 x 4 rows consumed

    # Resume on one process through the CLI: the saved global batch (4) and batch size (2) give
    # grad_accum 2; the step-4 record the dead run wrote is redone.
    assert main(["pretrain", "--out", str(run), "--resume", "--quiet"]) == 0
    assert sorted(records(run)) == list(range(1, STEPS + 1))
    assert_same_losses(run, reference, range(4, STEPS + 1))
    final = checkpoint_state(run, STEPS)
    assert final["world_size"] == 1 and final["train_config"]["global_batch_size"] == 4
    assert final["loader"] == checkpoint_state(reference, STEPS)["loader"]  # no row repeated or skipped


def test_fsdp_matches_one_process_and_its_checkpoint_is_a_plain_one(shards, reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """(b) FSDP2 with gradient accumulation (2 ranks x 2 micro-steps x 1 row, the first micro-step
    without a reduce-scatter) = 1 process; its gathered checkpoint has the single-device layout: it
    exports, and resumes in one process without a process group."""
    from safetensors.torch import load_file

    run = tmp_path / "fsdp"
    args = pretrain_args(shards, run, "--parallel=fsdp", "--batch-size=1")
    result = torchrun(args, tmp_path, kill_call=4 * 2 + 1)  # step 5's first micro-step
    assert_killed_at_step_5(result, run)
    assert_same_losses(run, reference, range(1, 5))

    ours = run / "checkpoints" / f"step-{CHECKPOINT:08d}"
    theirs = reference / "checkpoints" / f"step-{CHECKPOINT:08d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        mine, want = load_file(ours / name), load_file(theirs / name)
        assert sorted(mine) == sorted(want)  # same names, so the same layout
        for key in want:  # full (gathered) tensors, equal up to 3 steps of summation-order noise
            assert mine[key].shape == want[key].shape, key
            assert torch.allclose(mine[key], want[key], rtol=1e-3, atol=1e-5), key
    state, want_state = checkpoint_state(run, CHECKPOINT), checkpoint_state(reference, CHECKPOINT)
    assert state["optimizer"] == want_state["optimizer"]  # param groups, indices included
    assert state["parallel"] == "fsdp"

    hf = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(hf)]) == 0
    assert (hf / "model.safetensors").exists() and (hf / "config.json").exists()
    exported = GPT.from_pretrained(hf).eval()
    idx = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        assert torch.allclose(exported(idx)[0], load_model(run)(idx)[0], atol=1e-5)

    # One process, no process group, 4 rows per micro-step: the same rows as the reference's steps 4-6.
    pretrain(one_process(shards, run, parallel="none"), resume=True)
    assert_same_losses(run, reference, range(4, STEPS + 1))
    assert checkpoint_state(run, STEPS)["loader"] == checkpoint_state(reference, STEPS)["loader"]


def assert_every_rank_failed(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Each rank that got as far as reporting says MESSAGE in one line; none prints a traceback.

    torchrun ends the other ranks (SIGTERM) as soon as one exits non-zero, so a rank that found the
    same error a moment later may be stopped before it can say so: such a rank must show up in
    torchrun's summary as ended by signal 15, never as failing any other way."""
    assert result.returncode != 0
    reported = 0
    for rank in (0, 1):
        lines = [
            line for line in result.stderr.splitlines() if line.startswith(f"ferrolm: error (rank {rank}/2)")
        ]
        assert len(lines) <= 1, result.stderr[-3000:]
        if lines:
            assert message in lines[0], result.stderr[-3000:]
            reported += 1
        else:
            stopped = re.search(
                rf"rank\s*: {rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*: -15", result.stderr
            )
            assert stopped, result.stderr[-3000:]
    assert reported >= 1, result.stderr[-3000:]
    assert "]: Traceback" not in result.stderr  # no rank's traceback (torchrun prefixes them "[rankN]:")


def test_a_bad_global_batch_stops_every_rank(shards, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """(d) 6 rows per step cannot split into 2 ranks x 2 rows: both ranks say so, before any collective."""
    result = torchrun([*pretrain_args(shards, tmp_path / "run"), "--global-batch-size=6"], tmp_path)
    assert_every_rank_failed(result, "global_batch_size 6 is not divisible by world_size 2 x batch_size 2")
    assert not (tmp_path / "run").exists()


def test_a_mismatched_checkpoint_stops_every_rank(shards, reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """(d) Only rank 0 reads the checkpoint; its verdict reaches rank 1 through a collective."""
    result = torchrun(
        ["pretrain", f"--out={reference}", "--resume", "--seed=1", "--batch-size=2", "--quiet"], tmp_path
    )
    assert_every_rank_failed(result, "--resume: seed is 1 but the checkpoint")
    assert "(reported by rank 0)" in result.stderr
    assert sorted(records(reference)) == list(range(1, STEPS + 1))  # untouched


def test_the_global_batch_layout() -> None:
    """grad_accum from the global batch; one clear error when the numbers cannot agree."""
    config = TrainConfig(data="d", out="o", batch_size=2, global_batch_size=8)
    assert (
        config.batch_layout(1) == (4, 8)
        and config.batch_layout(2) == (2, 8)
        and config.batch_layout(4) == (1, 8)
    )
    with pytest.raises(FerrolmError, match="not divisible by world_size 3 x batch_size 2"):
        config.batch_layout(3)
    assert TrainConfig(data="d", out="o", batch_size=2, grad_accum=3).batch_layout(2) == (3, 12)
    assert TrainConfig(data="d", out="o", batch_size=2).batch_layout(2) == (1, 4)
    with pytest.raises(FerrolmError, match="but grad_accum is 3"):
        TrainConfig(data="d", out="o", batch_size=2, grad_accum=3, global_batch_size=8).batch_layout(2)
    assert resolve_parallel("auto", 1) == "none" and resolve_parallel("auto", 2) == "ddp"
    with pytest.raises(FerrolmError, match="torchrun started 2 processes"):
        resolve_parallel("none", 2)


def test_init_from_a_run_directory(shards, reference, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--init-from RUN`` starts from the run's latest weights (a new run: step 0, fresh optimizer)."""
    run = tmp_path / "continued"
    args = ["pretrain", f"--data={shards}", f"--out={run}", f"--init-from={reference}", "--batch-size=4"]
    assert main([*args, "--seq-len=32", "--eval-batches=2", "--max-steps=1", "--quiet"]) == 0
    # The step-0 evaluation sees the reference's final weights on the same val rows.
    assert records(run, "val")[0]["val_loss"] == records(reference, "val")[STEPS]["val_loss"]
