"""Compile-time properties of the attention kernels, checked on a machine without a GPU.

1. Ahead of time (Triton): the kernels compiled for real GPUs, with the tiles the dispatcher launches
   there (ferrolm.kernels.configs.gpu_config), through ferrolm.kernels.report. A case fails on a compile
   error, on shared memory over the target's per-block limit (sm_80 163 KiB, sm_90/sm_100 227 KiB) or on
   a stack frame over the kernel's budget (report.SPILL_BUDGET). Covered here, in a fresh Triton cache:
   every kernel (fwd, delta, dK/dV, dQ) x head dim {64, 128, 256} x target {sm_80, sm_90, sm_100 where the
   installed triton supports it} x dtype {bf16, fp16}. The axes that move registers little (causal or
   not, varlen or dense, GQA group 1 or 4) are sampled: per kernel, head dim and target, bf16 compiles one
   (mask, layout, group) combination and fp16 its complement (every axis flipped), rotating the starting
   combination, so each kernel x head dim x target sees both masks, both layouts and both groups. The
   delta kernel has none of those axes. ``python -m ferrolm.kernels.report`` compiles the full matrix.
2. torch.compile: a model step whose document boundaries change (cu_seqlens of a fixed length, as the
   loader pads it) is traced into one graph and never recompiled.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from ferrolm.kernels import configs, report

# Nothing here imports triton in this process (the compiles run in spawned workers): the interpreter
# tests need to be the first to import it, with TRITON_INTERPRET set (see report._triton_dir).
try:
    TARGETS = report.supported_targets()
except (ImportError, RuntimeError) as error:  # no triton, or one without its NVIDIA tools
    TARGETS = []
    NO_BACKEND = f"the compile check cannot run here: {error}"
else:
    NO_BACKEND = ""
requires_backend = pytest.mark.skipif(not TARGETS, reason=NO_BACKEND or "no target")

# (causal, varlen, group): complement = every axis flipped.
_COMBOS = list(itertools.product((True, False), (True, False), (1, 4)))


def _sampled_cases() -> list[report.Case]:
    cases = []
    for ik, kernel in enumerate(report.KERNELS):
        for it, target in enumerate(TARGETS):
            for idim, d in enumerate(report.HEAD_DIMS):
                if kernel == "delta":
                    cases += [report.Case(kernel, target, d, dt, True, False, 1) for dt in report.DTYPES]
                    continue
                causal, varlen, group = _COMBOS[(ik + it + idim) % len(_COMBOS)]
                cases.append(report.Case(kernel, target, d, "bf16", causal, varlen, group))
                cases.append(report.Case(kernel, target, d, "fp16", not causal, not varlen, 5 - group))
    return cases


CASES = _sampled_cases()


@pytest.fixture(scope="module")
def compiled(monkeypatch_module: pytest.MonkeyPatch) -> dict[report.Case, report.Result]:
    """Every sampled case, compiled once for the module (two compiler processes)."""
    monkeypatch_module.delenv("TRITON_INTERPRET", raising=False)
    jobs = max(1, min(2, os.cpu_count() or 1))
    return dict(zip(CASES, report.run(CASES, jobs=jobs), strict=True))


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@requires_backend
def test_sampling_covers_every_axis() -> None:
    """The claim in the docstring: every kernel x head dim x target x dtype, and per kernel x head dim x
    target both masks, both layouts and both GQA groups."""
    seen = {(c.kernel, c.head_dim, c.target, c.dtype) for c in CASES}
    assert seen == set(itertools.product(report.KERNELS, report.HEAD_DIMS, TARGETS, report.DTYPES))
    for kernel, d, target in itertools.product(("fwd", "dkdv", "dq"), report.HEAD_DIMS, TARGETS):
        mine = [c for c in CASES if (c.kernel, c.head_dim, c.target) == (kernel, d, target)]
        assert {c.causal for c in mine} == {True, False}
        assert {c.varlen for c in mine} == {True, False}
        assert {c.group for c in mine} == {1, 4}


@requires_backend
def test_sm90_is_checked() -> None:
    assert 80 in TARGETS and 90 in TARGETS


@requires_backend
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_compiles_within_budget(compiled: dict[report.Case, report.Result], case: report.Case) -> None:
    result = compiled[case]
    assert result.error is None, f"{case.name} ({result.blocks}): {result.error}"
    assert result.regs is not None and result.stack is not None and result.shared is not None
    assert not result.problems, f"{case.name} ({result.blocks}): {'; '.join(result.problems)}"


@requires_backend
def test_plan_launches_the_dispatcher_config() -> None:
    """The report compiles the host code's own launch, with gpu_config's tiles for the target."""
    for kernel, config_field in (("fwd", "fwd"), ("delta", "dq"), ("dkdv", "dkdv"), ("dq", "dq")):
        case = report.Case(kernel, 90, 128, "bf16", True, True, 4)
        plan = report._meta_plan(case)
        assert plan.kernel == kernel
        assert plan.blocks == getattr(configs.gpu_config(128, (9, 0)), config_field)
    assert report._meta_plan(report.Case("fwd", 80, 64, "fp16", False, False, 1)).blocks == (
        configs.gpu_config(64, (8, 0)).fwd
    )


@requires_backend
def test_the_check_catches_spills_and_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: the untuned dK/dV tiles at head dim 128 spill kilobytes on sm_80, and a
    forward with far too many pipeline stages asks for more shared memory than sm_90 has."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    untuned = configs._UNTUNED[128]
    greedy = configs.Config(configs.Blocks(128, 128, 8, 6), untuned.dkdv, untuned.dq)  # 64 KiB a stage
    monkeypatch.setitem(configs.GPU_CONFIGS["sm80"], 128, untuned)
    monkeypatch.setitem(configs.GPU_CONFIGS["sm90"], 128, greedy)
    spilled, greedy_result = report.run(
        [
            report.Case("dkdv", 80, 128, "bf16", True, True, 1),
            report.Case("fwd", 90, 128, "bf16", False, False, 1),
        ]
    )
    assert spilled.error is None and spilled.stack > report.SPILL_BUDGET["dkdv"]
    assert any("stack" in p for p in spilled.problems)
    assert greedy_result.error is None and greedy_result.shared > report.SHARED_LIMIT[90]
    assert any("shared memory" in p for p in greedy_result.problems)


@requires_backend
def test_a_compile_error_is_a_failing_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles below the tensor cores' 16-row minimum do not compile: reported, not raised."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tiny = configs.Blocks(8, 8, 4, 1)
    monkeypatch.setitem(configs.GPU_CONFIGS["sm90"], 64, configs.Config(tiny, tiny, tiny))
    (result,) = report.run([report.Case("fwd", 90, 64, "bf16", True, False, 1)])
    assert result.error is not None
    assert result.problems and result.problems[0].startswith("compile error")


@requires_backend
def test_report_cli_prints_markdown(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = report.main(
        ["--kernels", "delta", "--targets", "80", "--head-dims", "64", "--dtypes", "bf16", "--jobs", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| delta | 64 | sm_80 |" in out and "| delta-sm80-d64-bf16-causal-dense-g1 |" in out


def test_report_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--head-dims", "96"])
    assert exit_info.value.code == 2
    assert "--head-dims" in capsys.readouterr().err


def test_refuses_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        report.run([report.Case("delta", 90, 64, "bf16", True, False, 1)])


# ----------------------------------------------------------------------------------------------------
# torch.compile. The two interpreter tests run in a fresh pytest process with TRITON_INTERPRET set from
# the start: triton decides at import whether its own library functions (tl.zeros_like, used by the
# varlen kernels) are interpreted, and this process may have imported it already (dynamo does).

_CHILD = "FERROLM_AOT_INTERPRETER_CHILD"


def _in_fresh_interpreter_process(name: str) -> bool:
    """True in the child (run the test body); in the parent, run ``name`` in a child and check it."""
    if os.environ.get(_CHILD) == "1":
        return True
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{name}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    return False


def test_compiled_triton_path_is_one_graph_and_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels are torch custom operators: torch.compile keeps them as one node (no graph break into
    the launch code) and gets the same output and gradients. Run in Triton's interpreter, fp32."""
    pytest.importorskip("triton")
    if not _in_fresh_interpreter_process("test_compiled_triton_path_is_one_graph_and_matches_eager"):
        return
    from ferrolm.kernels import attention, flash_attention_varlen

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    graphs = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    cu = torch.tensor([0, 10, 37, 48, 48], dtype=torch.int32)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (flash_attention_varlen(q, k, v, cu, 27, True, backend="triton") * 2).sum()

    gen = torch.Generator().manual_seed(15)
    leaves = [torch.randn(48, h, 16, generator=gen) for h in (4, 2, 2)]
    results = []
    for fn in (step, torch.compile(step, backend=record)):
        inputs = [t.clone().requires_grad_() for t in leaves]
        fn(*inputs).backward()
        results.append([t.grad for t in inputs])
    assert len(graphs) == 1
    assert "ferrolm.flash_attention_forward" in str(graphs[0].graph)
    for eager, compiled_grad in zip(*results, strict=True):
        torch.testing.assert_close(compiled_grad, eager)
    assert attention._interpret_mode()
    torch._dynamo.reset()


def test_custom_operator_passes_opcheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration agree with the
    real kernels (in the interpreter)."""
    pytest.importorskip("triton")
    if not _in_fresh_interpreter_process("test_custom_operator_passes_opcheck"):
        return
    from ferrolm.kernels import attention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(40, h, 16, generator=gen).requires_grad_() for h in (2, 1, 1))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    torch.library.opcheck(attention._flash_forward_op, (q, k, v, cu, 0, True, 0.25))
    torch.library.opcheck(attention._flash_forward_op, (q, k, v, None, 20, False, 0.25))


def test_compiled_model_step_does_not_recompile_for_new_document_boundaries() -> None:
    """The loader pads cu_seqlens to a fixed length, so a new batch's boundaries change values, not
    shapes: the compiled model must neither recompile nor break its graph (a graph break inside the loop
    over blocks would make dynamo skip the whole forward). max_seqlen is the static seq_len, as the
    loader's documentation says a trainer may pass. Dynamo alone decides recompiles; a recording backend
    keeps the test fast."""
    from ferrolm.model import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", vocab_size=256))
    graphs = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    step = torch.compile(model, backend=record)
    B, T, n_cu = 2, 64, 12

    def batch(rows: list[list[int]]) -> tuple[torch.Tensor, ...]:
        lengths = [n for row in rows for n in row]
        bounds = [0, *itertools.accumulate(lengths)]
        bounds += [bounds[-1]] * (n_cu - len(bounds))  # the loader's padding: zero-length documents
        position_ids = torch.cat([torch.arange(n) for n in lengths]).view(B, T)
        ids = torch.randint(0, 256, (B, T))
        return ids, position_ids, torch.tensor(bounds, dtype=torch.int32)

    layouts = [[[30, 34], [64]], [[10, 20, 34], [1, 63]], [[64], [64]], [[5] * 8 + [24], [32, 32]]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in layouts:
            ids, position_ids, cu = batch(rows)
            _, loss = step(ids, ids, position_ids=position_ids, cu_seqlens=cu, max_seqlen=T)
            loss.backward()
            assert torch.isfinite(loss)
    assert len(graphs) == 1, f"{len(graphs)} graphs: the forward broke its graph"
    torch._dynamo.reset()
