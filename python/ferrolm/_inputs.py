"""Input paths -> files: the one rule for what ``Tokenizer.train`` and ``shard_corpus`` read.

Each item is a file (read whatever its name, special files too: the core's reader refuses those by
name), a directory (searched recursively, in sorted order, for files with one of the caller's
suffixes, optionally ``.zst``/``.zstd``/``.gz`` compressed; hidden files and directories skipped),
or a glob pattern (``**`` allowed; a directory it matches is searched the same way). The files
come in the order the items are given. Which suffixes a caller reads is its own table: the
tokenizer trainer's Rust reader has no Parquet (``ferrolm.training.INPUT_SUFFIXES``), the sharder's
has (``ferrolm.data.TEXT_SUFFIXES``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from ferrolm._core import FerrolmError

__all__ = ["COMPRESSIONS", "expand_inputs"]

COMPRESSIONS = ("", ".zst", ".zstd", ".gz")

PathLike = str | os.PathLike[str]


def expand_inputs(
    inputs: PathLike | Iterable[PathLike], suffixes: tuple[str, ...], *, texts_hint: str = ""
) -> list[str]:
    """The files named by ``inputs`` (see the module's rule), in order; ``suffixes`` are the
    uncompressed ones a directory contributes (``.txt``...). A path that does not exist, a pattern
    that matches nothing or a directory without such files is an error naming it; ``texts_hint``
    ends the error for what looks like texts passed as paths (where the caller also takes texts)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise FerrolmError("no inputs: pass files, directories or glob patterns (or an iterator of texts)")
    wanted = tuple(base + compression for base in suffixes for compression in COMPRESSIONS)
    files: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"input {item!r} is not a path{texts_hint}")
        path = os.fspath(item)
        if os.path.isdir(path):
            found = _directory_files(path, wanted)
            if not found:
                raise FerrolmError(f"{path}: directory holds no {'/'.join(suffixes)} files (or compressed)")
            files.extend(found)
        elif os.path.exists(path):
            files.append(path)
        elif glob.has_magic(path):
            matched = sorted(glob.glob(path, recursive=True))
            if not matched:
                raise FileNotFoundError(f"{path}: no file matches this pattern")
            for m in matched:
                files.extend(_directory_files(m, wanted) if os.path.isdir(m) else [m])
        else:
            hint = ""
            if texts_hint and len(items) > 1 and not any(os.path.exists(os.fspath(i)) for i in items[:3]):
                hint = f" (a list of strings is read as paths{texts_hint})"
            raise FileNotFoundError(f"{path}: no such file or directory{hint}")
    return files


def _directory_files(root: str, wanted: tuple[str, ...]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(wanted):
                out.append(os.path.join(dirpath, name))
    return out
