"""One rule for what input paths name (ferrolm._inputs), used by the tokenizer trainer and the sharder:
each keeps only its own suffix table and its own order."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrolm import FerrolmError
from ferrolm.data import expand_inputs as shard_inputs
from ferrolm.training import expand_inputs as train_inputs


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("b/one.txt", "b/two.jsonl.zst", "a/x.md", "a/y.parquet", "a/z.txt.gz", "a/.hidden.txt",
                 ".git/c.txt", "a/notes.csv"):  # fmt: skip
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x\n")
    return tmp_path


def names(paths: list, root: Path) -> list[str]:  # type: ignore[type-arg]
    return [Path(p).relative_to(root).as_posix() for p in paths]


def test_both_walk_directories_the_same_way_with_their_own_suffixes(tree: Path) -> None:
    assert names(train_inputs(str(tree)), tree) == ["a/z.txt.gz", "b/one.txt", "b/two.jsonl.zst"]
    # The sharder reads Parquet and Markdown too; hidden files and directories are skipped by both.
    assert names(shard_inputs(str(tree)), tree) == ["a/x.md", "a/y.parquet", "a/z.txt.gz", "b/one.txt",
                                                    "b/two.jsonl.zst"]  # fmt: skip
    # A file named explicitly is read whatever its name; a glob's directories are searched.
    assert names(shard_inputs([tree / "a" / "notes.csv", str(tree / "[b]")]), tree) == [
        "a/notes.csv", "b/one.txt", "b/two.jsonl.zst"]  # fmt: skip


def test_the_errors_name_the_input(tree: Path) -> None:
    for expand in (train_inputs, shard_inputs):
        with pytest.raises(FileNotFoundError, match=r"nope: no such file or directory"):
            expand([str(tree / "nope")])
        with pytest.raises(FileNotFoundError, match=r"\*\.xyz: no file matches this pattern"):
            expand(str(tree / "*.xyz"))
        (tree / "empty").mkdir(exist_ok=True)
        with pytest.raises(FerrolmError, match=r"empty: directory holds no \.txt"):
            expand(str(tree / "empty"))
        with pytest.raises(FerrolmError, match="no inputs"):
            expand([])
        with pytest.raises(TypeError, match="is not a path"):
            expand([3])  # type: ignore[list-item]
    # Only the trainer, which also takes texts, says how to pass texts.
    with pytest.raises(FileNotFoundError, match=r"iter\(texts\)"):
        train_inputs(["some text", "more text"])
    with pytest.raises(FileNotFoundError) as raised:
        shard_inputs(["some text", "more text"])
    assert "iter(texts)" not in str(raised.value)


@settings(max_examples=30, deadline=None)
@given(order=st.permutations(["a", "b", "b/one.txt", "a/z.txt.gz"]))
def test_the_trainer_keeps_the_order_given_and_the_sharder_sorts(tmp_path_factory, order) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("inputs")
    for name in ("b/one.txt", "a/z.txt.gz", "a/w.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x\n")
    items = [str(root / item) for item in order]
    expected = [f for item in items for f in train_inputs(item)]  # each item's files, in the order given
    assert train_inputs(items) == expected
    assert shard_inputs(items) == sorted({Path(f) for f in expected})  # distinct, whatever the order
