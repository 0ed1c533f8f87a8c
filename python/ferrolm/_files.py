"""File mechanics, in one place: crash-safe writes, digests, leftovers of killed runs, and reads that
fail with one line naming the file.

- Writes (design convention 8): a file is written under a temporary name in the same directory,
  ``.NAME.tmp-PID`` (the name the Rust core's ``rust/files.rs`` uses), fsynced, renamed over NAME, and
  the directory fsynced so that the rename itself survives a power cut. A reader sees the old file or
  the new one, never half of one. A directory (a checkpoint) is built the same way under
  ``.NAME.tmp-PID`` and renamed when complete (``publish_directory``).
- Leftovers: ``kill -9`` mid-write leaves ``.NAME.tmp-PID`` behind. ``remove_stale_temporaries``
  removes those whose writer is dead (the Rust rule: our name pattern, a PID that is neither ours nor
  alive), and nothing else.
- Reads: ``read_text`` / ``read_json`` / ``read_jsonl`` refuse a missing file, a directory, a FIFO or
  device (it would block or never end), invalid UTF-8 and invalid JSON with one ``FerrolmError`` naming
  the file (and the line) and what was expected, never a bare ``[Errno 2]`` or ``'utf-8' codec can't
  decode``.

Only the standard library: ``export``, ``demo`` and the CLI use it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ferrolm._core import FerrolmError

__all__ = [
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "copy_file_atomic",
    "fsync_dir",
    "parse_jsonl",
    "publish_directory",
    "read_bytes",
    "read_json",
    "read_jsonl",
    "read_text",
    "remove_stale_temporaries",
    "sha256_file",
    "temporary_owner",
    "temporary_path",
]

PathLike = str | os.PathLike[str]
_TMP = ".tmp-"


# ----------------------------------------------------------------------------------------------------
# Writes


def temporary_path(path: PathLike) -> Path:
    """The name ``path`` is written under before the rename: ``.NAME.tmp-PID`` in the same directory
    (same file system, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}{_TMP}{os.getpid()}")


def fsync_dir(path: PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX: fsync the directory itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """For writers that take a file name (safetensors' ``save_file``, matplotlib, ``shutil.copyfile``):
    yields the temporary path to write; on success it is fsynced and renamed to ``path``, on an error
    it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, fsync, rename."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, data: Any, *, indent: int | None = 1) -> None:
    """``data`` as JSON (UTF-8, a final newline)."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def copy_file_atomic(source: PathLike, target: PathLike) -> None:
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)


@contextmanager
def publish_directory(final: PathLike) -> Iterator[Path]:
    """Build a directory under ``.NAME.tmp-PID`` (yielded) and, once the block succeeds, fsync every
    file in it and rename it to ``final`` (replacing an older ``final``). On an error the temporary
    directory is removed and ``final`` is untouched."""
    final = Path(final)
    tmp = temporary_path(final)
    shutil.rmtree(tmp, ignore_errors=True)  # our own PID's leftover: a retry in this process
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.iterdir():  # every byte on disk before the rename makes the directory visible
            if file.is_file():
                _fsync_file(file)
        if final.exists():  # the same step again (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Leftovers of killed runs


def temporary_owner(name: str) -> int | None:
    """The PID in a ``.NAME.tmp-PID`` name made by ``temporary_path`` (or the Rust core), else None."""
    head, sep, pid = name.rpartition(_TMP)
    if not sep or not head.startswith(".") or len(head) < 2 or not (pid.isascii() and pid.isdigit()):
        return None
    value = int(pid)
    return value if value < 1 << 32 else None


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temporaries(directory: PathLike) -> list[Path]:
    """Remove the ``.NAME.tmp-PID`` files and directories in ``directory`` whose writer is dead (a
    ``kill -9`` mid-write leaves them): only names of our pattern, never one of this process or of a
    live one. Returns what was removed (nothing when ``directory`` does not exist)."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        pid = temporary_owner(entry.name)
        if pid is None or pid == os.getpid() or _process_is_alive(pid):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # another cleaner got there first
            continue
        removed.append(entry)
    return removed


# ----------------------------------------------------------------------------------------------------
# Reads


def read_bytes(path: PathLike, what: str = "a file") -> bytes:
    """The bytes of a regular file; a missing file, a directory, a FIFO or a device (which would block
    or never end) is one ``FerrolmError`` naming ``path`` and ``what`` was expected there."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FerrolmError(f"{path}: no such file (expected {what})") from None
    except OSError as error:
        raise FerrolmError(f"{path}: cannot be read ({error.strerror}; expected {what})") from None
    if stat.S_ISDIR(mode):
        raise FerrolmError(f"{path}: is a directory (expected {what})")
    if not stat.S_ISREG(mode):
        raise FerrolmError(f"{path}: not a regular file (a FIFO, socket or device; expected {what})")
    try:
        return path.read_bytes()
    except OSError as error:
        raise FerrolmError(f"{path}: cannot be read ({error.strerror}; expected {what})") from None


def _decode(path: Path, data: bytes, what: str, encoding: str = "utf-8") -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise FerrolmError(
            f"{path}:{line}: not valid UTF-8 (byte {error.start}); expected {what}, in UTF-8"
        ) from None


def read_text(path: PathLike, what: str = "a text file", *, encoding: str = "utf-8") -> str:
    """A UTF-8 file's text (``encoding="utf-8-sig"`` drops a byte-order mark)."""
    return _decode(Path(path), read_bytes(path, what), what, encoding)


def _loads(text: str) -> Any:
    """json.loads, with nesting too deep for Python's recursion limit reported like any other error."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def read_json(path: PathLike, what: str = "a JSON file") -> Any:
    path = Path(path)
    text = read_text(path, what)
    try:
        return _loads(text)
    except json.JSONDecodeError as error:
        raise FerrolmError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno}); expected {what}"
        ) from None


def parse_jsonl(
    path: PathLike, text: str, what: str = "JSON lines: one value per line", *, torn_tail: bool = False
) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of JSON-lines ``text`` read from ``path``.

    Only ``"\\n"`` ends a line (``str.splitlines`` would also split at U+2028, U+0085... inside
    strings). ``torn_tail``: a last line without its newline that does not parse is dropped: a writer
    killed mid-append leaves exactly that, and every line before it is complete."""
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, _loads(line)))
        except json.JSONDecodeError as error:
            if torn_tail and number == len(lines):  # the last piece has no "\n" after it
                break
            raise FerrolmError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); expected {what}"
            ) from None
    return records


def read_jsonl(
    path: PathLike, what: str = "JSON lines: one value per line", *, torn_tail: bool = False
) -> list[tuple[int, Any]]:
    """``parse_jsonl`` of a file. With ``torn_tail`` a torn last line is dropped even when its bytes
    are cut inside a UTF-8 character."""
    path = Path(path)
    data = read_bytes(path, what)
    if torn_tail and not data.endswith(b"\n"):
        complete, _, last = data.rpartition(b"\n")
        text = _decode(path, complete, what) + ("\n" if complete else "")
        try:
            text += last.decode("utf-8")
        except UnicodeDecodeError:
            pass  # a character cut by the crash: the torn line goes
        return parse_jsonl(path, text, what, torn_tail=True)
    return parse_jsonl(path, _decode(path, data, what), what)
