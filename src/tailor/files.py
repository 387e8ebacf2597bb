"""Writing files and directories so that a crash or a kill never leaves half of one.

Every writer in tailor goes through `atomic_output`: the content is written to a temporary sibling (same
filesystem, so the final rename is atomic), flushed to disk, and renamed into place only when complete.
An exception removes the temporary and leaves whatever was at the path before untouched.

Temporaries are named `.<name>.tmp-<random>` (and, during a directory swap, `.<name>.old-<random>/<name>`
holds the previous directory); `remove_stale_temporaries` cleans up after a process killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputPathError(FileExistsError, ValueError):
    """An output path that cannot be written without losing what is there (a file where a directory goes,
    or the reverse; a file where a parent directory goes). A ValueError too, so that the command line
    reports it as one line with the fix."""


def tailor_cache_dir() -> Path:
    """Root of tailor's cache: $TAILOR_CACHE, else ~/.cache/tailor. Here (no torch) so that the adapter store
    and `tailor env` read it without loading the model code."""
    return Path(os.environ.get("TAILOR_CACHE") or "~/.cache/tailor").expanduser()


def check_output_path(path: str | os.PathLike, directory: bool = False, writable: bool = True) -> Path:
    """Refuse, before any work is done, an output `path` that `atomic_output` would refuse (see there) or,
    with `writable`, could not write (os.access: no permission in the nearest existing directory)."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise OutputPathError(f"{path} is {kind}; expected {'a directory' if directory else 'a file'} there. "
                              "Choose another path or move it away.")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputPathError(f"{path} cannot be written: {blocker} is a file, not a directory. Choose "
                              "another path or move the file away; it is left as it is.")
    nearest = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    if writable and not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path} cannot be written: no permission to write in {nearest}. Choose a path "
                              "you can write to.")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; move it into place on success.

    With `directory=True` the temporary is an empty directory and an existing directory at `path` is
    swapped out whole (old moved aside, new renamed in, old deleted). Refuses to replace a file with a
    directory or the reverse: that is almost always a wrong path, and the user's file would be lost.
    """
    path = check_output_path(path, directory, writable=False)  # the OS says whether writing is allowed
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_sibling(path, "tmp", directory)
    except PermissionError as error:
        raise OutputPathError(f"{path} cannot be written: {error.strerror} ({error.filename}). Choose a path "
                              "you can write to.") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        if directory and path.exists():
            _swap_directory(tmp, path)
        else:
            os.replace(tmp, path)
        _fsync_tree(path.parent, recursive=False)
    finally:
        _remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Clean up what an interrupted `atomic_output` left in `directory` (after a SIGKILL no `finally` runs).

    Unfinished temporaries are deleted. A directory swap killed between its two renames left the previous
    directory aside and nothing at its path: it is put back (the previous content, never half of anything).
    Call it only while nothing else is writing in `directory`: it cannot tell a live writer's temporary
    from a dead one's.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for aside in directory.glob(".*.old-*"):
        if aside.is_dir():
            for previous in aside.iterdir():
                if not (directory / previous.name).exists() and not (directory / previous.name).is_symlink():
                    os.replace(previous, directory / previous.name)
        _remove(aside)
    for child in directory.glob(".*.tmp-*"):
        _remove(child)


def _new_sibling(path: Path, kind: str, directory: bool) -> Path:
    """Create `.<name>.<kind>-<random>` next to `path`: an empty file, or an empty directory.

    Created with the default modes (0o666 / 0o777 less the umask), as a plain open() or mkdir() would:
    tempfile's 0o600 / 0o700 would otherwise end up on the final file, unreadable to anyone else.
    """
    stem = path.name[:200]  # room for the suffix within the usual 255-byte name limit
    for _ in range(100):
        candidate = path.parent / f".{stem}.{kind}-{secrets.token_hex(4)}"
        try:
            if directory:
                os.mkdir(candidate, 0o777)
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary next to {path}")


def _swap_directory(new: Path, path: Path) -> None:
    """Replace the directory `path` with `new`: move the old one aside, rename the new one in, delete the old.

    POSIX cannot rename a directory over a non-empty one. If the second rename fails, the old directory is
    put back; after a kill between the two, `remove_stale_temporaries` puts it back.
    """
    aside = _new_sibling(path, "old", directory=True)
    os.replace(path, aside / path.name)
    try:
        os.replace(new, path)
    except BaseException:
        try:
            os.replace(aside / path.name, path)
        except OSError:
            pass  # left in `aside`, where remove_stale_temporaries finds it
        else:
            _remove(aside)
        raise
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(path: Path, recursive: bool = True) -> None:
    """Flush `path` (a file; or a directory's entry and, recursively, everything under it) to disk, so that
    a rename after it is durable."""
    children = sorted(path.rglob("*"), reverse=True) if recursive and path.is_dir() else []
    for item in [*children, path]:  # deepest first, the directory itself last
        if item.is_symlink() or not (item.is_file() or item.is_dir()):  # opening a FIFO would block
            continue
        try:
            descriptor = os.open(item, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
            pass
        finally:
            os.close(descriptor)


def directory_size(path: str | os.PathLike) -> int:
    """Bytes of all files under `path` (0 when it does not exist): an artifact's size on disk."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


__all__ = ["OutputPathError", "atomic_output", "atomic_write_json", "atomic_write_text", "check_output_path",
           "directory_size", "remove_stale_temporaries"]
