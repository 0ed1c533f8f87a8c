"""benches/gpu_check.py, the one-shot GPU check, exercised on the CPU: its --dry-run goes through every
section's code with tiny shapes and the SDPA fallback, and one failing section keeps the others' numbers.
(The real run needs a GPU; its figures go to benches/RESULTS.md.)"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "gpu_check.py"


def _load() -> object:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_goes_through_attention_and_training(tmp_path: Path) -> None:
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--dry-run", "--sections", "attention,train"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert [s["status"] for s in report["sections"].values()] == ["ok", "ok"]
    rows = report["sections"]["attention"]["data"]["rows"]
    assert {(r["T"], r["documents"]) for r in rows} == {(64, False), (128, False), (64, True), (128, True)}
    for row in rows:
        ours = row["results"]["ferrolm"]
        assert ours["fwd"] > 0 and ours["fwd+bwd"] > 0, row
    dense = [r for r in rows if not r["documents"]]
    assert all(r["ratio fwd vs sdpa-flash"] > 0 for r in dense)
    runs = report["sections"]["train"]["data"]["runs"]
    assert runs["eager"]["tokens_per_s"] > 0 and runs["eager"]["final_loss"] > 0
    assert "skipped" in runs["compile"]["error"]
    md = (out / "gpu_check.md").read_text()
    assert "| attention | ok |" in md and "## Training: tiny" in md and "dry run" in md


def test_a_failing_section_keeps_the_others(tmp_path: Path) -> None:
    gpu_check = _load()
    args = argparse.Namespace(out=tmp_path, dry_run=True)

    def boom(args: argparse.Namespace) -> dict:
        raise RuntimeError("out of memory, say")

    def fine(args: argparse.Namespace) -> dict:
        return {"rows": [], "skipped_for_time": [], "device": "cpu", "kernel_backend": "sdpa"}

    report = gpu_check.run_sections({"tests": boom, "attention": fine}, args)  # type: ignore[attr-defined]
    assert report["sections"]["tests"]["status"] == "failed"
    assert "out of memory, say" in report["sections"]["tests"]["error"]
    assert report["sections"]["attention"]["status"] == "ok"
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["sections"]["attention"]["status"] == "ok"
    assert "| tests | failed: RuntimeError: out of memory, say |" in (tmp_path / "gpu_check.md").read_text()


def test_bad_section_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _load()
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path), "--sections", "tests,bogus"])  # type: ignore[attr-defined]
    assert exit_info.value.code == 2
    assert "bogus" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = _load()
    assert gpu_check.main(["--out", str(tmp_path)]) == 2  # type: ignore[attr-defined]
    assert "--dry-run" in capsys.readouterr().err
