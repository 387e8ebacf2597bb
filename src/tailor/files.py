"""Writing files and directories so that a crash or a kill never leaves half of one.

Every writer in tailor goes through `atomic_output`: the content is written to a temporary sibling (same
filesystem, so the final rename is atomic), flushed to disk, and renamed into place only when complete.
An exception removes the temporary and leaves whatever was at the path before untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; move it into place on success.

    With `directory=True` the temporary is an empty directory and an existing directory at `path` is
    swapped out whole (old moved aside, new renamed in, old deleted). Refuses to replace a file with a
    directory or the reverse: that is almost always a wrong path, and the user's file would be lost.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise FileExistsError(f"{path} is {kind}; expected {'a directory' if directory else 'a file'} there. "
                              "Choose another path or move it away.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:
        descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(descriptor)
        tmp = Path(name)
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, aside / path.name)
            os.replace(tmp, path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_tree(path.parent, recursive=False)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete what an interrupted `atomic_output` left in `directory` (after a SIGKILL: no finally ran)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for child in directory.glob(".*.tmp-*"):
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    for child in directory.glob(".*.old-*"):
        shutil.rmtree(child, ignore_errors=True)


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush `path` (a file, or a directory's files and entry) so that a rename after it is durable."""
    try:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            return
        if recursive:
            for child in path.rglob("*"):
                if child.is_file():
                    with open(child, "rb") as handle:
                        os.fsync(handle.fileno())
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass


def directory_size(path: str | os.PathLike) -> int:
    """Bytes of all files under `path` (0 when it does not exist): an artifact's size on disk."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


__all__ = ["atomic_output", "atomic_write_json", "atomic_write_text", "directory_size",
           "remove_stale_temporaries"]
