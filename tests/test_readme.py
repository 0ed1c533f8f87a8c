"""The README as a newcomer runs it: the tour's python blocks run as written (offline, in an empty
directory), and each thing issue 17 found confusing on the way stays fixed."""

from __future__ import annotations

import io
import json
import re
import socket
import sys
import warnings
from pathlib import Path

import pytest

import ferrolm
from ferrolm import Tokenizer
from ferrolm._progress import ProgressLine
from ferrolm.cli import main as cli_main
from ferrolm.data import PackedLoader, shard_corpus

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


@pytest.fixture
def offline(monkeypatch):  # type: ignore[no-untyped-def]
    """Any attempt to open a network connection fails the test (the tour promises no download)."""

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError(f"the README tour tried to use the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def small_tokenizer() -> Tokenizer:
    words = ["alpha", "beta", "gamma", "delta", "the", "end", "of", "text", "\n"]
    texts = (" ".join(words[i % 9 :] + words[: i % 9]) for i in range(200))
    return Tokenizer.train(texts, 280, show_progress=False)


def small_corpus(directory: Path, documents: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(documents):
        path = directory / f"doc{i}.txt"
        path.write_text(f"document {i}: alpha beta gamma delta the end of text\n" * 20, encoding="utf-8")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The tour, as written


def test_the_tour_runs_as_written(tmp_path, monkeypatch, offline, capsys):  # type: ignore[no-untyped-def]
    pytest.importorskip("torch")
    blocks = readme_blocks("python")
    assert len(blocks) >= 4, "the README tour lost its python blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    threads = ferrolm.get_num_threads()  # the tour sets the pool's size: the tests after it get it back
    try:
        for number, block in enumerate(blocks, 1):
            try:
                exec(compile(block, f"README.md python block {number}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(
                    f"README python block {number} fails as written: {error!r}\n{block}"
                ) from error
    finally:
        ferrolm.set_num_threads(threads)
    # What the tour says it leaves behind is there and loads.
    assert Tokenizer.from_pretrained(tmp_path / "out" / "tokenizer.json").vocab_size == 4096
    assert (tmp_path / "out" / "my.tiktoken").is_file()
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"]["val"]["documents"] > 0
    assert (tmp_path / "hf" / "tiny" / "config.json").is_file()
    assert (tmp_path / "runs" / "sentiment" / "classifier.json").is_file()
    assert namespace["batch"]["input_ids"].shape == (8, 128)
    assert type(namespace["batch"]["input_ids"]).__module__ == "numpy"


def test_set_up_commands_are_the_two_the_readme_promises() -> None:
    bash = "\n".join(readme_blocks("bash"))
    assert 'pip install ".[train]" && ferrolm demo' in bash
    assert "\nmake test\n" in bash
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "train" in project["optional-dependencies"]
    assert project["scripts"]["ferrolm"] == "ferrolm.cli:main"


def test_install_lines_expand_their_globs() -> None:
    """Item 1: inside quotes the shell does not expand `*` ("dist/ferrolm-*.whl[train]" fails)."""
    text = README.read_text(encoding="utf-8")
    for quoted in re.findall(r'pip install "([^"]*)"', text):
        assert "*" not in quoted or quoted.startswith("$("), f"pip install {quoted!r}: the * is not expanded"
    assert "download.pytorch.org/whl/cpu" in text  # item 10: the CPU build of torch, in one line


# ---------------------------------------------------------------------------------------------
# Item 3: saving creates parent directories


def test_save_creates_parent_directories(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tok = small_tokenizer()
    tok.save(tmp_path / "new" / "deeper" / "tokenizer.json")
    tok.save_tiktoken(tmp_path / "other" / "tok.tiktoken")
    again = Tokenizer.from_pretrained(tmp_path / "new" / "deeper" / "tokenizer.json")
    assert again.encode("alpha beta") == tok.encode("alpha beta")
    assert (tmp_path / "other" / "tok.tiktoken").stat().st_size > 0
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file"):
        tok.save(tmp_path / "a_file" / "tokenizer.json")


def test_cli_tokenizer_train_creates_the_output_directory(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    corpus = small_corpus(tmp_path / "corpus", 3)
    out = tmp_path / "out" / "sub" / "tok.json"
    assert (
        cli_main(
            ["tokenizer", "train", *map(str, corpus), "--vocab-size", "280", "--out", str(out), "--quiet"]
        )
        == 0
    )
    assert Tokenizer.from_pretrained(out).vocab_size == 280


# ---------------------------------------------------------------------------------------------
# Item 4: an empty validation split is said, not silently skipped


def test_empty_val_split_warns_when_sharding(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tok = small_tokenizer()
    files = small_corpus(tmp_path / "corpus", 5)
    with pytest.warns(
        UserWarning, match=r"val_fraction=0\.001 put none of the 5 document\(s\) .* use val_fraction=0\.5"
    ):
        manifest = shard_corpus(files, tmp_path / "few", tok, val_fraction=0.001, show_progress=False)
    assert manifest.documents("val") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for no validation: nothing to say
        shard_corpus(files, tmp_path / "none", tok, val_fraction=0.0, show_progress=False)


def test_empty_val_split_warns_when_pretraining(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("torch")
    from ferrolm.train import TrainConfig, pretrain

    files = small_corpus(tmp_path / "corpus", 5)
    shard_corpus(files, tmp_path / "shards", small_tokenizer(), val_fraction=0.0, show_progress=False)
    config = TrainConfig(
        data=str(tmp_path / "shards"), out=str(tmp_path / "run"), max_steps=1, device="cpu", progress=False
    )
    with pytest.warns(UserWarning, match="val split is empty"):
        summary = pretrain(config)
    assert summary["val_loss"] is None


# ---------------------------------------------------------------------------------------------
# Items 5-7: the command line


def test_debug_is_accepted_anywhere(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "missing.json")
    assert cli_main(["tokenizer", "info", missing]) == 1
    assert "ferrolm: error:" in capsys.readouterr().err
    for argv in (["--debug", "tokenizer", "info", missing], ["tokenizer", "info", missing, "--debug"]):
        with pytest.raises(FileNotFoundError):
            cli_main(argv)
    with pytest.raises(FileNotFoundError):
        cli_main(["shard", "merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--debug"])
    # After `--`, "--debug" is an argument like any other (here: a token id that is not a number).
    assert cli_main(["tokenizer", "decode", "--tokenizer", missing, "--", "--debug"]) == 1


def test_shard_merge_help_lists_the_common_options(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (["shard", "merge", "--help"], ["--help"]):
        with pytest.raises(SystemExit) as exit:
            cli_main(argv)
        assert exit.value.code == 0
        text = capsys.readouterr().out
        assert "--debug" in text and "--version" in text and "anywhere" in text


def test_tiktoken_pattern_error_names_the_cli_option(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Item 6: on the command line the option is --pattern, not pattern=."""
    path = tmp_path / "mine.tiktoken"
    small_tokenizer().save_tiktoken(path)
    assert cli_main(["tokenizer", "info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "--pattern" in err and str(path) in err
    assert cli_main(["tokenizer", "info", str(path), "--pattern", "gpt2"]) == 0


def test_decode_names_the_largest_valid_id(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Item 7: "ids are 0..280" read as if 280 were valid; the message names 279."""
    tok = small_tokenizer()
    tok.save(tmp_path / "tok.json")
    assert cli_main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok.json"), "5", "999999"]) == 1
    err = capsys.readouterr().err
    assert "999999" in err and "0 to 279" in err and "0..280" not in err
    with pytest.raises(ferrolm.FerrolmError, match=r"token id 280 at position 1 .*0 to 279"):
        tok.decode([0, 280])
    assert tok.decode([279]) == tok.decode_bytes([279]).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# Item 8: progress lines in logs


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_on_a_terminal_and_prints_lines_in_a_log() -> None:
    terminal, log = FakeTerminal(), io.StringIO()
    for stream in (terminal, log):
        line = ProgressLine(True, stream)
        line.show("step 1")
        line.last = 0.0  # pretend the interval has passed
        line.show("step 2")
        line.note("val loss 1.0")
        line.show("step 3", final=True)
        line.close()
    assert terminal.getvalue().startswith("\rstep 1") and "\rval loss 1.0" in terminal.getvalue()
    assert log.getvalue() == "step 1\nstep 2\nval loss 1.0\nstep 3\n"
    quiet = io.StringIO()
    ProgressLine(False, quiet).show("step 1", final=True)
    assert quiet.getvalue() == ""


def test_sharding_and_training_progress_in_a_pipe_has_no_carriage_returns(tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    files = small_corpus(tmp_path / "corpus", 4)
    tok = Tokenizer.train([str(p) for p in files], 290, show_progress=True)  # the Rust core's line
    shard_corpus(files, tmp_path / "shards", tok, val_fraction=0.0, show_progress=True)
    err = capfd.readouterr().err
    assert "shard:" in err and "done in" in err
    assert "\r" not in err, err


# ---------------------------------------------------------------------------------------------
# Item 9: the loader needs only numpy


def test_loader_default_format_follows_what_is_installed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    import numpy as np

    files = small_corpus(tmp_path / "c", 6)
    shard_corpus(files, tmp_path / "s", small_tokenizer(), val_fraction=0.0, show_progress=False)
    real_find_spec = importlib.util.find_spec

    def without_torch(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None if name == "torch" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_torch)
    with PackedLoader(tmp_path / "s", batch_size=2, seq_len=16) as loader:
        assert loader.format == "numpy"
        assert isinstance(next(loader)["input_ids"], np.ndarray)
    monkeypatch.undo()
    if importlib.util.find_spec("torch") is not None:
        with PackedLoader(tmp_path / "s", batch_size=2, seq_len=16) as loader:
            assert loader.format == "torch"
