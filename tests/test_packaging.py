"""Packaging: one version everywhere, the built wheel is manylinux_2_17 and installs into a fresh
venv, the sdist carries what a build needs, and the release workflow builds what the README says.

The wheel checks read dist/ as `make wheel` leaves it. Run by hand without a wheel there, they skip;
under CI (CI=true) a missing wheel fails, so CI cannot pass without proving the tag.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import ferrolm
from ferrolm import _core
from ferrolm.cli import main as cli_main

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "dist"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true")


def built(pattern: str) -> Path:
    found = sorted(DIST.glob(pattern))
    if len(found) != 1:
        message = f"expected one {pattern} in {DIST} (make wheel), found {[p.name for p in found]}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found[0]


# ---------------------------------------------------------------------------------------------
# One version


def test_one_version_from_cargo_toml_through_the_metadata(capsys) -> None:  # type: ignore[no-untyped-def]
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]  # no second copy to forget
    assert ferrolm.__version__ == importlib.metadata.version("ferrolm") == _core.__version__ == cargo
    for argv in (["--version"], ["shard", "merge", "--version"]):
        with pytest.raises(SystemExit) as exit:
            cli_main(argv)
        assert exit.value.code == 0
        assert capsys.readouterr().out == f"ferrolm {cargo}\n"


# ---------------------------------------------------------------------------------------------
# The wheel


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="manylinux wheels are Linux's")
def test_wheel_is_manylinux_2_17_and_links_nothing_outside_the_policy() -> None:
    wheel = built("ferrolm-*-cp310-abi3-*.whl")
    assert "manylinux_2_17_x86_64" in wheel.name or "manylinux_2_17_aarch64" in wheel.name, wheel.name
    if importlib.util.find_spec("auditwheel") is None:
        if IN_CI:
            pytest.fail("auditwheel is not installed (make venv installs it)")
        pytest.skip("auditwheel is not installed")
    shown = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)], capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    # auditwheel names the most compatible policy the wheel meets: one that links a library outside
    # the policy, or uses a newer glibc symbol, gets a later tag (or "linux_x86_64").
    assert re.search(
        r'consistent with the following platform tag: "manylinux_2_17_(x86_64|aarch64)"', text
    ), text


def test_wheel_installs_and_imports_in_a_fresh_venv(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No numpy, no torch, nothing but the wheel: import, train, encode, decode, the console script."""
    wheel = built("ferrolm-*-cp310-abi3-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    subprocess.run([*install, "--no-index", "--no-deps", str(wheel)], check=True, timeout=300)
    smoke = (
        "import sys, ferrolm\n"
        "tok = ferrolm.Tokenizer.train(iter(['hello world'] * 50), 300, show_progress=False)\n"
        "assert tok.decode(tok.encode('hello world')) == 'hello world'\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
        "print(ferrolm.__version__, ferrolm.__file__)\n"
    )
    run = subprocess.run([python, "-c", smoke], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    version, location = run.stdout.split()
    assert version == ferrolm.__version__ and str(venv) in location
    script = venv / ("Scripts/ferrolm.exe" if os.name == "nt" else "bin/ferrolm")
    shown = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip() == f"ferrolm {ferrolm.__version__}", shown.stderr
    metadata = importlib.metadata.Distribution.at(
        next((venv / "lib").glob("python*/site-packages/ferrolm-*.dist-info"))
    )
    assert any(r.startswith("numpy") for r in metadata.requires or [])


# ---------------------------------------------------------------------------------------------
# The sdist (`make sdist-check` builds it from scratch in a clean venv; this checks its contents)


def test_sdist_carries_every_source_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    maturin = shutil.which("maturin") or str(Path(sys.executable).with_name("maturin"))
    if not Path(maturin).exists() or not (ROOT / ".git").exists():
        if IN_CI:
            pytest.fail("maturin and a git checkout are needed to check the sdist")
        pytest.skip("needs maturin and a git checkout")
    subprocess.run(
        [maturin, "sdist", "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300
    )
    (archive,) = tmp_path.glob("ferrolm-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(
        ["git", "ls-files", "rust", "python", "Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    missing = sorted(set(tracked) - names)
    assert not missing, f"the sdist lacks {missing}"


# ---------------------------------------------------------------------------------------------
# The release workflow (it runs on GitHub, not here: check that it builds what the README promises)


def test_release_workflow_builds_every_promised_wheel() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers["push"]["tags"] == ["v*"]
    jobs = workflow["jobs"]
    matrix = jobs["wheels"]["strategy"]["matrix"]
    platforms = {p["name"]: p for p in matrix["platform"]}
    assert set(platforms) == {
        "linux-x86_64",
        "linux-aarch64",
        "macos-arm64",
        "macos-x86_64",
        "windows-x86_64",
    }
    for name in ("linux-x86_64", "linux-aarch64"):
        assert "--compatibility manylinux_2_17" in platforms[name]["args"]
    assert {p["name"] for p in matrix["python"]} == {"abi3", "cp314t"}
    steps = jobs["wheels"]["steps"]
    assert any(str(s.get("uses", "")).startswith("PyO3/maturin-action@") for s in steps)
    smoke = [s["run"] for s in steps if "import" in s.get("name", "")]
    assert smoke and "pip install dist/" in smoke[0] and re.search(r"import .*ferrolm", smoke[0])
    sdist = jobs["sdist"]["steps"]
    assert any(s.get("with", {}).get("command") == "sdist" for s in sdist)
    assert any("pip" in s.get("run", "") and ".tar.gz" in s.get("run", "") for s in sdist)
    assert set(jobs["publish"]["needs"]) == {"wheels", "sdist"}
